"""Posed scans of a hand model, with their 3D keypoints: input for ``main/personalise.py --scan``
that the model being personalised did not make (docs/personalise.md, "Results").

    python tools/make_scans.py --hand_model ../shared/hand_models/makehuman_right --out data/scans_mh
    python main/personalise.py --scan data/scans_mh/scan_*.obj \
        --scan_keypoints data/scans_mh/keypoints.json --out output/personalise_scans

Each scan is the hand model's own mesh (its topology, its skinning), posed by its own skeleton in
a pose drawn within the joint limits (softened towards the rest pose by ``--bend``), turned and
placed at random, written as ``scan_<k>.obj`` (or ``.ply``) in mm or metres. ``keypoints.json``
holds each scan's 21 keypoints in the ``dhm`` order (the joints of the released ``.pts`` files),
a list of frames as ``main/fit.py`` reads it; ``truth.npz`` the angles and root transforms.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from common.fitting.solver import UNITS  # noqa: E402
from common.io.atomic import atomic_write_npz, atomic_write_text  # noqa: E402
from common.io.mesh_io import write_obj, write_ply  # noqa: E402
from tools.fit_synthetic import decoder, keypoints_of, random_poses, random_roots  # noqa: E402


def make_scans(hand, out: Path, count: int = 4, seed: int = 0, bend: float = 0.5, units: str = "mm",
               suffix: str = ".obj") -> list:
    """Write ``count`` posed scans of ``hand`` and their keypoints into ``out`` (module notes);
    returns the scans' paths."""
    rng = np.random.default_rng(seed)
    model = decoder(hand)
    euler = random_poses(hand, count, rng) * float(bend)
    root = random_roots(count, rng, spread_mm=100.0)
    meshes = model.pose(euler, root).mesh.detach().double().numpy()
    keypoints = keypoints_of(model, "dhm", euler, root).keypoints
    scale = 1.0 / UNITS[units]  # mm → the file's units
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, mesh in enumerate(meshes):
        path = out / f"scan_{k}{suffix}"
        (write_obj if suffix == ".obj" else write_ply)(path, mesh * scale, np.asarray(hand.faces))
        paths.append(path)
    atomic_write_text(out / "keypoints.json", json.dumps((keypoints * scale).round(6).tolist()) + "\n")
    atomic_write_npz(out / "truth.npz", euler=euler.numpy(), root=root.numpy(), units=units)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hand_model", required=True, help="the hand-model folder whose mesh the scans are")
    parser.add_argument("--out", required=True, help="folder to write the scans into")
    parser.add_argument("--count", type=int, default=4, help="number of scans (poses), default 4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bend", type=float, default=0.5, help="the drawn angles times this (0: the rest pose, "
                        "1: anywhere within the joint limits; default 0.5)")
    parser.add_argument("--units", choices=list(UNITS), default="mm")
    parser.add_argument("--format", choices=["obj", "ply"], default="obj")
    args = parser.parse_args(argv)
    if args.count < 1 or not 0 <= args.bend <= 1:
        parser.error("--count must be at least 1 and --bend between 0 and 1")
    from common.hand.hand_model import load_hand_model
    from main.model_options import script_main

    def work(a):
        paths = make_scans(load_hand_model(a.hand_model), Path(a.out), a.count, a.seed, a.bend, a.units,
                           f".{a.format}")
        print(f"wrote {len(paths)} scan(s), keypoints.json and truth.npz to {a.out}")
        return 0

    return script_main(work, lambda _argv: args, argv)


if __name__ == "__main__":
    sys.exit(main())
