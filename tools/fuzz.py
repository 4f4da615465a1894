"""Fuzz every reader of the project with seeded mutations of real files.

    python tools/fuzz.py --cases 10000 --seed 0            # all kinds, cases dealt out in turn
    python tools/fuzz.py --cases 800 --kinds pts,depthmap --keep output/fuzz
    python tools/fuzz.py --cases 2000 --hand_model data/hand_model --json output/fuzz.json

Files of every kind are made in a temporary folder by the project's own writers, in the released
layout (a hand-model folder: the ``--hand_model`` folder's six files as they are, or the default
hand; a synthetic data set of that hand: ``KRT_512``, ``.pts``, depth-map pickles at several
protocols and dtypes, JPEG images; the demo's pose presets, also as JSON; the configuration
``main/configs/cpu_small.yaml``; a snapshot written by ``save_checkpoint``). Every case takes one
file, applies one to three seeded mutations (delete, duplicate or swap lines, replace a token
with garbage, ``nan``, ``inf``, a huge or non-integer number, insert random bytes, a very long
line, grow the file, truncate, flip bytes, change a byte-order character, overwrite a run of
bytes) and reads it through the reader the scripts use:

=============  ===============================================================================
kind           reader
=============  ===============================================================================
hand_model     ``load_hand_model``, then the kinematic tree, penetration-loss tables, joint
               indices and keypoint mapping the model and the data set build from it
krt            ``DeepHandMeshDataset.from_config`` (reads ``KRT_512``)
pts            ``DeepHandMeshDataset.load_sample`` of a sample of that frame
depthmap       ``DeepHandMeshDataset.load_sample`` (every camera a target view)
image          ``DeepHandMeshDataset.load_sample``
pose           ``build_pose`` (``demo.py --pose``)
config         ``config_from_args`` (``--cfg``)
checkpoint     ``read_checkpoint`` + ``load_checkpoint``
=============  ===============================================================================

Outcomes: *loaded* (and then every number it gave is finite, and a checkpoint's weights are the
ones written), *refused* (the project's error for that reader, one line starting with the file's
path — the hand-model folder for a hand model), or a failure: *unclear* (any other exception or
message) or *accepted* (loaded with a non-finite value or changed weights). Failures are listed
with the mutated file (kept under ``--keep``). After the depth-map cases the fuzzer checks that
numpy's float32 arithmetic and dtype objects are as before. Exit code 0 when there is no
failure, 1 otherwise, 2 for bad arguments.

The checkpoint kind's model is the project's ``Model`` for a 40-vertex piece of the hand, with
a one-layer stand-in for the ResNet backbone and 64 image features: the same layout, keys and
reader as a real snapshot, 1.5 MB instead of 100 MB or more, so that a case takes milliseconds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from common.errors import OptionError, exit_code  # noqa: E402
from common.io.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from common.hand.hand_model import (HAND_MODEL_FILES, HandModel, HandModelError,  # noqa: E402
                                     load_hand_model, save_hand_model)
from common.io.atomic import atomic_write_bytes  # noqa: E402
from common.hand.pose_io import PRESET_DIR, PoseError, build_pose  # noqa: E402
from common.io.safe_pickle import load_depthmap  # noqa: E402
from main.config import Config, ConfigError  # noqa: E402

KINDS = ("hand_model", "krt", "pts", "depthmap", "image", "pose", "config", "checkpoint")
BINARY_KINDS = ("depthmap", "image", "checkpoint")
# A sample's error may start with another of its files when it names the mutated one too (an
# image of another size moves the keypoints' box: the keypoint file's error names the image).
SAMPLE_KINDS = ("pts", "depthmap", "image")
CONFIG_FILE = ROOT / "main" / "configs" / "cpu_small.yaml"
CHECKPOINT_VERTICES = 40
CHECKPOINT_FEATURES = 64


# ------------------------------------------------------------------------------------ mutations
GARBAGE_TOKENS = ("nan", "NaN", "inf", "-inf", "+Infinity", "1e400", "-1e400", "1e38", "1e30", "-1",
                  "0", "3.5", "-0.0", "1e-45", "99999999999999999999", "9" * 5000, "x", "1/2/3",
                  "é", "\u2028", "0x10", "1_000", "True", "null", "~", "[", "{", "'", '"', "- -",
                  ": :", "&a", "*a", "!!python/object:os.system", "#", "", " ")


def _lines_of(data: bytes) -> List[bytes]:
    return data.split(b"\n")


def m_delete_line(data: bytes, rng) -> bytes:
    lines = _lines_of(data)
    del lines[rng.integers(len(lines))]
    return b"\n".join(lines)


def m_duplicate_line(data: bytes, rng) -> bytes:
    lines = _lines_of(data)
    i = rng.integers(len(lines))
    lines.insert(i, lines[i])
    return b"\n".join(lines)


def m_swap_lines(data: bytes, rng) -> bytes:
    lines = _lines_of(data)
    i, j = rng.integers(len(lines), size=2)
    lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


def m_replace_token(data: bytes, rng) -> bytes:
    lines = _lines_of(data)
    i = rng.integers(len(lines))
    words = lines[i].split(b" ")
    token = GARBAGE_TOKENS[rng.integers(len(GARBAGE_TOKENS))].encode("utf-8")
    words[rng.integers(len(words))] = token
    lines[i] = b" ".join(words)
    return b"\n".join(lines)


def m_insert_bytes(data: bytes, rng) -> bytes:
    at = int(rng.integers(len(data) + 1))
    return data[:at] + rng.integers(0, 256, size=int(rng.integers(1, 17)), dtype=np.uint8).tobytes() + data[at:]


def m_long_line(data: bytes, rng) -> bytes:
    at = int(rng.integers(len(data) + 1))
    return data[:at] + b"1" * int(rng.integers(70_000, 200_000)) + data[at:]


def m_grow(data: bytes, rng) -> bytes:
    """The file repeated to about 2-3 MB: over the limit of the small kinds, lines duplicated in others."""
    return data * max(2, int(rng.integers(2_000_000, 3_000_000)) // max(len(data), 1))


def m_truncate(data: bytes, rng) -> bytes:
    return data[:int(rng.integers(len(data) + 1))]


def m_flip_bytes(data: bytes, rng) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        out[int(rng.integers(len(out)))] ^= 1 << int(rng.integers(8))
    return bytes(out)


def m_overwrite_run(data: bytes, rng) -> bytes:
    if not data:
        return data
    at, n = int(rng.integers(len(data))), int(rng.integers(1, 65))
    fill = (rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() if rng.random() < 0.5 else
            bytes([int(rng.integers(256))]) * n)
    return data[:at] + fill + data[at + n:]


def m_byte_order(data: bytes, rng) -> bytes:
    """One ``<`` becomes ``>`` (or the reverse): a pickled dtype's byte order."""
    spots = [i for i, b in enumerate(data) if b in b"<>"]
    if not spots:
        return m_flip_bytes(data, rng)
    i = spots[int(rng.integers(len(spots)))]
    return data[:i] + (b">" if data[i:i + 1] == b"<" else b"<") + data[i + 1:]


def m_duplicate_chunk(data: bytes, rng) -> bytes:
    if not data:
        return data
    at, n = int(rng.integers(len(data))), int(rng.integers(1, 257))
    return data[:at] + data[at:at + n] + data[at:]


# name: (mutation, weight); content-level mutations are drawn more often than those that make a
# text file unreadable as a whole (bytes, a huge line, a huge file)
TEXT_MUTATIONS: Dict[str, Tuple[Callable, float]] = {
    "replace_token": (m_replace_token, 4), "delete_line": (m_delete_line, 1),
    "duplicate_line": (m_duplicate_line, 1), "swap_lines": (m_swap_lines, 1),
    "truncate": (m_truncate, 1), "insert_bytes": (m_insert_bytes, 0.7), "flip_bytes": (m_flip_bytes, 0.7),
    "long_line": (m_long_line, 0.3), "grow": (m_grow, 0.3),
}
BINARY_MUTATIONS: Dict[str, Tuple[Callable, float]] = {
    "insert_bytes": (m_insert_bytes, 1), "truncate": (m_truncate, 1), "flip_bytes": (m_flip_bytes, 2),
    "overwrite_run": (m_overwrite_run, 1), "byte_order": (m_byte_order, 1),
    "duplicate_chunk": (m_duplicate_chunk, 1),
}


def mutate(data: bytes, binary: bool, rng) -> Tuple[bytes, List[str]]:
    """One to three seeded mutations of ``data``; returns the bytes and the mutations' names."""
    table = BINARY_MUTATIONS if binary else TEXT_MUTATIONS
    names = list(table)
    weights = np.array([table[n][1] for n in names], np.float64)
    applied = []
    for _ in range(int(rng.integers(1, 4))):
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        data = table[name][0](data, rng)
        applied.append(name)
    return data, applied


# ------------------------------------------------------------------------------------ checks
def _finite(*arrays) -> bool:
    """Every array finite, also once converted to float32 (the model's precision)."""
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        if a.dtype.kind in "fc":
            with np.errstate(over="ignore", invalid="ignore"):
                if not (np.isfinite(a).all() and np.isfinite(a.astype(np.float32)).all()):
                    return False
    return True


def numpy_fingerprint() -> Tuple:
    """Float32 arithmetic and dtype objects, to compare before and after reading many pickles."""
    f4 = np.dtype(np.float32)
    x = np.arange(1, 1001, dtype=np.float32)
    return (f4.byteorder, f4.itemsize, f4.kind, f4.char, f4.str, f4.isnative, f4.fields, f4.subdtype,
            np.dtype("f8").str, np.dtype(">f4").str, np.dtype("u2").str, float(x.sum()),
            float((x * np.float32(0.5)).sum()), float(np.float32(1) / np.float32(3)),
            bytes(np.array([1.0, 2.0], "<f4").tobytes()), np.array([[1, 2]], np.float32).T.tobytes())


# ------------------------------------------------------------------------------------ the kinds
@dataclass
class Kind:
    """One kind of file: the files to mutate, the reader, the check of what it loaded."""

    name: str
    files: List[Path]
    read: Callable[[Path], object]
    check: Callable[[object], Optional[str]]  # None, or what was wrongly accepted
    errors: Tuple[type, ...]
    expected_prefix: Callable[[Path], str]
    bases: Dict[Path, List[bytes]] = field(default_factory=dict)  # per file: the real variants
    root: Optional[Path] = None  # the data set's folder, for SAMPLE_KINDS

    @property
    def binary(self) -> bool:
        return self.name in BINARY_KINDS


def small_piece(hand: HandModel, vertices: int) -> HandModel:
    """The first faces of ``hand`` covering about ``vertices`` vertices, as a valid hand model."""
    used: List[int] = []
    seen = set()
    faces = []
    for f, ft in zip(hand.faces, hand.face_uvs):
        new = [v for v in f if v not in seen]
        if len(used) + len(set(new)) > vertices and faces:
            break
        for v in f:
            if v not in seen:
                seen.add(int(v))
                used.append(int(v))
        faces.append((f, ft))
    remap = {v: i for i, v in enumerate(used)}
    uv_used = sorted({int(t) for _, ft in faces for t in ft})
    uv_remap = {t: i for i, t in enumerate(uv_used)}
    return HandModel(
        list(hand.joint_names), hand.parents.copy(), hand.vertices_cm[used].copy(), hand.uvs[uv_used].copy(),
        np.array([[remap[int(v)] for v in f] for f, _ in faces], np.int64),
        np.array([[uv_remap[int(t)] for t in ft] for _, ft in faces], np.int64), hand.skinning_weights[used].copy(),
        hand.local_pose.copy(), hand.global_pose.copy(), hand.global_pose_inv.copy(),
        source=f"<piece of {hand.source}>").validate()


class TinyBackbone(torch.nn.Module):
    """Stands for the ResNet in the checkpoint kind (module notes): image -> feature vector."""

    def __init__(self, feat_dim: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, feat_dim)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.fc(img.mean(dim=(2, 3)))


def checkpoint_model(hand: HandModel, config: Config):
    from main.model import Model, PoseNet, SkeletonRefineNet, SkinRefineNet

    piece = small_piece(hand, CHECKPOINT_VERTICES)
    return Model(TinyBackbone(config.backbone_img_feat_dim),
                 PoseNet(torch.from_numpy(piece.dof_mask), config.backbone_img_feat_dim),
                 SkeletonRefineNet(piece.joint_num, config.id_code_dim),
                 SkinRefineNet(piece.joint_num, piece.vertex_num, config.id_code_dim),
                 piece, config.id_code_dim, config)


def build_kinds(work: Path, hand_dir: Optional[str], selected: Sequence[str],
                hand_vertices: Optional[int] = None) -> Dict[str, Kind]:
    """Write the real files into ``work`` and describe every kind."""
    from main.options import config_from_args
    from common.nets.loss import PenetLoss
    from common.hand.kinematics import KinematicTree
    from data.dataset import DataFormatError, DeepHandMeshDataset, SampleError, hand_model_pts_index
    from data.make_synthetic import generate

    hand_folder = work / "hand_model"
    if hand_dir and not hand_vertices:
        hand_folder.mkdir(parents=True)
        for name in HAND_MODEL_FILES:
            shutil.copyfile(Path(hand_dir) / name, hand_folder / name)
    else:
        from common.hand.hand_model_source import resolve_hand_model

        hand = resolve_hand_model(hand_dir) if hand_dir else resolve_hand_model()
        save_hand_model(small_piece(hand, hand_vertices) if hand_vertices else hand, hand_folder)
    hand = load_hand_model(hand_folder)

    data_dir = work / "data"
    generate(data_dir, hand, seed=0, sequences=1, frames=2, cameras=3, image_hw=(64, 42),
             depth_hw=(32, 21), progress=False)
    config = Config()
    config.data_dir = str(data_dir)
    config.render_view_num = 3  # every camera a target view: every depth map of the frame is read
    config.on_error = "stop"
    dataset = DeepHandMeshDataset.from_config(config, "train", hand, seed=0)
    frame0 = [i for i, (_s, _c, f) in enumerate(dataset.samples) if f == 0][0]
    _s, cam0, _f = dataset.samples[frame0]

    def sample_ok(sample) -> Optional[str]:
        tensors = [v for v in sample.values() if isinstance(v, torch.Tensor)]
        if not _finite(*tensors):
            return "a non-finite value in the sample"
        if float(sample["depthmap"].min()) < 0:
            return "a negative depth in the sample"
        return None

    def read_sample(_path: Path):
        return dataset.load_sample(frame0)

    kinds: Dict[str, Kind] = {}
    same = lambda p: str(p)  # noqa: E731

    # hand model: load it, then everything the model and the data set build from it
    def read_hand(_path: Path):
        model = load_hand_model(hand_folder)
        KinematicTree.from_parents(model.parents)
        PenetLoss.from_hand_model(model)  # (the Laplacian needs only the faces validate() checked)
        _ = model.align_joint_indices, model.dof_mask, model.tree_order
        hand_model_pts_index(model)
        return model

    def hand_ok(model: HandModel) -> Optional[str]:
        rest = model.global_pose @ model.global_pose_inv
        if not _finite(model.vertices, model.uvs, model.skinning_weights, model.local_pose,
                       model.global_pose, model.global_pose_inv, rest):
            return "a non-finite number in the hand model"
        return None

    kinds["hand_model"] = Kind("hand_model", [hand_folder / n for n in HAND_MODEL_FILES], read_hand,
                               hand_ok, (HandModelError, ValueError), lambda p: str(hand_folder))

    def read_krt(_path: Path):
        return DeepHandMeshDataset.from_config(config, "train", hand, seed=0)

    def krt_ok(ds) -> Optional[str]:
        return None if _finite(ds.camrot, ds.campos, ds.focal, ds.princpt) else "a non-finite camera"

    kinds["krt"] = Kind("krt", [dataset.krt_path], read_krt, krt_ok, (DataFormatError, ValueError), same)
    kinds["pts"] = Kind("pts", [dataset.keypoint_path(0)], read_sample, sample_ok, (SampleError,), same)
    depth_files = [dataset.depthmap_path(0, c) for c in dataset.cameras]
    kinds["depthmap"] = Kind("depthmap", depth_files, read_sample, sample_ok, (SampleError,), same)
    for path in depth_files:  # numpy's pickles of the map at every protocol and three dtypes
        depth = load_depthmap(path)
        variants = [path.read_bytes()]
        for dtype in (np.float32, np.float64, np.uint16):
            for protocol in (0, 2, 4, 5):
                variants.append(pickle.dumps(depth.astype(dtype), protocol=protocol))
        variants.append(pickle.dumps(np.asfortranarray(depth.astype(">f4")), protocol=2))
        kinds["depthmap"].bases[path] = variants
    kinds["image"] = Kind("image", [dataset.image_path(frame0)], read_sample, sample_ok, (SampleError,), same)
    for name in SAMPLE_KINDS:
        kinds[name].root = data_dir

    # pose files: every preset, and one as JSON
    pose_dir = work / "poses"
    pose_dir.mkdir()
    pose_files = []
    for preset in sorted(PRESET_DIR.glob("*.yaml")):
        shutil.copyfile(preset, pose_dir / preset.name)
        pose_files.append(pose_dir / preset.name)
    fist = yaml.safe_load((PRESET_DIR / "fist.yaml").read_text(encoding="utf-8"))
    (pose_dir / "fist.json").write_text(json.dumps(fist, indent=1) + "\n", encoding="utf-8")
    pose_files.append(pose_dir / "fist.json")

    def pose_ok(euler) -> Optional[str]:
        return None if _finite(euler) else "a non-finite angle"

    kinds["pose"] = Kind("pose", pose_files, lambda p: build_pose(hand, str(p)), pose_ok, (PoseError,), same)

    config_file = work / "cpu_small.yaml"
    shutil.copyfile(CONFIG_FILE, config_file)

    def read_config(path: Path):
        args = argparse.Namespace(cfg_file=str(path), assignments=[], data_dir=None, subject=None, gpu_ids="")
        return config_from_args(args, Config())

    def config_ok(cfg: Config) -> Optional[str]:
        for name, value in cfg.options().items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    return f"option {name} = {value!r}"
        return None

    kinds["config"] = Kind("config", [config_file], read_config, config_ok, (ConfigError,), same)

    if "checkpoint" in selected:
        ck_config = Config()
        ck_config.backbone_img_feat_dim = CHECKPOINT_FEATURES
        torch.manual_seed(0)
        model = checkpoint_model(hand, ck_config)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        sum(p.square().sum() for p in model.parameters()).backward()
        optimizer.step()
        network = {"module." + k: v.clone() for k, v in model.state_dict().items()}
        snapshot = work / "snapshot_3.pth.tar"
        save_checkpoint({"epoch": 3, "network": network, "optimizer": optimizer.state_dict()}, snapshot)
        target = checkpoint_model(hand, ck_config)

        def read_snapshot(path: Path):
            load_checkpoint(target, path)
            return target

        def snapshot_ok(loaded) -> Optional[str]:
            state = loaded.state_dict()
            changed = [k for k, v in network.items() if not torch.equal(state[k[len("module."):]], v)]
            return f"changed weights: {changed[:3]}" if changed else None

        kinds["checkpoint"] = Kind("checkpoint", [snapshot], read_snapshot, snapshot_ok, (CheckpointError,), same)
    return {k: kinds[k] for k in selected}


# ------------------------------------------------------------------------------------ running
@dataclass
class Tally:
    cases: int = 0
    loaded: int = 0
    refused: int = 0
    unclear: int = 0
    accepted: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def quiet_stderr():
    """Silence the C libraries' own warnings (libjpeg's 'Corrupt JPEG data' for every image case)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def classify(kind: Kind, path: Path, run: Callable[[], object]) -> Tuple[str, str]:
    """``(outcome, detail)`` of reading the mutated ``path``."""
    try:
        value = run()
    except kind.errors as err:
        message = str(err)
        prefix = kind.expected_prefix(path)
        if "\n" in message:
            return "unclear", f"{type(err).__name__} over several lines: {message[:300]!r}"
        if not (message.startswith(prefix) or (kind.name in SAMPLE_KINDS and message.startswith(str(kind.root))
                                                and str(path) in message)):
            return "unclear", f"{type(err).__name__} not naming {prefix}: {message[:300]}"
        return "refused", message
    except Exception as err:  # noqa: BLE001 - everything else is what the fuzzer looks for
        return "unclear", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    problem = kind.check(value)
    return ("accepted", problem) if problem else ("loaded", "")


def run_fuzz(cases: int, seed: int, kinds: Sequence[str] = KINDS, hand_dir: Optional[str] = None,
             keep: Optional[Path] = None, log: Callable[[str], None] = print,
             hand_vertices: Optional[int] = None) -> Dict[str, object]:
    """Run ``cases`` cases dealt out to ``kinds`` in turn; returns the report (see :func:`main`)."""
    started = time.perf_counter()
    fingerprint = numpy_fingerprint()
    failures: List[Dict[str, object]] = []
    tallies = {k: Tally() for k in kinds}
    refusals: Dict[str, Dict[str, int]] = {k: {} for k in kinds}
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        table = build_kinds(Path(tmp), hand_dir, kinds, hand_vertices)
        originals = {p: p.read_bytes() for kind in table.values() for p in kind.files}
        for case in range(cases):
            kind = table[kinds[case % len(kinds)]]
            rng = np.random.default_rng([seed, case])
            path = kind.files[int(rng.integers(len(kind.files)))]
            bases = kind.bases.get(path, [originals[path]])
            base = bases[int(rng.integers(len(bases)))]
            data, applied = mutate(base, kind.binary, rng)
            t0 = time.perf_counter()
            path.write_bytes(data)
            try:
                with quiet_stderr() if kind.name == "image" else contextlib.nullcontext():
                    outcome, detail = classify(kind, path, lambda: kind.read(path))
            finally:
                path.write_bytes(originals[path])
            tally = tallies[kind.name]
            tally.cases += 1
            tally.seconds += time.perf_counter() - t0
            setattr(tally, outcome, getattr(tally, outcome) + 1)
            if outcome == "refused":
                key = _message_class(detail, str(path))
                refusals[kind.name][key] = refusals[kind.name].get(key, 0) + 1
            if outcome in ("unclear", "accepted"):
                kept = None
                if keep is not None:
                    kept = Path(keep) / f"{kind.name}_case{case}_{path.name}"
                    atomic_write_bytes(kept, data)
                failures.append({"kind": kind.name, "case": case, "file": path.name, "mutations": applied,
                                 "outcome": outcome, "detail": detail, "kept": None if kept is None else str(kept)})
                log(f"{outcome}: {kind.name} case {case} ({path.name}, {'+'.join(applied)}): {detail}"
                    + (f" [kept as {kept}]" if kept else ""))
    numpy_ok = numpy_fingerprint() == fingerprint
    return {
        "cases": cases, "seed": seed, "seconds": time.perf_counter() - started,
        "kinds": {k: vars(t) for k, t in tallies.items()},
        "refusal_kinds": refusals, "failures": failures, "numpy_state_unchanged": numpy_ok,
    }


def _message_class(message: str, path: str) -> str:
    """A refusal's message without the path, line number and numbers: groups similar refusals."""
    text = message[len(path):] if message.startswith(path) else message
    words = []
    for word in text.split()[:8]:
        words.append("#" if any(ch.isdigit() for ch in word) else word)
    return " ".join(words)


def format_report(report: Dict[str, object]) -> str:
    lines = [f"{'kind':<12} {'cases':>6} {'loaded':>7} {'refused':>8} {'unclear':>8} {'accepted':>9} "
             f"{'ms/case':>8}"]
    for name, t in report["kinds"].items():
        per = 1000 * t["seconds"] / max(t["cases"], 1)
        lines.append(f"{name:<12} {t['cases']:>6} {t['loaded']:>7} {t['refused']:>8} {t['unclear']:>8} "
                     f"{t['accepted']:>9} {per:>8.1f}")
    total = {k: sum(t[k] for t in report["kinds"].values()) for k in ("cases", "loaded", "refused", "unclear", "accepted")}
    lines.append(f"{'all':<12} {total['cases']:>6} {total['loaded']:>7} {total['refused']:>8} "
                 f"{total['unclear']:>8} {total['accepted']:>9}")
    lines.append(f"numpy float32 arithmetic and dtypes after the run: "
                 f"{'unchanged' if report['numpy_state_unchanged'] else 'CHANGED'}")
    lines.append(f"{report['cases']} cases, seed {report['seed']}, {report['seconds']:.1f} s")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=800, help="number of cases, dealt out to the kinds in turn")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutations")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {', '.join(KINDS)}")
    parser.add_argument("--hand_model", help="hand-model folder whose files are fuzzed (default: the default hand)")
    parser.add_argument("--hand_vertices", type=int,
                        help="fuzz a piece of about this many vertices of the hand instead of all of it "
                             "(faster cases; the files are written by save_hand_model)")
    parser.add_argument("--keep", help="folder to keep the files of failed cases in")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument("--refusals", action="store_true", help="list the kinds of refusal messages per kind")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: fuzz(args))


def fuzz(args) -> int:
    """Run the cases, print the report (and write it as JSON); 1 when a failure was found."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or args.cases < 1 or (args.hand_vertices is not None and args.hand_vertices < 3):
        raise OptionError(f"--kinds must be a subset of {', '.join(KINDS)} and --cases positive "
                          f"(got {args.kinds!r}, {args.cases}), --hand_vertices at least 3")
    report = run_fuzz(args.cases, args.seed, kinds, args.hand_model, args.keep, hand_vertices=args.hand_vertices)
    print(format_report(report))
    if args.refusals:
        for kind, classes in report["refusal_kinds"].items():
            print(f"{kind}:")
            for text, n in sorted(classes.items(), key=lambda kv: -kv[1]):
                print(f"  {n:6d}  {text}")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    bad = report["failures"] or not report["numpy_state_unchanged"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
