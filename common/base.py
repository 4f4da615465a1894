"""Trainer and Tester: the loops behind ``main/train.py`` and ``main/test.py``.

Layout of the outputs (``cfg.output_dir``, default ``output/``), as the original::

    model_dump/subject_<N>/snapshot_<epoch>.pth.tar   {'epoch', 'network' ('module.' keys), 'optimizer'}
    log/train_logs.txt, log/test_logs.txt
    tensorboard/train/, tensorboard/test/              TensorBoard event files (common.summary)
    result/subject_<N>/                                test crops (.png), meshes (.obj), metrics.json

Reproducibility and resuming. The model is initialised under ``torch.manual_seed(seed)``; the
order of the training samples in epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``, and the data set's target views are a function of ``(seed, e, sample)``
(:meth:`data.dataset.DeepHandMeshDataset.set_epoch`). Nothing of an epoch therefore depends on
the epochs before it except the weights and the optimizer state, which a snapshot holds: a run
stopped after epoch ``k`` and resumed with ``--continue`` computes what the uninterrupted run
computes (same weights, bit for bit on the same machine and thread count). A run killed in the
middle of an epoch resumes from the last complete one and repeats that epoch from its start.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.utils.data
from torch.nn.parallel import DataParallel, DistributedDataParallel
from tqdm import tqdm

from common import metrics
from common.utils import distributed
from common.utils.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from common.utils.device import parse_gpu_ids, select_device, usable_cpus
from common.utils.hand_model import HandModel, is_hand_model_folder, load_hand_model, save_obj
from common.utils.hand_model_source import resolve_hand_model
from common.utils.io import atomic_write_bytes, atomic_write_text
from common.summary import SummaryWriter, depth_panel
from main.config import ROOT_DIR, Config, ConfigError
from main.model import INPUT_KEYS, META_KEYS, TARGET_KEYS, Model, align_to_keypoints, get_model

log = logging.getLogger("deephandmesh")

SNAPSHOT_RE = re.compile(r"^snapshot_(\d+)\.pth\.tar$")
# Options naming files or folders; relative values are taken from the repository root (main.config).
PATH_OPTIONS = ("data_dir", "output_dir", "hand_model_dir", "pretrained_backbone")


# ------------------------------------------------------------------------------------ helpers
class Timer:
    """Accumulates intervals between ``tic()`` and ``toc()``; ``average`` is the mean interval."""

    def __init__(self):
        self.total, self.calls, self._start = 0.0, 0, None

    def tic(self) -> None:
        self._start = time.perf_counter()

    def toc(self) -> float:
        interval = time.perf_counter() - self._start
        self.total += interval
        self.calls += 1
        return interval

    @property
    def average(self) -> float:
        return self.total / max(self.calls, 1)


def resolve_paths(config: Config) -> Config:
    """Make the path options absolute: relative ones are taken from the repository root."""
    for name in PATH_OPTIONS:
        value = getattr(config, name)
        if value and not Path(value).is_absolute():
            setattr(config, name, str(ROOT_DIR / value))
    return config


def add_config_args(parser) -> None:
    """The command-line options ``train.py`` and ``test.py`` share."""
    parser.add_argument("--gpu", dest="gpu_ids", default="",
                        help="GPU ids: '0', '0,1' or '0-3'; the CPU when absent or when CUDA is not available")
    parser.add_argument("--subject", type=int, help="subject number (default: cfg.subject, 4)")
    parser.add_argument("--cfg", dest="cfg_file", help="YAML file of option: value overrides")
    parser.add_argument("--data_dir", help="data folder (images/, annotations/[, hand_model/])")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override one option (repeatable), e.g. --set output_dir=output/run")


def config_from_args(args, base: Optional[Config] = None) -> Config:
    """A copy of ``base`` (the global ``cfg``) with, in this order: the ``--cfg`` YAML file, the
    ``--set`` assignments, then the dedicated options (``--data_dir``, ``--subject``, ``--gpu``, …).
    ``--data_dir`` is taken from the current folder; relative paths in the configuration from the
    repository root. Raises :class:`main.config.ConfigError` or ``ValueError`` (bad ``--gpu``)."""
    from main.config import cfg as global_cfg

    config = (base or global_cfg).copy()
    if args.cfg_file:
        config.update_from_yaml(args.cfg_file)
    config.update_from_strings(args.assignments)
    if args.data_dir:
        config.set("data_dir", str(Path(args.data_dir).resolve()), "--data_dir")
    if args.subject is not None:
        config.set("subject", args.subject, "--subject")
    if args.gpu_ids:
        parse_gpu_ids(args.gpu_ids)  # a clear error for a malformed list
        config.set("gpu_ids", args.gpu_ids, "--gpu")
    return resolve_paths(config)


def snapshot_dir(config: Config) -> Path:
    return Path(config.model_dir) / f"subject_{config.subject}"


def snapshot_path(config: Config, epoch: int) -> Path:
    return snapshot_dir(config) / f"snapshot_{int(epoch)}.pth.tar"


def latest_snapshot(config: Config) -> Optional[Tuple[int, Path]]:
    """``(epoch, path)`` of the snapshot with the highest epoch, or None. Temporary files of an
    interrupted write (``*.tmp``) are not snapshots."""
    folder = snapshot_dir(config)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder)
             if (m := SNAPSHOT_RE.match(name))]
    return max(found) if found else None


def training_hand_model(config: Config) -> HandModel:
    """``cfg.hand_model_dir`` when set; else ``data_dir/hand_model`` when it holds a model (a
    synthetic set has one); else :func:`common.utils.hand_model_source.resolve_hand_model`."""
    if config.hand_model_dir:
        return load_hand_model(config.hand_model_dir)
    in_data = Path(config.data_dir) / "hand_model"
    if is_hand_model_folder(in_data):
        return load_hand_model(in_data)
    return resolve_hand_model()


def split_batch(batch: Dict[str, object], device: torch.device, non_blocking: bool = False):
    """A collated data-set batch → ``(inputs, targets, meta_info)`` of tensors on ``device``
    (only tensors: DataParallel scatters them along the batch)."""
    def pick(keys):
        return {k: batch[k].to(device, non_blocking=non_blocking) for k in keys}
    return pick(INPUT_KEYS), pick(TARGET_KEYS), pick(META_KEYS)


def unwrap(model: torch.nn.Module) -> Model:
    return model.module if isinstance(model, (DataParallel, DistributedDataParallel)) else model


def network_state_dict(model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model's state dict with DataParallel's ``module.`` prefix, as the original saves it
    (whether or not the model is wrapped here), so the original's tooling reads our snapshots."""
    return OrderedDict(("module." + k, v) for k, v in unwrap(model).state_dict().items())


def pick_device(config: Config, context: Optional[distributed.DistributedContext] = None
                ) -> Tuple[torch.device, List[int]]:
    """The device (decided by :func:`select_device`, which logs it once) and the GPU ids this
    process uses (empty on the CPU; in a ``torchrun`` launch its one GPU)."""
    if context is not None:
        device = select_device(config.gpu_ids, context.local_rank, context.local_world_size)
        return device, ([device.index] if device.type == "cuda" else [])
    device = select_device(config.gpu_ids)
    return device, (parse_gpu_ids(config.gpu_ids) if device.type == "cuda" else [])


def place_model(model: Model, device: torch.device, gpu_ids: List[int]) -> torch.nn.Module:
    """Move ``model`` to ``device``; several GPUs → DataParallel over them (as the original)."""
    model = model.to(device)
    if len(gpu_ids) > 1:
        model = DataParallel(model, device_ids=gpu_ids, output_device=gpu_ids[0])
        log.info("DataParallel over GPUs %s", gpu_ids)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model


def log_options(config: Config) -> None:
    """Log the options that differ from the original's defaults (what makes this run this run)."""
    defaults = Config().options()
    changed = {k: v for k, v in config.options().items()
               if k not in ("root_dir", "num_gpus") and v != defaults.get(k)}
    log.info("options (changed from the defaults): %s",
             ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())) or "none")


def loader_workers(config: Config) -> int:
    """``cfg.num_thread`` data-loading workers, at most one per CPU this process may use."""
    return max(0, min(int(config.num_thread), usable_cpus()))


def epoch_time(seconds: float) -> str:
    """``'1.25h/epoch'``, or minutes below an hour."""
    return f"{seconds / 3600:.2f}h/epoch" if seconds >= 3600 else f"{seconds / 60:.1f}min/epoch"


def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


POSE_SOURCES = ("image", "gt")
CORRECTIVES = ("skeleton", "identity", "pose")


def check_study_options(config: Config) -> None:
    """``pose_source`` and ``correctives`` hold known values (else ``ConfigError`` naming them)."""
    if config.pose_source not in POSE_SOURCES:
        raise ConfigError(f"option 'pose_source' expects one of {list(POSE_SOURCES)}, got {config.pose_source!r}")
    unknown = [c for c in config.correctives if c not in CORRECTIVES]
    if unknown:
        raise ConfigError(f"option 'correctives' expects a list of some of {list(CORRECTIVES)}, got unknown {unknown}")


def held_correctives(config: Config) -> List[str]:
    """The correctives held at zero: those not in ``cfg.correctives``."""
    return [c for c in CORRECTIVES if c not in config.correctives]


def load_gt_poses(data_dir, joint_num: int) -> Dict[int, np.ndarray]:
    """Frame id → ``[J, 3]`` ground-truth Euler angles (radians) from a synthetic set's
    ``gt/frames.npz`` (written by ``data/make_synthetic.py``), for ``pose_source='gt'``."""
    path = Path(data_dir) / "gt" / "frames.npz"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; pose_source=gt (decoder-only) needs the ground-truth angles "
                          f"of a synthetic set (data/make_synthetic.py writes gt/frames.npz)")
    try:
        with np.load(path, allow_pickle=False) as data:
            frames, euler = np.asarray(data["frame"]), np.asarray(data["euler"], dtype=np.float32)
    except (KeyError, ValueError, OSError) as err:
        raise ConfigError(f"{path}: expected arrays 'frame' [T] and 'euler' [T, J, 3] ({err})") from None
    if euler.ndim != 3 or euler.shape[1:] != (joint_num, 3) or len(frames) != len(euler):
        raise ConfigError(f"{path}: 'euler' has shape {euler.shape}; expected [{len(frames)}, {joint_num}, 3] "
                          f"for this hand model")
    return {int(f): e for f, e in zip(frames, euler)}


def attach_gt_pose(inputs: Dict[str, torch.Tensor], frames, poses: Optional[Dict[int, np.ndarray]],
                   device: torch.device) -> None:
    """Decoder-only: put the ground-truth angles of the batch's ``frames`` into ``inputs['joint_euler']``
    (``[B, J, 3]`` radians), which the model uses instead of its encoder. A no-op when ``poses`` is None."""
    if poses is None:
        return
    missing = [int(f) for f in frames if int(f) not in poses]
    if missing:
        raise ConfigError(f"pose_source=gt: frames {missing} have no ground-truth angles in gt/frames.npz")
    euler = np.stack([poses[int(f)] for f in frames])
    inputs["joint_euler"] = torch.from_numpy(euler).to(device)


# ------------------------------------------------------------------------------------ training
class Trainer:
    """Adam, the original's learning-rate steps, one snapshot per epoch, ``--continue`` resuming.

    Args:
        config: a :class:`main.config.Config` (paths made absolute by :func:`resolve_paths`).
        seed: seeds the initialisation, the sample order and the target-view draws (module notes).
        context: this process's place in a ``torchrun`` launch
            (:func:`common.utils.distributed.context_from_env`), or None for one process.

    Several processes (``torchrun``): each joins the process group (NCCL on GPUs, gloo on the CPU),
    reads its share of every epoch through a ``DistributedSampler`` and trains a
    ``DistributedDataParallel`` copy of the model on ``train_batch_size`` samples per iteration,
    so ``N`` processes train on ``N x train_batch_size`` samples per step, as the original's
    ``DataParallel`` over ``N`` GPUs. The sampler draws epoch ``e``'s permutation from the same
    ``(seed, e)`` as one process does and deals it out in turn, so the samples of one step are those
    of the one-process step with ``N`` times the batch. Batch-norm statistics are per process (per
    GPU, as in the original). Only rank 0 logs, shows progress and writes snapshots; a snapshot
    holds nothing that depends on the number of processes, so ``--continue`` may change it.
    """

    def __init__(self, config: Config, seed: int = 0, context: Optional[distributed.DistributedContext] = None):
        self.cfg = config
        self.seed = int(seed)
        self.context = context
        self.start_epoch = 0
        self.tot_timer, self.gpu_timer, self.read_timer = Timer(), Timer(), Timer()
        self.device, self.gpu_ids = pick_device(config, context)
        if context is not None:
            distributed.init_process_group(context, self.device)
            log.info("distributed: %d processes (%s), this is rank %d", context.world_size,
                     distributed.backend_for(self.device), context.rank)
        config.num_gpus = len(self.gpu_ids)
        self.summary = SummaryWriter("", enabled=False)  # train() opens the real one (rank 0)
        log_options(config)

    @property
    def is_main(self) -> bool:
        return self.context is None or self.context.is_main

    @property
    def world_size(self) -> int:
        return 1 if self.context is None else self.context.world_size

    # ------------------------------------------------------------------ set-up
    def make_batch_generator(self) -> None:
        from data.dataset import DeepHandMeshDataset

        cfg = self.cfg
        log.info("Creating dataset from %s (subject %d)...", cfg.data_dir, cfg.subject)
        self.hand_model = training_hand_model(cfg)
        log.info("hand model: %s (%d vertices, %d faces, %d joints)", self.hand_model.source,
                 self.hand_model.vertex_num, len(self.hand_model.faces), self.hand_model.joint_num)
        check_study_options(cfg)
        self.gt_poses = load_gt_poses(cfg.data_dir, self.hand_model.joint_num) if cfg.pose_source == "gt" else None
        if self.gt_poses is not None:
            log.info("decoder-only: ground-truth angles of %d frames from gt/frames.npz; the encoder is bypassed",
                     len(self.gt_poses))
        self.dataset = DeepHandMeshDataset.from_config(cfg, "train", self.hand_model, seed=self.seed)
        self.batch_size = cfg.train_batch_size * max(1, len(self.gpu_ids))  # per GPU, as the original
        workers = loader_workers(cfg)
        # One sampler for one process and for many: epoch e's permutation is drawn from
        # seed + e = epoch_seed(e) (set_epoch) and dealt out in turn to the processes, so the
        # samples of a step do not depend on how many processes share it.
        self.sampler = torch.utils.data.DistributedSampler(
            self.dataset, num_replicas=self.world_size, rank=0 if self.context is None else self.context.rank,
            shuffle=True, seed=self.epoch_seed(0), drop_last=False)
        self.batch_generator = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler,
            num_workers=workers, pin_memory=self.device.type == "cuda", drop_last=False)
        self.itr_per_epoch = math.ceil(len(self.sampler) / self.batch_size)
        log.info("%d samples, batch %d%s, %d iterations per epoch, %d data-loading worker(s)%s",
                 len(self.dataset), self.batch_size * self.world_size,
                 "" if self.context is None else f" ({self.batch_size} per process)",
                 self.itr_per_epoch, workers, "" if self.context is None else " per process")

    def make_model(self) -> None:
        cfg = self.cfg
        log.info("Creating graph and optimizer (ResNet-%d)...", cfg.resnet_type)
        torch.manual_seed(self.seed)
        model = get_model("train", self.hand_model, cfg)
        held = held_correctives(cfg)
        if held:
            model.hold_at_zero(held)
            log.info("correctives held at zero: %s", ", ".join(held))
        if cfg.pose_source == "gt":  # nothing reaches the encoder: it does not learn
            model.backbone_net.requires_grad_(False)
            model.pose_net.requires_grad_(False)
        if not any(p.requires_grad for p in model.parameters()):
            log.warning("no parameter learns (pose_source=gt with every corrective held at zero): "
                        "the epochs only evaluate the losses")
        if self.context is None:
            self.model = place_model(model, self.device, self.gpu_ids)
        else:
            # DDP starts every process from rank 0's weights; the buffers are ours to send, once:
            # DDP cannot send the sparse Laplacian, and sending the others at every step (its
            # default) would only cost time: the hand model's never change, and of the batch-norm
            # statistics the snapshot keeps rank 0's, as the original's DataParallel kept GPU 0's.
            model = model.to(self.device)
            distributed.broadcast_dense_buffers(model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        # fused: one pass over each parameter's four tensors instead of about ten; the same update
        # up to float rounding (1 ulp), 5x faster on the CPU (51 -> 8 ms a step for ResNet-18).
        self.optimizer = torch.optim.Adam(unwrap(self.model).parameters(), lr=cfg.lr, fused=True)
        if cfg.continue_train:
            self.start_epoch = self.load_latest()
        self.model.train()

    def load_latest(self) -> int:
        """Load the latest snapshot (weights and optimizer); returns the epoch to start from.

        In a distributed run rank 0 finds and reads it and sends it to the others: on several
        machines only rank 0's has the snapshots."""
        found, ckpt, error = None, None, None
        if self.is_main:
            found = latest_snapshot(self.cfg)
            if found is not None:
                try:
                    ckpt = read_checkpoint(found[1])
                except CheckpointError as err:
                    error = str(err)
        found, ckpt, error = distributed.broadcast_object((found, ckpt, error))
        if error is not None:
            raise CheckpointError(error)
        if found is None:
            log.warning("--continue: no snapshot in %s; starting from epoch 0", snapshot_dir(self.cfg))
            return 0
        epoch, path = found
        log.info("Load checkpoint from %s", path)
        ckpt = load_checkpoint(unwrap(self.model), path, ckpt)
        if "optimizer" in ckpt:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{path}: its optimizer state does not fit this model ({err})") from None
            for group in self.optimizer.param_groups:  # a loaded state brings its own settings
                group["fused"], group["foreach"] = True, None
        else:
            log.warning("%s holds no optimizer state; Adam starts afresh", path)
        return int(ckpt.get("epoch", epoch)) + 1

    # ------------------------------------------------------------------ lr
    def lr_at(self, epoch: int) -> float:
        """``lr`` divided by ``lr_dec_factor`` once for every ``lr_dec_epoch`` already reached."""
        steps = sum(1 for e in self.cfg.lr_dec_epoch if epoch >= e)
        return self.cfg.lr / (self.cfg.lr_dec_factor ** steps)

    def set_lr(self, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)

    def get_lr(self) -> float:
        return self.optimizer.param_groups[-1]["lr"]

    # ------------------------------------------------------------------ loop
    def epoch_seed(self, epoch: int) -> int:
        return self.seed * 1_000_003 + int(epoch)

    def prepare_epoch(self, epoch: int) -> None:
        """Learning rate, sample order and target-view draws of ``epoch``."""
        self.set_lr(epoch)
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        """One pass over the data; returns the mean of every loss over the epoch. The samples skipped
        (``cfg.on_error='skip'``) are in :attr:`skip_report` and logged per file at the end."""
        from data.dataset import SkipReport

        cfg = self.cfg
        self.prepare_epoch(epoch)
        self.tot_timer, self.gpu_timer, self.read_timer = Timer(), Timer(), Timer()
        sums: Dict[str, float] = {}
        self.skip_report = SkipReport()
        cuda = self.device.type == "cuda"
        bar = tqdm(self.batch_generator, total=self.itr_per_epoch, desc=f"epoch {epoch}/{cfg.end_epoch}",
                   unit="itr", leave=False, dynamic_ncols=True, disable=not self.is_main)
        self.tot_timer.tic()
        self.read_timer.tic()
        for itr, batch in enumerate(bar):
            self.read_timer.toc()
            self.gpu_timer.tic()
            self.skip_report.add(batch)
            inputs, targets, meta_info = split_batch(batch, self.device, non_blocking=cuda)
            attach_gt_pose(inputs, batch["frame"], self.gt_poses, self.device)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.model(inputs, targets, meta_info, "train")
            loss = {k: v.mean() for k, v in loss.items()}
            total = sum(loss.values())
            # Averaged over the processes, so that every process sees the same values and stops
            # together on a non-finite one (a lone stop would leave the others waiting).
            mean_values = distributed.average_tensor(torch.stack([v.detach().float() for v in loss.values()]))
            values = dict(zip(loss, mean_values.tolist()))
            if not all(math.isfinite(v) for v in values.values()):
                shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
                raise FloatingPointError(f"epoch {epoch} iteration {itr}: non-finite loss ({shown}); "
                                         f"lower the learning rate (cfg.lr = {cfg.lr:g})")
            if total.requires_grad:  # nothing learns in decoder-only plain LBS: losses only
                total.backward()
                self.optimizer.step()
            if cuda:
                torch.cuda.synchronize(self.device)
            self.gpu_timer.toc()
            self.tot_timer.toc()

            values["total"] = sum(values.values())
            samples_per_s = self.batch_size * self.world_size / max(self.tot_timer.average, 1e-9)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            screen = [
                f"Epoch {epoch}/{cfg.end_epoch} itr {itr}/{self.itr_per_epoch}:",
                f"lr: {self.get_lr():g}",
                f"speed: {self.tot_timer.average:.2f}s/itr (compute {self.gpu_timer.average:.2f}s, "
                f"data {self.read_timer.average:.2f}s)",
                f"{samples_per_s:.1f} samples/s",
                epoch_time(self.tot_timer.average * self.itr_per_epoch),
            ]
            screen += [f"loss_{k}: {v:.4f}" for k, v in values.items()]
            log.info(" ".join(screen))
            bar.set_postfix(loss=f"{values['total']:.3f}")
            step = epoch * self.itr_per_epoch + itr
            self.summary.scalars({f"loss/{k}": v for k, v in values.items()}, step)
            self.summary.scalars({"lr": self.get_lr(), "samples_per_s": samples_per_s}, step)
            interval = int(cfg.tensorboard_image_interval)
            if self.summary.active and interval > 0 and step % interval == 0:
                self.summary.image("depth/crop_rendered_captured_difference",
                                   self.depth_panel(inputs, targets, meta_info), step)

            self.tot_timer.tic()
            self.read_timer.tic()
        bar.close()
        if self.skip_report.count:
            log.warning("epoch %d: %s (on_error='skip')", epoch, self.skip_report.summary())
        count = max(1, len(bar))
        return {k: v / count for k, v in sums.items()}

    @torch.no_grad()
    def depth_panel(self, inputs, targets, meta_info) -> np.ndarray:
        """The TensorBoard panel of the batch's first sample and first target view, with the weights
        after the step: input crop, rendered depth, captured depth, difference
        (:func:`common.summary.depth_panel`). Rendered in eval mode, so that this extra pass
        leaves the batch-norm statistics as they were."""
        model = unwrap(self.model)
        first = lambda d: {k: v[:1] for k, v in d.items()}  # noqa: E731
        inputs, targets, meta_info = first(inputs), first(targets), first(meta_info)
        was_training = model.training
        model.eval()
        try:
            euler = inputs.get("joint_euler")
            if euler is None:
                euler = model.pose_net(model.backbone_net(inputs["img"]))
            root, _ = model.root_alignment(model.refined_template_pose(), targets["joint_world"].float(),
                                           targets["joint_valid"].float())
            mesh = model.pose(euler, root)["mesh_out_refined"]
            depth = model.renderer(mesh, meta_info["camrot"], meta_info["campos"], meta_info["focal"],
                                   meta_info["princpt"], meta_info["affine"])
        finally:
            model.train(was_training)
        return depth_panel(inputs["img"][0], depth[0, 0], targets["depthmap"][0, 0])

    def save_model(self, epoch: int) -> Path:
        """Rank 0 writes the snapshot (atomically); the others wait for it."""
        path = snapshot_path(self.cfg, epoch)
        if self.is_main:
            save_checkpoint({"epoch": int(epoch), "network": network_state_dict(self.model),
                             "optimizer": self.optimizer.state_dict()}, path)
            log.info("Write snapshot into %s", path)
        distributed.barrier()
        return path

    def train(self) -> None:
        cfg = self.cfg
        if self.start_epoch >= cfg.end_epoch:
            log.info("nothing to do: epoch %d reached end_epoch %d", self.start_epoch, cfg.end_epoch)
            return
        self.summary = SummaryWriter(Path(cfg.tensorboard_dir) / "train", enabled=self.is_main)
        try:
            for epoch in range(self.start_epoch, cfg.end_epoch):
                start = time.perf_counter()
                means = self.train_epoch(epoch)
                self.save_model(epoch)
                self.summary.scalars({f"epoch_loss/{k}": v for k, v in means.items()}, epoch)
                self.summary.flush()
                log.info("epoch %d done in %.1fs (%.2fs/itr): %s; %d sample(s) skipped in this epoch, %d so far "
                         "(on_error=%r)", epoch, time.perf_counter() - start, self.tot_timer.average,
                         " ".join(f"loss_{k} {v:.4f}" for k, v in means.items()), self.skip_report.count,
                         self.dataset.skipped, cfg.on_error)
        finally:
            self.summary.close()


# ------------------------------------------------------------------------------------ testing
class Tester:
    """Runs the test-mode model over the data set, writes crops, meshes and ``metrics.json``.

    Metrics (DESIGN §3; all in mm). The test-mode output lives in the wrist's frame (root at
    identity); it is placed in the world by the training's rigid alignment: Kabsch of the predicted
    alignment joints onto the valid ground-truth keypoints of the same joints
    (:func:`main.model.align_to_keypoints`). Then:

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

    def __init__(self, config: Config, test_epoch: Optional[int], init_seed: int = 0):
        """``test_epoch`` None: test the model as ``train.py --seed init_seed`` initialises it
        (the reference point of a training run), writing ``resultinit.json``."""
        self.cfg = config
        self.test_epoch = None if test_epoch is None else int(test_epoch)
        self.init_seed = int(init_seed)
        # Set True to keep every evaluated sample's placed output mesh (world frame, mm) and its
        # frame in ``placed_meshes`` {index: (frame, [V, 3] array)} (the component study's figure).
        self.keep_meshes = False
        self.placed_meshes: Dict[int, Tuple[int, np.ndarray]] = {}
        self.device, self.gpu_ids = pick_device(config)
        config.num_gpus = len(self.gpu_ids)

    @property
    def result_dir(self) -> Path:
        return Path(self.cfg.result_dir) / f"subject_{self.cfg.subject}"

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
        load_checkpoint(model, path)
        self.model = place_model(model, self.device, self.gpu_ids)
        self.model.eval()

    def make_batch_generator(self) -> None:
        from data.dataset import DeepHandMeshDataset

        cfg = self.cfg
        check_study_options(cfg)
        self.gt_poses = load_gt_poses(cfg.data_dir, self.hand_model.joint_num) if cfg.pose_source == "gt" else None
        self.dataset = DeepHandMeshDataset.from_config(cfg, "test", self.hand_model, on_error="skip", seed=0)
        batch = cfg.test_batch_size * max(1, len(self.gpu_ids))
        self.batch_generator = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch, shuffle=False, num_workers=loader_workers(cfg),
            pin_memory=self.device.type == "cuda")
        self.gt = self._load_ground_truth()

    def _load_ground_truth(self) -> Optional[Dict[int, np.ndarray]]:
        path = Path(self.cfg.data_dir) / "gt" / "frames.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            frames, verts = data["frame"], data["vertices"]
        if verts.ndim != 3 or verts.shape[1] != self.hand_model.vertex_num:
            log.warning("%s: ground-truth meshes of %s vertices do not match the hand model's %d; "
                        "no mesh error", path, verts.shape[1:2], self.hand_model.vertex_num)
            return None
        log.info("ground-truth meshes: %s (%d frames)", path, len(frames))
        return {int(f): v for f, v in zip(frames, verts)}

    @torch.no_grad()
    def test(self) -> Dict[str, object]:
        hand = self.hand_model
        model = unwrap(self.model)
        align = model.align_joint_idx
        out_dir = self.result_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        J = hand.joint_num
        joint_sum, joint_cnt = np.zeros(J), np.zeros(J)
        depth_sum, depth_cnt = 0.0, 0
        mesh_errors: List[float] = []
        to_gt: List[np.ndarray] = []  # point-to-surface distances, output vertices -> true surface
        from_gt: List[np.ndarray] = []  # true vertices -> output surface
        faces = torch.as_tensor(hand.faces, dtype=torch.long)
        surface_cache: Dict[int, Tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
        seen, unplaced, evaluated = set(), 0, 0
        for batch in tqdm(self.batch_generator, desc="test", unit="batch", dynamic_ncols=True):
            inputs, targets, meta_info = split_batch(batch, self.device)
            attach_gt_pose(inputs, batch["frame"], self.gt_poses, self.device)
            out = self.model(inputs, None, None, "test")
            joints, mesh = out["joint_out"].float(), out["mesh_out_refined"].float()
            gt, valid = targets["joint_world"].float(), targets["joint_valid"].float()
            T, ok = align_to_keypoints(joints[:, align], gt[:, align], valid[:, align])
            joints_w = joints @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
            mesh_w = mesh @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
            depth = model.renderer(mesh_w, meta_info["camrot"], meta_info["campos"], meta_info["focal"],
                                   meta_info["princpt"], meta_info["affine"])
            joint_dist, joint_ok = metrics.joint_distances(joints_w, gt, valid)
            joint_dist, joint_ok = joint_dist.cpu().numpy(), joint_ok.cpu().numpy()
            depth_abs, both = metrics.depth_differences(depth, targets["depthmap"])
            for b in range(joints.shape[0]):
                index = int(batch["index"][b])
                if index in seen:
                    continue  # a skipped sample replaced by one evaluated already
                seen.add(index)
                stem = f"{index:05d}_{batch['seq'][b]}_cam{batch['cam'][b]}_frame{int(batch['frame'][b]):04d}"
                self._save_sample(out_dir, stem, batch["img"][b], mesh[b])
                if not bool(ok[b]):
                    unplaced += 1
                    continue
                evaluated += 1
                v = joint_ok[b]
                joint_sum[v] += joint_dist[b][v]
                joint_cnt[v] += 1
                depth_sum += float(depth_abs[b].sum())
                depth_cnt += int(both[b].sum())
                frame = int(batch["frame"][b])
                if self.keep_meshes:
                    self.placed_meshes[index] = (frame, mesh_w[b].cpu().double().numpy())
                if self.gt is not None and frame in self.gt:
                    ref = torch.as_tensor(self.gt[frame], dtype=mesh_w.dtype, device=mesh_w.device)
                    mesh_errors.append(float(metrics.vertex_error(mesh_w[b], ref)))
                    placed = mesh_w[b].cpu()
                    known = surface_cache.get(frame)
                    if known is None or not torch.equal(known[0], placed):
                        # The views of a frame often give the very same mesh (decoder-only: the same
                        # angles and keypoints); its distances are computed once.
                        there, back = metrics.surface_distances(placed, ref.cpu(), faces)
                        known = surface_cache[frame] = (placed, there.numpy(), back.numpy())
                    to_gt.append(known[1])
                    from_gt.append(known[2])

        per_joint = {name: _finite_or_none(s / c) if c else None
                     for name, s, c in zip(hand.joint_names, joint_sum, joint_cnt)}
        result = {
            "epoch": "init" if self.test_epoch is None else self.test_epoch,
            "subject": self.cfg.subject,
            "snapshot": None if self.test_epoch is None else snapshot_path(self.cfg, self.test_epoch).name,
            "hand_model": {"vertices": hand.vertex_num, "joints": hand.joint_num},
            "samples": len(seen),
            "evaluated_samples": evaluated,
            "unplaced_samples": unplaced,
            "skipped_samples": self.dataset.skipped,
            "alignment": ("Kabsch on the valid keypoints of the alignment joints "
                          + ", ".join(hand.joint_names[j] for j in align)),
            "joint_error_mm": _finite_or_none(joint_sum.sum() / joint_cnt.sum()) if joint_cnt.sum() else None,
            "joint_error_per_joint_mm": per_joint,
            "valid_joints": int(joint_cnt.sum()),
            "depth_error_mm": _finite_or_none(depth_sum / depth_cnt) if depth_cnt else None,
            "depth_pixels": depth_cnt,
            "mesh_error_mm": _finite_or_none(float(np.mean(mesh_errors))) if mesh_errors else None,
            "mesh_samples": len(mesh_errors),
        }
        # The surface figures (main figure: surface_error_mm), None without ground-truth meshes.
        surface = (metrics.summarise_surface(np.concatenate(to_gt), np.concatenate(from_gt)) if to_gt
                   else dict.fromkeys(metrics.summarise_surface([0.0], [0.0]), None))
        result.update(surface)
        result["identity"] = self._identity_metrics(model)
        name = "metrics_init.json" if self.test_epoch is None else "metrics.json"
        atomic_write_text(out_dir / name, json.dumps(result, indent=2) + "\n")
        self.write_summary(result)
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
        path = Path(self.cfg.data_dir) / "gt" / "identity.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            gt_id, gt_skeleton = data["id_corrective"], data["skeleton_offset"]
        if gt_id.shape != (self.hand_model.vertex_num, 3) or gt_skeleton.shape != (self.hand_model.joint_num, 3):
            log.warning("%s: shapes %s, %s do not match the hand model; no identity metrics",
                        path, gt_id.shape, gt_skeleton.shape)
            return None
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
