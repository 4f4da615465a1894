"""The component study (the paper's "Effect of Identity- and Pose-Dependent Correctives").

Trains, on one synthetic set with one held-out sequence, four variants of the model:

    (a) plain LBS          every corrective held at zero
    (b) + skeleton         the skeleton corrective learns
    (c) + identity         and the identity corrective
    (d) + pose (full)      and the pose corrective: the full model

each in decoder-only mode (``pose_source=gt``: ground-truth angles, encoder bypassed) and with the
encoder (``pose_source=image``), then tests every run on the held-out sequence and writes

    <out>/ablation.md     the table: surface, depth and joint error on the held-out frames (mm)
    <out>/ablation.json   every run's metrics.json, its options and training time
    <out>/ablation.png    one held-out frame: the meshes of (a)-(d) and the truth, coloured by the
                          distance of each vertex to the true surface

Usage (the runs land in ``<out>/<mode>_<variant>/``; a rerun resumes or reuses finished runs):

    python tools/ablation.py --data_dir data/synthetic --holdout 0001_RT_synthetic --out output/ablation \\
        --modes decoder --end_epoch 20 --cfg main/configs/cpu_small.yaml

Decoder-only plain LBS has no parameter that learns; it runs one epoch (the weights of any epoch
are the same). ``--cfg`` and ``--set`` apply to every run (e.g. ``--set lr=0.001``); ``pose_source``,
``correctives``, ``holdout_sequences`` and ``output_dir`` are set by the study.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import metrics  # noqa: E402
from main.options import check_options, resolve_paths  # noqa: E402
from main.tester import Tester  # noqa: E402
from main.trainer import Trainer  # noqa: E402
from common.logger import close_logging, setup_logging  # noqa: E402
from common.errors import exit_code, print_error  # noqa: E402
from common.io.atomic import atomic_write_text  # noqa: E402
from common.utils.vis import render_mesh, save_image  # noqa: E402
from main.config import Config, ConfigError  # noqa: E402

# (key, label, the correctives that learn)
VARIANTS = (
    ("a", "plain LBS", []),
    ("b", "+ skeleton", ["skeleton"]),
    ("c", "+ identity", ["skeleton", "identity"]),
    ("d", "+ pose (full)", ["skeleton", "identity", "pose"]),
)
MODES = {"decoder": "gt", "encoder": "image"}  # mode -> pose_source
COLUMNS = (  # (metrics key, column title)
    ("surface_error_mm", "surface (mean, both ways)"),
    ("surface_out_to_gt_p90_mm", "out→truth p90"),
    ("surface_gt_to_out_p90_mm", "truth→out p90"),
    ("rest_surface_error_mm", "rest surface"),
    ("depth_error_mm", "depth"),
    ("joint_error_mm", "joint"),
    ("mesh_error_mm", "per-vertex"),
)


def run_config(base: Config, mode: str, correctives: List[str], holdout: Sequence[str]) -> Config:
    config = base.copy()
    config.set("pose_source", MODES[mode], "ablation")
    config.set("correctives", list(correctives), "ablation")
    config.set("holdout_sequences", list(holdout), "ablation")
    return config


def train_and_test(config: Config, end_epoch: int, seed: int) -> Dict[str, object]:
    """Train (resuming a run that exists) and test the last snapshot on the held-out sequence."""
    config.set("end_epoch", end_epoch, "--end_epoch")
    config.continue_train = True
    check_options(config)
    start = time.perf_counter()
    trainer = Trainer(config, seed=seed)
    trainer.make_batch_generator()
    trainer.make_model()
    trained_from = trainer.start_epoch
    trainer.train()
    train_seconds = time.perf_counter() - start
    tester = Tester(config, end_epoch - 1, keep_meshes=True)
    tester.make_model()
    tester.make_batch_generator()
    result = tester.test()
    return {"metrics": result, "train_seconds": train_seconds, "trained_epochs": end_epoch - trained_from,
            "meshes": tester.placed_meshes, "hand_model": tester.hand_model, "test_samples": len(tester.dataset)}


def format_table(rows: List[Dict[str, object]]) -> str:
    """The study's Markdown table (mm; lower is better)."""
    head = ["mode", "variant"] + [title for _, title in COLUMNS] + ["training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        m = row["metrics"]
        ident = m.get("identity") or {}
        cells = [row["mode"], f"({row['variant']}) {row['label']}"]
        for key, _ in COLUMNS:
            value = ident.get(key) if key.startswith("rest_") else m.get(key)
            cells.append("n/a" if value is None else f"{value:.2f}")
        cells.append(f"{row['train_seconds'] / 60:.1f} min" if row["trained_epochs"] else "reused")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def colour_of(distance: np.ndarray, vmax: float) -> np.ndarray:
    """``[N]`` mm → ``[N, 3]`` BGR (OpenCV's TURBO map; 0 blue, ``vmax`` and above red)."""
    level = np.clip(np.asarray(distance) / max(vmax, 1e-9), 0, 1)
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0]
    return lut[np.round(level * 255).astype(int)].astype(np.float64)


def label(img: np.ndarray, text: str, scale: float = 0.5) -> np.ndarray:
    bar = np.full((26, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], axis=0)


def colour_bar(width: int, vmax: float) -> np.ndarray:
    """A white strip with the colour ramp from 0 to ``vmax`` mm and its caption."""
    ramp = colour_of(np.linspace(0, vmax, 256), vmax).astype(np.uint8)[None].repeat(16, 0)
    ramp = cv2.resize(ramp, (max(16, min(512, width - 420)), 16), interpolation=cv2.INTER_NEAREST)
    bar = np.full((28, width, 3), 255, np.uint8)
    bar[6:22, 50:50 + ramp.shape[1]] = ramp
    text = f"{vmax:.1f} mm and more: distance of each vertex to the true surface"
    cv2.putText(bar, "0 mm", (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (20, 20, 20), 1, cv2.LINE_AA)
    cv2.putText(bar, text, (56 + ramp.shape[1], 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (20, 20, 20), 1, cv2.LINE_AA)
    return bar


def make_figure(rows: List[Dict[str, object]], gt_frames: Dict[int, np.ndarray], gt_roots: Dict[int, np.ndarray],
                panel: int = 220) -> np.ndarray:
    """One held-out frame (the first evaluated sample of the first run): per mode a row of the
    meshes of (a)-(d) and the truth, palm and side views, coloured by each vertex's distance to
    the true surface (the truth in skin colour). Each row has its own colour scale, up to the 95th
    percentile of its plain-LBS distances (of its first variant when (a) was not run)."""
    hand = rows[0]["hand_model"]
    faces = np.asarray(hand.faces)
    index = min(i for i, (f, _) in rows[0]["meshes"].items() if f in gt_frames)
    frame = rows[0]["meshes"][index][0]
    truth, rotation = gt_frames[frame], gt_roots[frame][:3, :3]
    views = ("palm", "side")
    truth_img = label(render_mesh(truth, faces, panel, views, frame=rotation), "truth")
    gap = lambda t: np.concatenate([t, np.full((t.shape[0], 6, 3), 255, np.uint8)], 1)  # noqa: E731
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        runs = [r for r in rows if r["mode"] == mode]
        dists = [metrics.point_surface_distance(torch.from_numpy(r["meshes"][index][1]), torch.from_numpy(truth),
                                                torch.as_tensor(faces)).numpy() for r in runs]
        vmax = max(float(np.percentile(dists[0], 95)), 0.1)
        tiles = []
        for row, d in zip(runs, dists):
            img = render_mesh(row["meshes"][index][1], faces, panel, views, frame=rotation,
                              face_colors=colour_of(d[faces].mean(1), vmax))
            tiles.append(label(img, f"({row['variant']}) {row['label']}: mean {d.mean():.2f} mm"))
        strip = np.concatenate([gap(t) for t in tiles + [truth_img]], 1)
        strip = label(strip, f"{mode}: held-out frame {frame}", scale=0.6)
        lines.append(np.concatenate([strip, colour_bar(strip.shape[1], vmax)], 0))
    width = max(l.shape[1] for l in lines)
    lines = [np.pad(l, ((0, 8), (0, width - l.shape[1]), (0, 0)), constant_values=255) for l in lines]
    return np.concatenate(lines, axis=0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="a synthetic set (with gt/) from data/make_synthetic.py")
    parser.add_argument("--holdout", required=True, action="append", metavar="SEQUENCE",
                        help="held-out sequence (repeatable), e.g. 0001_RT_synthetic")
    parser.add_argument("--out", required=True, help="folder of the runs, the table and the figure")
    parser.add_argument("--modes", default="decoder,encoder", help="comma-separated: decoder, encoder")
    parser.add_argument("--variants", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--end_epoch", type=int, required=True, help="epochs of every run")
    parser.add_argument("--encoder_end_epoch", type=int, help="epochs of the encoder runs (default --end_epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", dest="cfg_file", help="YAML file of option: value overrides for every run")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override one option of every run (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = None

    def report(line: str) -> None:  # into the study's log once there is one
        log.error(line) if log is not None else print_error(line)

    def study() -> None:
        nonlocal log
        modes, keys, data_dir, base = study_options(args)
        log = setup_logging(Path(args.out).resolve() / "log", "ablation_logs.txt")
        run_study(args, argv, modes, keys, data_dir, base)

    try:
        return exit_code(study, report)
    finally:
        close_logging()


def study_options(args):
    """``(modes, variant keys, data folder, base Config)`` of the arguments; ``ConfigError`` naming
    a bad one."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    keys = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [m for m in modes if m not in MODES] + [k for k in keys if k not in {v[0] for v in VARIANTS}]
    if bad or not modes or not keys:
        raise ConfigError(f"--modes/--variants: unknown {bad}; modes are {list(MODES)}, variants a, b, c, d")
    if args.end_epoch < 1 or (args.encoder_end_epoch is not None and args.encoder_end_epoch < 1):
        raise ConfigError("--end_epoch and --encoder_end_epoch must be at least 1")
    data_dir = Path(args.data_dir).resolve()
    if not (data_dir / "gt" / "frames.npz").is_file():
        raise ConfigError(f"{data_dir / 'gt' / 'frames.npz'}: not found; the study needs a synthetic set "
                          f"with ground truth (python data/make_synthetic.py --out {args.data_dir})")
    base = Config()
    if args.cfg_file:
        base.update_from_yaml(args.cfg_file)
    base.update_from_strings(args.assignments)
    base.set("data_dir", str(data_dir), "--data_dir")
    return modes, keys, data_dir, base


def run_study(args, argv, modes, keys, data_dir: Path, base: Config) -> None:
    """Train and test every variant, then write the table, the JSON record and the figure."""
    out = Path(args.out).resolve()
    log = logging.getLogger("deephandmesh")
    rows = []
    log.info("ablation.py %s", " ".join(sys.argv[1:] if argv is None else argv))
    for mode in modes:
        for key, name, correctives in VARIANTS:
            if key not in keys:
                continue
            config = run_config(base, mode, correctives, args.holdout)
            config.set("output_dir", str(out / f"{mode}_{key}"), "ablation")
            resolve_paths(config)
            setup_logging(config.log_dir, "train_logs.txt")
            log.info("=== %s (%s) %s: correctives learning: %s", mode, key, name, ", ".join(correctives) or "none")
            end = args.encoder_end_epoch if mode == "encoder" and args.encoder_end_epoch else args.end_epoch
            if mode == "decoder" and not correctives:
                end = 1  # decoder-only plain LBS has nothing to learn: every epoch gives the same weights
            run = train_and_test(config, end, args.seed)
            run.update(mode=mode, variant=key, label=name, correctives=correctives, end_epoch=end)
            rows.append(run)
            m = run["metrics"]
            log.info("%s (%s): surface %.3f mm, depth %s, joint %s", mode, key, m["surface_error_mm"] or float("nan"),
                     m["depth_error_mm"], m["joint_error_mm"])
    setup_logging(out / "log", "ablation_logs.txt")
    table = format_table(rows)
    with np.load(data_dir / "gt" / "frames.npz", allow_pickle=False) as gt:
        gt_frames = {int(f): v for f, v in zip(gt["frame"], gt["vertices"])}
        gt_roots = {int(f): r for f, r in zip(gt["frame"], gt["root"])}
    save_image(out / "ablation.png", make_figure(rows, gt_frames, gt_roots))
    atomic_write_text(out / "ablation.md", table)
    record = [{k: r[k] for k in ("mode", "variant", "label", "correctives", "end_epoch", "train_seconds",
                                 "trained_epochs", "test_samples", "metrics")} for r in rows]
    atomic_write_text(out / "ablation.json", json.dumps({"data_dir": str(data_dir), "holdout": args.holdout,
                                                         "seed": args.seed, "runs": record}, indent=2) + "\n")
    log.info("component study (held-out %s, mm):\n%s", ", ".join(args.holdout), table)
    log.info("wrote %s, %s and %s", out / "ablation.md", out / "ablation.json", out / "ablation.png")


if __name__ == "__main__":
    from common.utils.allocator import retain_freed_memory

    logging.captureWarnings(True)
    retain_freed_memory()
    sys.exit(main())
