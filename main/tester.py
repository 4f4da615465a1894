"""The evaluation behind ``main/test.py``: :class:`Tester` runs the test-mode model over a data set
and writes the input crops, the meshes and ``metrics.json`` under
``result/subject_<N>/`` (``output_dir``), and the metrics to TensorBoard (``tensorboard/test/``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.utils.data
from tqdm import tqdm

from common import metrics
from common.summary import SummaryWriter
from common.io.checkpoint import CheckpointError, load_checkpoint, load_decoder_checkpoint, snapshot_path
from common.utils.device import pick_device, place_model, unwrap
from common.hand.hand_model import save_obj
from common.io.atomic import atomic_write_bytes, atomic_write_text, make_folder
from data.ground_truth import attach_gt_pose, load_gt_identity, load_gt_meshes, load_gt_poses
from main.config import Config
from main.model import get_model
from main.objective import align_to_keypoints
from main.options import check_options, held_correctives
from main.loops import loader_workers, make_loader, split_batch, training_hand_model

log = logging.getLogger("deephandmesh")


class PlacedBatch(NamedTuple):
    """A test batch's output placed in the world (:meth:`Tester.evaluate_batch`)."""
    mesh: torch.Tensor           # [B, V, 3] test-mode output, wrist frame (mm)
    mesh_world: torch.Tensor     # [B, V, 3] placed by the alignment (mm)
    ok: torch.Tensor             # [B] bool: the sample could be placed
    joint_dist: np.ndarray       # [B, J] distance to each keypoint (mm)
    joint_ok: np.ndarray         # [B, J] bool: the keypoint exists
    depth_abs: torch.Tensor      # [B, N, H, W] |rendered − captured| (mm) where both exist, else 0
    both: torch.Tensor           # [B, N, H, W] bool: both depths exist


class MetricSums:
    """The running sums of a test's errors over the evaluated samples (:class:`Tester`'s notes)."""

    def __init__(self, hand_model, gt_meshes: Optional[Dict[int, np.ndarray]]):
        self.joint_names = hand_model.joint_names
        self.faces = torch.as_tensor(hand_model.faces, dtype=torch.long)
        self.gt = gt_meshes
        J = hand_model.joint_num
        self.joint_sum, self.joint_cnt = np.zeros(J), np.zeros(J)
        self.depth_sum, self.depth_cnt, self.evaluated = 0.0, 0, 0
        self.mesh_errors: List[float] = []
        self.to_gt: List[np.ndarray] = []    # point-to-surface distances, output vertices → true surface
        self.from_gt: List[np.ndarray] = []  # true vertices → output surface
        # The views of a frame often give the very same mesh (decoder-only: the same angles and
        # keypoints): its surface distances are computed once.
        self._surface: Dict[int, Tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}

    def add(self, placed: PlacedBatch, b: int, frame: int) -> None:
        """Sample ``b`` of ``placed`` (of ``frame``)."""
        self.evaluated += 1
        valid = placed.joint_ok[b]
        self.joint_sum[valid] += placed.joint_dist[b][valid]
        self.joint_cnt[valid] += 1
        self.depth_sum += float(placed.depth_abs[b].sum())
        self.depth_cnt += int(placed.both[b].sum())
        if self.gt is None or frame not in self.gt:
            return
        mesh = placed.mesh_world[b]
        ref = torch.as_tensor(self.gt[frame], dtype=mesh.dtype, device=mesh.device)
        self.mesh_errors.append(float(metrics.vertex_error(mesh, ref)))
        mesh = mesh.cpu()
        known = self._surface.get(frame)
        if known is None or not torch.equal(known[0], mesh):
            there, back = metrics.surface_distances(mesh, ref.cpu(), self.faces)
            known = self._surface[frame] = (mesh, there.numpy(), back.numpy())
        self.to_gt.append(known[1])
        self.from_gt.append(known[2])

    def summary(self) -> Dict[str, object]:
        """The error metrics (mm; None where nothing was measured)."""
        count = self.joint_cnt.sum()
        out = {
            "joint_error_mm": metrics.finite_or_none(self.joint_sum.sum() / count) if count else None,
            "joint_error_per_joint_mm": {name: metrics.finite_or_none(s / c) if c else None
                                         for name, s, c in zip(self.joint_names, self.joint_sum, self.joint_cnt)},
            "valid_joints": int(count),
            "depth_error_mm": metrics.finite_or_none(self.depth_sum / self.depth_cnt) if self.depth_cnt else None,
            "depth_pixels": self.depth_cnt,
            "mesh_error_mm": metrics.finite_or_none(float(np.mean(self.mesh_errors))) if self.mesh_errors else None,
            "mesh_samples": len(self.mesh_errors),
        }
        # The surface figures (main figure: surface_error_mm), None without ground-truth meshes.
        out.update(metrics.summarise_surface(np.concatenate(self.to_gt), np.concatenate(self.from_gt))
                   if self.to_gt else dict.fromkeys(metrics.summarise_surface([0.0], [0.0]), None))
        return out


class Tester:
    """Runs the test-mode model over the data set, writes crops, meshes and ``metrics.json``.

    Metrics (docs/training.md, "Metrics"; all in mm). The test-mode output lives in the wrist's frame (root at
    identity); it is placed in the world by the training's rigid alignment: Kabsch of the predicted
    alignment joints onto the valid ground-truth keypoints of the same joints
    (:func:`main.objective.align_to_keypoints`). Then:

    * ``joint_error_mm``: mean Euclidean distance over every valid keypoint of every sample
      (alignment joints included), and per joint;
    * ``depth_error_mm``: mean ``|rendered − captured|`` over the pixels of every target view where
      both depths exist, pooled over views and samples (``depth_pixels`` of them);
    * ``mesh_error_mm`` (only where a synthetic set's ``gt/frames.npz`` exists): mean per-vertex
      Euclidean distance to the ground-truth mesh of the sample's frame;
    * ``surface_*`` (likewise): exact point-to-surface distances both ways between the output and
      the ground-truth mesh (:func:`common.metrics.surface_distances`), pooled over the samples:
      mean and 90th percentile of each direction, and ``surface_error_mm``, the mean of the two means;
    * ``identity`` (only where ``gt/identity.npz`` exists): Pearson correlation of the learned
      identity corrective (``fc_id(id_code)``, ``[V, 3]``) and skeleton corrective (``[J, 3]``, root
      left out: its local pose is never used) with the ground truth, and their RMS in mm; and of the
      whole corrective at the zero pose (``fc_id(id_code) + fc_pose(0)``) with the ground truth's
      (its identity corrective: the synthetic pose corrective vanishes there). With one subject the
      split of a constant offset between the identity branch and the pose branch's bias is not
      determined by the data, so the zero-pose figure is the one the data can pin down. Also the
      surface figures (``rest_surface_*``) of that zero-pose rest surface (template + corrective,
      before skinning) against the true one (template + true identity corrective).

    The metric functions are :mod:`common.metrics`; with ``pose_source='gt'`` the test mode decodes
    the ground-truth angles (decoder-only). The metrics also go to TensorBoard
    (``output_dir/tensorboard/test``).

    Samples with fewer than three valid alignment keypoints cannot be placed and are left out of
    the metrics (``unplaced_samples``); a sample the reader skipped (``on_error='skip'`` returns the
    next one) is counted once (``skipped_samples``).
    """

    def __init__(self, config: Config, test_epoch: Optional[int], init_seed: int = 0, keep_meshes: bool = False):
        """``test_epoch`` None: test the model as ``train.py --seed init_seed`` initialises it
        (the reference point of a training run), writing ``metrics_init.json``. ``keep_meshes``:
        keep every evaluated sample's placed output mesh (world frame, mm) and its frame in
        :attr:`placed_meshes` ``{index: (frame, [V, 3] array)}`` (the component study's figure)."""
        self.cfg = config
        self.test_epoch = None if test_epoch is None else int(test_epoch)
        self.init_seed = int(init_seed)
        self.keep_meshes = bool(keep_meshes)
        self.placed_meshes: Dict[int, Tuple[int, np.ndarray]] = {}
        self.device, self.gpu_ids = pick_device(config)
        config.num_gpus = len(self.gpu_ids)

    @property
    def result_dir(self) -> Path:
        return Path(self.cfg.result_dir) / f"subject_{self.cfg.subject}"

    def set_up(self) -> "Tester":
        """The checks of the options, the model (and its hand model), then the data; returns self."""
        check_options(self.cfg)
        self.make_model()
        self.make_batch_generator()
        return self

    def make_model(self) -> None:
        if self.test_epoch is None:
            self.hand_model = training_hand_model(self.cfg)
            torch.manual_seed(self.init_seed)  # as Trainer.make_model
            model = get_model("train", self.hand_model, self.cfg)
            model.hold_at_zero(held_correctives(self.cfg))
            log.info("testing the initialisation of a training run with seed %d (no snapshot)", self.init_seed)
            self.model = place_model(model, self.device, self.gpu_ids)
            self.model.eval()
            return
        path = snapshot_path(self.cfg, self.test_epoch)
        if not path.is_file():
            raise CheckpointError(f"{path}: snapshot not found (train first, or check --test_epoch, "
                                  f"--subject and output_dir)")
        self.hand_model = training_hand_model(self.cfg)
        log.info("hand model: %s (%d vertices, %d joints)", self.hand_model.source,
                 self.hand_model.vertex_num, self.hand_model.joint_num)
        log.info("Load checkpoint from %s", path)
        model = get_model("test", self.hand_model, self.cfg)
        if self.cfg.pose_source == "gt":
            # Decoder-only: the encoder is bypassed, so a snapshot without it (a personalised hand,
            # main/personalise.py) or with another backbone tests as well.
            loaded = load_decoder_checkpoint(model, path)
            if loaded.absent or loaded.ignored:
                log.info("pose_source=gt: the encoder is not used (absent from the snapshot: %s; not read: %s)",
                         ", ".join(loaded.absent) or "none", ", ".join(loaded.ignored) or "none")
        else:
            load_checkpoint(model, path)
        self.model = place_model(model, self.device, self.gpu_ids)
        self.model.eval()

    def make_batch_generator(self) -> None:
        from data.dataset import DeepHandMeshDataset

        cfg = self.cfg
        self.gt_poses = load_gt_poses(cfg.data_dir, self.hand_model.joint_num) if cfg.pose_source == "gt" else None
        self.dataset = DeepHandMeshDataset.from_config(cfg, "test", self.hand_model, on_error="skip", seed=0)
        batch = cfg.test_batch_size * max(1, len(self.gpu_ids))
        self.batch_generator = make_loader(self.dataset, batch, self.device, loader_workers(cfg))
        self.gt = load_gt_meshes(cfg.data_dir, self.hand_model.vertex_num)

    @torch.no_grad()
    def test(self) -> Dict[str, object]:
        """Every sample once: its crop and mesh written, its errors summed; returns (and writes as
        ``metrics.json``) the metrics of the class notes."""
        out_dir = self.result_dir
        make_folder(out_dir)
        sums = MetricSums(self.hand_model, self.gt)
        seen, unplaced = set(), 0
        for batch in tqdm(self.batch_generator, desc="test", unit="batch", dynamic_ncols=True):
            placed = self.evaluate_batch(batch)
            for b in range(len(batch["index"])):
                index = int(batch["index"][b])
                if index in seen:
                    continue  # a skipped sample replaced by one evaluated already
                seen.add(index)
                frame = int(batch["frame"][b])
                stem = f"{index:05d}_{batch['seq'][b]}_cam{batch['cam'][b]}_frame{frame:04d}"
                self._save_sample(out_dir, stem, batch["img"][b], placed.mesh[b])
                if not bool(placed.ok[b]):
                    unplaced += 1
                    continue
                sums.add(placed, b, frame)
                if self.keep_meshes:
                    self.placed_meshes[index] = (frame, placed.mesh_world[b].cpu().double().numpy())
        result = self.result(sums, len(seen), unplaced)
        name = "metrics_init.json" if self.test_epoch is None else "metrics.json"
        atomic_write_text(out_dir / name, json.dumps(result, indent=2) + "\n")
        self.write_summary(result)
        return result

    def evaluate_batch(self, batch) -> "PlacedBatch":
        """The test-mode output of a batch placed in the world by the alignment of its alignment
        joints onto the keypoints, its joint distances and its depth differences (class notes)."""
        model = unwrap(self.model)
        align = model.align_joint_idx
        inputs, targets, meta_info = split_batch(batch, self.device, non_blocking=self.device.type == "cuda")
        attach_gt_pose(inputs, batch["frame"], self.gt_poses, self.device)
        out = self.model(inputs, None, None, "test")
        joints, mesh = out["joint_out"].float(), out["mesh_out_refined"].float()
        gt, valid = targets["joint_world"].float(), targets["joint_valid"].float()
        T, ok = align_to_keypoints(joints[:, align], gt[:, align], valid[:, align])
        joints_w = joints @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
        mesh_w = mesh @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
        joint_dist, joint_ok = metrics.joint_distances(joints_w, gt, valid)
        depth_abs, both = metrics.depth_differences(model.objective.render(mesh_w, meta_info), targets["depthmap"])
        return PlacedBatch(mesh, mesh_w, ok, joint_dist.cpu().numpy(), joint_ok.cpu().numpy(), depth_abs, both)

    def result(self, sums: "MetricSums", samples: int, unplaced: int) -> Dict[str, object]:
        """The metrics of a test (class notes) from its sums."""
        hand = self.hand_model
        align = unwrap(self.model).align_joint_idx
        result = {
            "epoch": "init" if self.test_epoch is None else self.test_epoch,
            "subject": self.cfg.subject,
            "snapshot": None if self.test_epoch is None else snapshot_path(self.cfg, self.test_epoch).name,
            "hand_model": {"vertices": hand.vertex_num, "joints": hand.joint_num},
            "samples": samples,
            "evaluated_samples": sums.evaluated,
            "unplaced_samples": unplaced,
            "skipped_samples": self.dataset.skipped,
            "alignment": ("Kabsch on the valid keypoints of the alignment joints "
                          + ", ".join(hand.joint_names[j] for j in align)),
        }
        result.update(sums.summary())
        result["identity"] = self._identity_metrics(unwrap(self.model))
        return result

    def write_summary(self, result: Dict[str, object]) -> None:
        """The metrics into TensorBoard (``output_dir/tensorboard/test``), at the snapshot's epoch
        (the initialisation: ``test_init/…`` at step 0)."""
        scalars = {k: v for k, v in result.items() if k.endswith("_mm") and isinstance(v, float)}
        scalars.update({f"identity/{k}": v for k, v in (result.get("identity") or {}).items()
                        if isinstance(v, float)})
        summary = SummaryWriter(Path(self.cfg.tensorboard_dir) / "test")
        try:
            summary.scalars(scalars, 0 if self.test_epoch is None else self.test_epoch,
                            prefix="test_init/" if self.test_epoch is None else "test/")
        finally:
            summary.close()

    @torch.no_grad()
    def _identity_metrics(self, model) -> Optional[Dict[str, float]]:
        truth = load_gt_identity(self.cfg.data_dir, self.hand_model.vertex_num, self.hand_model.joint_num)
        if truth is None:
            return None
        gt_id, gt_skeleton = truth
        learned_id = model.skin_refine_net.fc_id(model.id_code).reshape(-1, 3).double().cpu().numpy()
        learned_skeleton = model.skeleton_refine_net(model.id_code).double().cpu().numpy()
        zero_pose = model.id_code.new_zeros(1, self.hand_model.joint_num, 3)
        learned_rest = learned_id + model.skin_refine_net(zero_pose, model.id_code)[0][0].double().cpu().numpy()
        keep = np.arange(self.hand_model.joint_num) != self.hand_model.root_index
        # The zero-pose rest surfaces (before skinning): template + the learned corrective at the
        # zero pose against template + the true identity corrective (the true pose corrective
        # vanishes there). They isolate the identity's shape from the pose's.
        template = np.asarray(self.hand_model.vertices, dtype=np.float64)
        there, back = metrics.surface_distances(torch.from_numpy(template + learned_rest),
                                                torch.from_numpy(template + gt_id),
                                                torch.as_tensor(self.hand_model.faces, dtype=torch.long))
        correlation = metrics.pearson
        return {
            "id_corrective_correlation": correlation(learned_id, gt_id),
            "id_corrective_rms_mm": metrics.rms(learned_id), "gt_id_corrective_rms_mm": metrics.rms(gt_id),
            "zero_pose_corrective_correlation": correlation(learned_rest, gt_id),
            "zero_pose_corrective_rms_mm": metrics.rms(learned_rest),
            "skeleton_corrective_correlation": correlation(learned_skeleton[keep], gt_skeleton[keep]),
            "skeleton_corrective_rms_mm": metrics.rms(learned_skeleton[keep]),
            "gt_skeleton_offset_rms_mm": metrics.rms(gt_skeleton[keep]),
            **metrics.summarise_surface(there.numpy(), back.numpy(), prefix="rest_surface"),
        }

    def _save_sample(self, out_dir: Path, stem: str, img: torch.Tensor, mesh: torch.Tensor) -> None:
        """The input crop as ``<stem>_img.png`` and the test-mode mesh (wrist frame, as the
        original's output and ``decode``) as ``<stem>_mesh.obj``."""
        rgb = (img.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
        if not ok:
            raise OSError(f"{out_dir / stem}_img.png: could not encode the image")
        atomic_write_bytes(out_dir / f"{stem}_img.png", buf.tobytes())
        save_obj(out_dir / f"{stem}_mesh.obj", mesh.detach().cpu().double().numpy(), self.hand_model)
