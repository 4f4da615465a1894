"""The training loop behind ``main/train.py``: :class:`Trainer`.

Layout of the outputs (``cfg.output_dir``, default ``output/``), as the original::

    model_dump/subject_<N>/snapshot_<epoch>.pth.tar   {'epoch', 'network' ('module.' keys), 'optimizer'}
    log/train_logs.txt, log/test_logs.txt
    tensorboard/train/, tensorboard/test/              TensorBoard event files (common.summary)
    result/subject_<N>/                                test crops (.png), meshes (.obj), metrics.json

Reproducibility and resuming. The model is initialised under ``torch.manual_seed(seed)``; the
order of the training samples in epoch ``e`` is (one process)::

    torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1_000_003 + e))

(:meth:`Trainer.epoch_seed`), a new permutation every epoch, and the data set's target views are
a function of ``(seed, e, sample)``
(:meth:`data.dataset.DeepHandMeshDataset.set_epoch`). Nothing of an epoch therefore depends on
the epochs before it except the weights and the optimizer state, which a snapshot holds: a run
stopped after epoch ``k`` and resumed with ``--continue`` computes what the uninterrupted run
computes (same weights, bit for bit on the same machine and thread count). A run killed in the
middle of an epoch resumes from the last complete one and repeats that epoch from its start.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.utils.data
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common.summary import SummaryWriter, depth_panel
from common.utils import distributed
from common.io.checkpoint import (CheckpointError, align_optimizer_state, latest_snapshot, load_checkpoint,
                                  network_state_dict, optimizer_state_dict, read_checkpoint, run_snapshots,
                                  save_checkpoint, snapshot_dir, snapshot_path, snapshots_to_delete)
from common.io.atomic import sync_folder
from common.utils.device import pick_device, place_model, unwrap
from data.ground_truth import attach_gt_pose, load_gt_poses
from main.config import Config
from main.loops import Timer, epoch_time, loader_workers, make_loader, split_batch, training_hand_model
from main.model import get_model
from main.options import check_options, held_correctives, log_options

log = logging.getLogger("deephandmesh")


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
    def set_up(self) -> "Trainer":
        """The checks of the options, the data, then the model and optimizer (resuming with
        ``continue_train``); returns self."""
        check_options(self.cfg)
        self.announce_snapshots()
        self.make_batch_generator()
        self.make_model()
        return self

    def announce_snapshots(self) -> None:
        """Say (rank 0) what retention keeps, and warn loudly when a new run (no ``--continue``) is
        about to write over the snapshots of an earlier run in the same folder.

        A warning, not a refusal: the original writes over them silently, and scripts that re-run
        a configuration expect that to work; the warning names the folder, what happens to the
        old snapshots and the two ways out (another ``output_dir``, or ``--continue``)."""
        if not self.is_main:
            return
        cfg = self.cfg
        if cfg.keep_last:
            every = (f" and one every {cfg.keep_every} epochs (snapshot_{cfg.keep_every - 1}, "
                     f"snapshot_{2 * cfg.keep_every - 1}, …)" if cfg.keep_every else "")
            log.info("snapshots: keeping the last %d%s; older ones are deleted once the next is written "
                     "(keep_last, keep_every)", cfg.keep_last, every)
        elif cfg.keep_every:
            log.warning("keep_every=%d has no effect while keep_last=0 (every snapshot is kept); "
                        "set keep_last too, e.g. --set keep_last=1", cfg.keep_every)
        found = run_snapshots(cfg)
        if found and not cfg.continue_train:
            epochs = [e for e, _ in found]
            log.warning(
                "%s already holds %d snapshot(s) of an earlier run (epochs %d to %d). This new run (no --continue) "
                "writes over them epoch by epoch; those it does not reach stay, and --continue would later resume "
                "from the highest epoch in the folder. To keep the earlier run, stop now (Ctrl+C) and give "
                "another output_dir (--set output_dir=...); to resume it, add --continue.",
                snapshot_dir(cfg), len(found), min(epochs), max(epochs))

    def make_batch_generator(self) -> None:
        from data.dataset import DeepHandMeshDataset

        cfg = self.cfg
        log.info("Creating dataset from %s (subject %d)...", cfg.data_dir, cfg.subject)
        self.hand_model = training_hand_model(cfg)
        log.info("hand model: %s (%d vertices, %d faces, %d joints)", self.hand_model.source,
                 self.hand_model.vertex_num, len(self.hand_model.faces), self.hand_model.joint_num)
        self.gt_poses = load_gt_poses(cfg.data_dir, self.hand_model.joint_num) if cfg.pose_source == "gt" else None
        if self.gt_poses is not None:
            log.info("decoder-only: ground-truth angles of %d frames from gt/frames.npz; the encoder is bypassed",
                     len(self.gt_poses))
        self.dataset = DeepHandMeshDataset.from_config(cfg, "train", self.hand_model, seed=self.seed)
        self.batch_size = cfg.train_batch_size * max(1, len(self.gpu_ids))  # per GPU, as the original
        workers = loader_workers(cfg)
        # One sampler for one process and for many: DistributedSampler draws epoch e's permutation
        # from its seed epoch_seed(0) + e = epoch_seed(e) (set_epoch in prepare_epoch) and deals
        # it out in turn to the processes, so the samples of a step do not depend on how many
        # processes share it.
        self.sampler = torch.utils.data.DistributedSampler(
            self.dataset, num_replicas=self.world_size, rank=0 if self.context is None else self.context.rank,
            shuffle=True, seed=self.epoch_seed(0), drop_last=False)
        self.batch_generator = make_loader(self.dataset, self.batch_size, self.device, workers, self.sampler)
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
        # up to float rounding (1 ulp), several times faster on the CPU (BENCHMARKS.md).
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
            align_optimizer_state(self.optimizer)
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
        """The seed of epoch ``epoch``'s sample order: ``seed * 1_000_003 + epoch``.

        Epoch ``e`` visits the samples in the order
        ``torch.randperm(len(dataset), generator=torch.Generator().manual_seed(epoch_seed(e)))``;
        with ``N`` processes, rank ``r`` takes its positions ``r, r + N, ...`` (the permutation
        repeated from its start to fill a last incomplete step). The factor keeps the seeds of
        nearby ``--seed`` values apart (seed 1's epoch 0 is not seed 0's epoch 1)."""
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

        self.prepare_epoch(epoch)
        self.tot_timer, self.gpu_timer, self.read_timer = Timer(), Timer(), Timer()
        sums: Dict[str, float] = {}
        self.skip_report = SkipReport()
        bar = tqdm(self.batch_generator, total=self.itr_per_epoch, desc=f"epoch {epoch}/{self.cfg.end_epoch}",
                   unit="itr", leave=False, dynamic_ncols=True, disable=not self.is_main)
        self.tot_timer.tic()
        self.read_timer.tic()
        for itr, batch in enumerate(bar):
            self.read_timer.toc()
            self.gpu_timer.tic()
            self.skip_report.add(batch)
            inputs, targets, meta_info = split_batch(batch, self.device, non_blocking=self.device.type == "cuda")
            attach_gt_pose(inputs, batch["frame"], self.gt_poses, self.device)
            values = self.train_step(inputs, targets, meta_info, f"epoch {epoch} iteration {itr}")
            self.gpu_timer.toc()
            self.tot_timer.toc()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{values['total']:.3f}")
            self.log_iteration(epoch, itr, values, (inputs, targets, meta_info))
            self.tot_timer.tic()
            self.read_timer.tic()
        bar.close()
        if self.skip_report.count:
            log.warning("epoch %d: %s (on_error='skip')", epoch, self.skip_report.summary())
        count = max(1, len(bar))
        return {k: v / count for k, v in sums.items()}

    def train_step(self, inputs, targets, meta_info, where: str) -> Dict[str, float]:
        """One optimizer step on a batch; returns each loss's mean (averaged over the processes,
        so that every process sees the same values and stops together on a non-finite one: a lone
        stop would leave the others waiting) and their ``total``. Raises ``FloatingPointError``
        naming ``where`` on a non-finite loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = {k: v.mean() for k, v in self.model(inputs, targets, meta_info, "train").items()}
        total = sum(loss.values())
        mean_values = distributed.average_tensor(torch.stack([v.detach().float() for v in loss.values()]))
        values = dict(zip(loss, mean_values.tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            raise FloatingPointError(f"{where}: non-finite loss ({shown}); lower the learning rate "
                                     f"(cfg.lr = {self.cfg.lr:g})")
        if total.requires_grad:  # nothing learns in decoder-only plain LBS: losses only
            total.backward()
            self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the timers measure the step, not its launch
        values["total"] = sum(values.values())
        return values

    def log_iteration(self, epoch: int, itr: int, values: Dict[str, float], batch) -> None:
        """The iteration's log line (losses, learning rate, speed) and TensorBoard scalars; every
        ``tensorboard_image_interval`` iterations the depth panel of ``batch`` (inputs, targets,
        meta_info)."""
        samples_per_s = self.batch_size * self.world_size / max(self.tot_timer.average, 1e-9)
        screen = [
            f"Epoch {epoch}/{self.cfg.end_epoch} itr {itr}/{self.itr_per_epoch}:",
            f"lr: {self.get_lr():g}",
            f"speed: {self.tot_timer.average:.2f}s/itr (compute {self.gpu_timer.average:.2f}s, "
            f"data {self.read_timer.average:.2f}s)",
            f"{samples_per_s:.1f} samples/s",
            epoch_time(self.tot_timer.average * self.itr_per_epoch),
        ]
        screen += [f"loss_{k}: {v:.4f}" for k, v in values.items()]
        log.info(" ".join(screen))
        step = epoch * self.itr_per_epoch + itr
        self.summary.scalars({f"loss/{k}": v for k, v in values.items()}, step)
        self.summary.scalars({"lr": self.get_lr(), "samples_per_s": samples_per_s}, step)
        interval = int(self.cfg.tensorboard_image_interval)
        if self.summary.active and interval > 0 and step % interval == 0:
            self.summary.image("depth/crop_rendered_captured_difference", self.depth_panel(*batch), step)

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
            hand, _ = model.pose_on_keypoints(model.angles(inputs), targets["joint_world"], targets["joint_valid"])
            depth = model.objective.render(hand.mesh, meta_info)
        finally:
            model.train(was_training)
        return depth_panel(inputs["img"][0], depth[0, 0], targets["depthmap"][0, 0])

    def save_model(self, epoch: int) -> Path:
        """Rank 0 writes the snapshot (atomically, durably), then applies the retention options
        (:meth:`prune_snapshots`); the others wait for it."""
        path = snapshot_path(self.cfg, epoch)
        if self.is_main:
            save_checkpoint({"epoch": int(epoch), "network": network_state_dict(self.model),
                             "optimizer": optimizer_state_dict(self.optimizer)}, path)
            log.info("Write snapshot into %s", path)
            self.prune_snapshots(epoch)
        distributed.barrier()
        return path

    def prune_snapshots(self, written: int) -> None:
        """Delete the snapshots ``keep_last``/``keep_every`` do not keep
        (:func:`common.io.checkpoint.snapshots_to_delete`). Called only after ``snapshot_<written>``
        is written, flushed and renamed into place, so the snapshot a resume needs is never gone
        before its successor is safely on disk."""
        cfg = self.cfg
        found = dict(run_snapshots(cfg))
        doomed = snapshots_to_delete(list(found), written, cfg.keep_last, cfg.keep_every)
        for epoch in doomed:
            try:
                found[epoch].unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("%s: could not delete it (%s); it stays", found[epoch], err.strerror or err)
        if doomed:
            sync_folder(snapshot_dir(cfg))
            log.info("deleted snapshot(s) of epoch(s) %s (keep_last=%d, keep_every=%d)",
                     ", ".join(map(str, doomed)), cfg.keep_last, cfg.keep_every)

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
