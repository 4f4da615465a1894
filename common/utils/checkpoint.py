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
from typing import Any, Dict, List, Optional, Tuple

import torch

from common.utils.device import unwrap

# Buffers of the original's loss modules; they are derived from the hand model, so we skip them.
TOLERATED_PREFIXES = ("penet_loss.", "lap_loss.", "depthmap_loss.", "joint_loss.")
DIGEST_KEY = "tensor_digest"
DIGEST_PREFIX = "sha256:"
SNAPSHOT_RE = re.compile(r"^snapshot_(\d+)\.pth\.tar$")


class CheckpointError(ValueError):
    """A snapshot that cannot be used with this model; the message names the file and the mismatch."""


def read_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a snapshot safely (tensors and plain containers only) and check its digest when it has
    one (module notes). The returned dict no longer holds the digest.

    Raises:
        CheckpointError: missing, unreadable, not a snapshot, or its digest does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt zip or pickle raises many different types
        text = str(err).strip()
        first = text.splitlines()[0][:300] if text else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch snapshot, or it holds more than tensors "
                              f"and plain containers ({first})") from None
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


def _absent_parts(own_keys, present) -> List[str]:
    """The modules of the model the snapshot holds nothing of, as a user names them: a top-level
    module when all of it is absent (``backbone_net``), else its absent children (``pose_net.fc``)."""
    absent = [k for k in own_keys if k not in present]
    parts = set()
    for key in absent:
        top = key.split(".")[0]
        whole = all(k not in present for k in own_keys if k.split(".")[0] == top)
        parts.add(top if whole else ".".join(key.split(".")[:2]))
    return sorted(parts)


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


def load_decoder_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> Tuple[Dict[str, Any], List[str]]:
    """Load what decoding needs from a snapshot: as the original's demo (``strict=False``), a file
    holding every decoder key (:data:`DECODER_PREFIXES`) loads even without the encoder's weights,
    for example a personalised hand shared without its backbone.

    Returns:
        ``(snapshot dict, absent)``: ``absent`` names the parts of the model the file does not hold
        (e.g. ``['backbone_net', 'pose_net.fc']``); they keep their current weights.
    Raises:
        CheckpointError: as :func:`load_checkpoint`, and when a decoder key is missing (named).
    """
    ckpt = read_checkpoint(path)
    state = _checked_state(model, path, ckpt, required=lambda key: key.startswith(DECODER_PREFIXES))
    absent = _absent_parts(list(model.state_dict()), state)
    model.load_state_dict(state, strict=False)
    return ckpt, absent


def _checked_state(model: torch.nn.Module, path, ckpt: Dict[str, Any], required) -> Dict[str, torch.Tensor]:
    """The snapshot's cleaned state dict after every check; ``required(key)`` tells which of the
    model's keys it must hold."""
    state = clean_state_dict(ckpt["network"])
    ckpt_v, ckpt_j = _counts(state)
    if (ckpt_v not in (None, model.vertex_num)) or (ckpt_j not in (None, model.joint_num)):
        raise CheckpointError(
            f"{path}: the checkpoint is for a hand model with {ckpt_v if ckpt_v is not None else '?'} vertices "
            f"and {ckpt_j if ckpt_j is not None else '?'} joints, but the hand model "
            f"({model.hand_model.source}) has {model.vertex_num} vertices and {model.joint_num} joints"
        )
    dof = state.get("pose_net.DoF")
    if dof is not None and not torch.equal(dof.cpu().float(), model.pose_net.DoF.cpu()):
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


def save_checkpoint(state: Dict[str, Any], path: str | os.PathLike) -> None:
    """Write a snapshot atomically (a crash mid-write never leaves a broken file at ``path``),
    with its digest under :data:`DIGEST_KEY` (module notes)."""
    state = {k: v for k, v in state.items() if k != DIGEST_KEY}
    state[DIGEST_KEY] = snapshot_digest(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fp:
        torch.save(state, fp)
        fp.flush()
        os.fsync(fp.fileno())
    os.replace(tmp, path)


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
    folder = snapshot_dir(config)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder)
             if (m := SNAPSHOT_RE.match(name))]
    return max(found) if found else None


def network_state_dict(model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model's state dict with DataParallel's ``module.`` prefix, as the original saves it
    (whether or not the model is wrapped here), so the original's tooling reads our snapshots."""
    return OrderedDict(("module." + k, v) for k, v in unwrap(model).state_dict().items())
