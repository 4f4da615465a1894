"""Loading and saving snapshots in the original layout (docs/design.md, "Checkpoints").

A snapshot is ``{'epoch', 'network': state_dict, 'optimizer': state_dict}``; the original's
``network`` comes from a ``DataParallel`` model, so its keys carry a ``module.`` prefix, and its
loss modules may add buffers (``penet_loss.segmentation``, ``lap_loss.laplacian``). Both load here.
Snapshots are read with ``weights_only=True``: a file cannot run code.

Integrity. The zip format torch writes does not protect the tensors' bytes: a flipped byte in a
weight loads as a changed weight. The snapshots this project writes therefore carry
``'tensor_digest': 'sha256:…'``, a digest of everything else in the file (every tensor's dtype,
shape and bytes, every number and name, in order); the original's loader reads only ``epoch``,
``network`` and ``optimizer`` and ignores it. :func:`read_checkpoint` recomputes it and refuses a
snapshot that does not match; a snapshot without one (the original's) loads as before.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

from common.errors import FileFormatError
from common.utils.device import unwrap
from common.io.atomic import cannot_write, make_folder, sync_folder

# Buffers of the original's loss modules; they are derived from the hand model, so we skip them.
TOLERATED_PREFIXES = ("penet_loss.", "lap_loss.", "depthmap_loss.", "joint_loss.")
DIGEST_KEY = "tensor_digest"
DIGEST_PREFIX = "sha256:"
SNAPSHOT_RE = re.compile(r"^snapshot_(\d+)\.pth\.tar$")


class CheckpointError(FileFormatError):
    """A snapshot that cannot be used with this model; the message names the file and the mismatch."""


def load_tensor_file(path: Path, error: type, what: str) -> Any:
    """``torch.load`` of a file of tensors and plain containers only (never code: ``weights_only``),
    on the CPU; any failure becomes ``error('<path>: not a readable PyTorch <what> (<first line of
    the reason>)')``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt zip or pickle raises many different types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise error(f"{path}: not a readable PyTorch {what} ({first})") from None


def read_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a snapshot safely (tensors and plain containers only) and check its digest when it has
    one (module notes). The returned dict no longer holds the digest.

    Raises:
        CheckpointError: missing, unreadable, not a snapshot, or its digest does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    ckpt = load_tensor_file(path, CheckpointError, "snapshot, or it holds more than tensors and plain containers")
    if not isinstance(ckpt, dict) or "network" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a snapshot dict with a 'network' state dict, found {keys}")
    if DIGEST_KEY in ckpt:
        digest = ckpt.pop(DIGEST_KEY)
        if not isinstance(digest, str) or not digest.startswith(DIGEST_PREFIX):
            raise CheckpointError(f"{path}: malformed '{DIGEST_KEY}' entry; the file is corrupted")
        if snapshot_digest(ckpt) != digest:
            raise CheckpointError(f"{path}: the snapshot's contents do not match the digest it was "
                                  "written with; the file is corrupted (truncated, or bytes changed)")
    network = ckpt["network"]
    if not isinstance(network, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in network.items()):
        raise CheckpointError(f"{path}: 'network' is not a state dict of named tensors")
    return ckpt


def snapshot_digest(ckpt: Mapping) -> str:
    """``'sha256:<hex>'`` of a snapshot's entries other than the digest itself, in order."""
    digest = hashlib.sha256()
    _feed(digest, "", {k: v for k, v in ckpt.items() if k != DIGEST_KEY})
    return DIGEST_PREFIX + digest.hexdigest()


def _feed(digest, key: str, value: Any) -> None:
    """Add ``value`` (named ``key``) to ``digest``: tensors by dtype, shape and bytes, containers
    item by item, other values by type and ``repr``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.layout != torch.strided:  # sparse: its indices and values
            tensor = tensor.coalesce()
            _feed(digest, key + "/indices", tensor.indices())
            _feed(digest, key + "/values", tensor.values())
            return
        digest.update(f"T{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"D{key}|{len(value)}\n".encode())
        for k, v in value.items():
            _feed(digest, f"{key}/{type(k).__name__}:{k!r}", v)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{key}|{type(value).__name__}|{len(value)}\n".encode())
        for i, v in enumerate(value):
            _feed(digest, f"{key}/{i}", v)
    else:
        digest.update(f"V{key}|{type(value).__name__}|{value!r}\n".encode())


def clean_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix of DataParallel/DDP snapshots and the loss modules' buffers."""
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith(TOLERATED_PREFIXES):
            continue
        out[key] = value
    return out


def _counts(state: Dict[str, torch.Tensor]):
    """(vertex count, joint count) a state dict was trained for, when it says."""
    verts = state.get("skin_refine_net.fc_pose.2.weight")
    if verts is None:
        verts = state.get("skin_refine_net.fc_id.2.weight")
    joints = state.get("pose_net.DoF")
    if joints is None:
        skeleton = state.get("skeleton_refine_net.fc_skeleton.2.weight")
        joints = None if skeleton is None else skeleton.shape[0] // 3
    else:
        joints = joints.shape[0]
    return (None if verts is None else verts.shape[0] // 3, joints)


# What decoding reads: the identity code and the corrective networks (``pose_net.DoF`` is checked
# when present). The encoder (``backbone_net.*``, ``pose_net.fc.*``) only turns images into angles.
DECODER_PREFIXES = ("id_code", "skeleton_refine_net.", "skin_refine_net.")
# The encoder's parts as a user names them; a decoder-only load ignores them, whatever the backbone.
ENCODER_PARTS = ("backbone_net", "pose_net.fc", "pose_net.DoF")
ENCODER_PREFIXES = ("backbone_net.", "pose_net.")


class DecoderLoad(NamedTuple):
    """What :func:`load_decoder_checkpoint` read: the snapshot dict, the encoder parts it does not
    hold (``['backbone_net', 'pose_net']``) and those it holds that decoding ignores
    (``['backbone_net (ResNet-18)', 'pose_net.fc']``)."""

    ckpt: Dict[str, Any]
    absent: List[str]
    ignored: List[str]


def _holds(state, part: str) -> bool:
    return any(k == part or k.startswith(part + ".") for k in state)


def encoder_parts(state: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """``(absent, present)``: the encoder parts (:data:`ENCODER_PARTS`) a cleaned state dict lacks
    and holds, as a user names them (``pose_net`` when both its parts are absent; the backbone with
    its ResNet depth when it can be told)."""
    absent = [part for part in ENCODER_PARTS if not _holds(state, part)]
    if "pose_net.fc" in absent and "pose_net.DoF" in absent:
        absent = [p for p in absent if not p.startswith("pose_net.")] + ["pose_net"]
    present = [part for part in ENCODER_PARTS if _holds(state, part) and part != "pose_net.DoF"]
    depth = backbone_depth(state)
    present = [f"{p} (ResNet-{depth})" if p == "backbone_net" and depth else p for p in present]
    return absent, present


def backbone_depth(state: Dict[str, torch.Tensor]) -> Optional[int]:
    """The ResNet depth (18, 34, 50, 101, 152) of a state dict's ``backbone_net``, from its number of
    blocks per stage and their kind (bottleneck blocks have a ``conv3``); None when it is none of them."""
    blocks = [0, 0, 0, 0]
    bottleneck = False
    for key in state:
        m = re.match(r"backbone_net\.resnet\.layer([1-4])\.(\d+)\.(\w+)", key)
        if m:
            stage, block = int(m.group(1)) - 1, int(m.group(2))
            blocks[stage] = max(blocks[stage], block + 1)
            bottleneck |= m.group(3) == "conv3"
    known = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
             ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}
    return known.get((tuple(blocks), bottleneck))


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike,
                    ckpt: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load a snapshot (original layout included) into ``model``; every key of the model is needed.

    ``ckpt``: the snapshot already read from ``path`` by :func:`read_checkpoint` (a distributed run
    reads it on one process and sends it to the others); ``path`` then only names it in errors.
    Returns the snapshot dict (``epoch``, ``optimizer`` … as saved).
    Raises:
        CheckpointError: unreadable file, or weights for another hand model (both counts given),
            or keys the model lacks / needs.
    """
    if ckpt is None:
        ckpt = read_checkpoint(path)
    state = _checked_state(model, path, ckpt, required=lambda key: True)
    model.load_state_dict(state)
    return ckpt


def load_decoder_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> DecoderLoad:
    """Load what decoding needs from a snapshot: the identity code and the corrective networks
    (:data:`DECODER_PREFIXES`). As the original's demo (``strict=False``) a file without the encoder
    loads (for example a personalised hand shared without its backbone), and the encoder's weights
    of a file that has them are not read, whatever its backbone (ResNet-18 of ``cpu_small.yaml``,
    ResNet-50 of the original): decoding never uses them. A file made for another hand model (its
    vertex or joint counts, or its degrees of freedom) is still refused.

    ``model``: a decoder (:func:`main.model.get_decoder`), or a full model, whose encoder then
    keeps its current weights.

    Returns:
        :class:`DecoderLoad` ``(ckpt, absent, ignored)``.
    Raises:
        CheckpointError: as :func:`load_checkpoint`, and when a decoder key is missing (named).
    """
    ckpt = read_checkpoint(path)
    full = clean_state_dict(ckpt["network"])
    absent, ignored = encoder_parts(full)
    decoder_state = {k: v for k, v in full.items() if not k.startswith(ENCODER_PREFIXES)}
    _checked_state(model, path, {**ckpt, "network": full}, required=lambda key: key.startswith(DECODER_PREFIXES),
                   only=decoder_state)
    model.load_state_dict(decoder_state, strict=False)
    return DecoderLoad(ckpt, absent, ignored)


def _checked_state(model: torch.nn.Module, path, ckpt: Dict[str, Any], required,
                   only: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The snapshot's cleaned state dict after every check; ``required(key)`` tells which of the
    model's keys it must hold. ``only``: the part of the state dict to match against the model's
    keys (shapes, missing, unexpected); the hand-model checks read the whole snapshot."""
    whole = clean_state_dict(ckpt["network"])
    state = whole if only is None else only
    ckpt_v, ckpt_j = _counts(whole)
    if (ckpt_v not in (None, model.vertex_num)) or (ckpt_j not in (None, model.joint_num)):
        raise CheckpointError(
            f"{path}: the checkpoint is for a hand model with {ckpt_v if ckpt_v is not None else '?'} vertices "
            f"and {ckpt_j if ckpt_j is not None else '?'} joints, but the hand model "
            f"({model.hand_model.source}) has {model.vertex_num} vertices and {model.joint_num} joints"
        )
    dof = whole.get("pose_net.DoF")
    own_dof = torch.as_tensor(model.hand_model.dof_mask, dtype=torch.float32)  # = PoseNet's DoF buffer
    if dof is not None and (dof.shape != own_dof.shape or not torch.equal(dof.cpu().float(), own_dof)):
        raise CheckpointError(
            f"{path}: the checkpoint's degrees of freedom (pose_net.DoF) differ from those of the hand "
            f"model's joint names ({model.hand_model.source})"
        )
    own = model.state_dict()
    wrong_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if wrong_shape:
        k = wrong_shape[0]
        raise CheckpointError(
            f"{path}: {k} has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)} "
            f"(another ResNet depth or feature size? check resnet_type / backbone_img_feat_dim)"
        )
    missing = [k for k in own if k not in state and required(k)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: keys do not match the model: missing {missing[:5]}{' …' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    return state


def decoder_snapshot(model: torch.nn.Module, info: Dict[str, Any],
                     encoder_from: Optional[str | os.PathLike] = None) -> Dict[str, Any]:
    """A snapshot in the original's layout of what decoding reads (:data:`DECODER_PREFIXES`, with
    ``module.`` keys, and ``pose_net.DoF``: the model's, or its hand model's degrees of freedom),
    for :func:`save_checkpoint`; ``info`` goes under ``'personalised'``. ``encoder_from``: a
    snapshot whose encoder (:data:`ENCODER_PREFIXES`) is copied in, so that images can still be read.
    """
    state = model.state_dict()
    network = {f"module.{k}": v.detach().cpu().clone() for k, v in state.items()
               if k.startswith(DECODER_PREFIXES) or k == "pose_net.DoF"}
    if encoder_from is not None:
        for key, value in clean_state_dict(read_checkpoint(encoder_from)["network"]).items():
            if key.startswith(ENCODER_PREFIXES):
                network[f"module.{key}"] = value
    network.setdefault("module.pose_net.DoF", torch.as_tensor(model.hand_model.dof_mask, dtype=torch.float32))
    return {"epoch": 0, "network": network, "personalised": info}


def save_checkpoint(state: Dict[str, Any], path: str | os.PathLike) -> None:
    """Write a snapshot atomically (a crash mid-write never leaves a broken file at ``path``),
    with its digest under :data:`DIGEST_KEY` (module notes)."""
    state = {k: v for k, v in state.items() if k != DIGEST_KEY}
    state[DIGEST_KEY] = snapshot_digest(state)
    path = Path(path)
    make_folder(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fp:
            torch.save(state, fp)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp.exists():
            tmp.unlink()
        raise cannot_write(path, err) from None
    sync_folder(path.parent)  # the rename itself durable before anything counts on it (retention)


# ------------------------------------------------------------------ a run's snapshots
def snapshot_dir(config) -> Path:
    """``model_dir/subject_<N>``: where a run's snapshots are (``config``: the run's configuration)."""
    return Path(config.model_dir) / f"subject_{config.subject}"


def snapshot_path(config, epoch: int) -> Path:
    """``model_dir/subject_<N>/snapshot_<epoch>.pth.tar``, the original's name."""
    return snapshot_dir(config) / f"snapshot_{int(epoch)}.pth.tar"


def latest_snapshot(config) -> Optional[Tuple[int, Path]]:
    """``(epoch, path)`` of the snapshot with the highest epoch, or None. Temporary files of an
    interrupted write (``*.tmp``) are not snapshots."""
    found = run_snapshots(config)
    return found[-1] if found else None


def network_state_dict(model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model's state dict with DataParallel's ``module.`` prefix, as the original saves it
    (whether or not the model is wrapped here), so the original's tooling reads our snapshots.
    Every tensor in the default (contiguous) memory order, whatever the model's (``channels_last``),
    so that a snapshot does not depend on that option."""
    return OrderedDict(("module." + k, _contiguous(v)) for k, v in unwrap(model).state_dict().items())


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with every per-parameter tensor in the default memory order, as
    :func:`network_state_dict`."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: _contiguous(v) for k, v in entry.items()} for i, entry in state["state"].items()}
    return state


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor of ``optimizer`` (Adam's moments) its parameter's
    memory layout, after ``optimizer.load_state_dict``.

    A loaded state keeps the layout it was saved in, and the fused Adam update walks a parameter
    and its moments as flat arrays: a moment in another layout than its parameter (a snapshot of a
    ``channels_last`` run resumed without it, or the other way round) would be applied to the wrong
    elements, silently."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = optimizer.state.get(param, {})
            for key, value in entry.items():
                if (isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0
                        and value.stride() != param.stride()):
                    entry[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _contiguous(value: Any) -> Any:
    return value.contiguous() if isinstance(value, torch.Tensor) and value.layout == torch.strided else value


def run_snapshots(config) -> List[Tuple[int, Path]]:
    """``[(epoch, path)]`` of every snapshot in :func:`snapshot_dir`, by epoch (``*.tmp`` files of
    an interrupted write are not snapshots)."""
    folder = snapshot_dir(config)
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := SNAPSHOT_RE.match(name)))


def snapshots_to_delete(epochs: List[int], written: int, keep_last: int, keep_every: int) -> List[int]:
    """The epochs whose snapshots retention deletes once ``snapshot_<written>`` is safely written.

    Args:
        epochs: the epochs of the snapshots in the folder (``written`` among them).
        written: the epoch just written; it is always kept.
        keep_last: keep the ``keep_last`` most recent snapshots up to ``written``; 0 keeps every one
            (the original's behaviour: nothing is deleted).
        keep_every: also keep ``snapshot_<e>`` for every ``e`` with ``(e + 1) % keep_every == 0``
            (after every ``keep_every`` epochs: ``snapshot_{K-1}``, ``snapshot_{2K-1}``, …); 0: none.
    Snapshots of later epochs than ``written`` (left by an earlier run in the same folder) are not
    this run's to delete and stay.
    """
    if keep_last <= 0:
        return []
    mine = sorted(e for e in set(epochs) if e <= written)
    keep = set(mine[-keep_last:]) | {written}
    if keep_every > 0:
        keep |= {e for e in mine if (e + 1) % keep_every == 0}
    return [e for e in mine if e not in keep]
