"""Speed measurements, kept out of the test suite's pass/fail.

    python main/bench.py decode [--batch 1 64] [--hands default makehuman] [--repeats 20]

Prints the median time of repeated runs for each setting, next to the plain loop reference
(the original's approach: per-sample FK in Python, LBS summed over joints).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.utils.hand_model import load_hand_model  # noqa: E402
from main.config import cfg  # noqa: E402
from main.model import get_model  # noqa: E402

MAKEHUMAN = ROOT.parent / "shared" / "hand_models" / "makehuman_right"


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_hands(names):
    hands = []
    for name in names:
        if name == "default":
            from common.utils.default_hand import make_default_hand

            hands.append(("default", make_default_hand()))
        elif name == "makehuman":
            if not MAKEHUMAN.is_dir():
                print(f"skipping makehuman: {MAKEHUMAN} not found")
                continue
            hands.append(("makehuman", load_hand_model(MAKEHUMAN)))
        else:
            hands.append((Path(name).name, load_hand_model(name)))
    return hands


def bench_decode(args) -> None:
    from tests.reference import decode_loop_model

    print(f"decode on the CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; median of {args.repeats} runs")
    print(f"{'hand':<10} {'V':>5} {'batch':>5} | {'ours ms':>8} {'meshes/s':>9} | "
          f"{'loop ms':>8} {'meshes/s':>9} | {'speed-up':>8}")
    for name, hand in load_hands(args.hands):
        model = get_model("test", hand, cfg).eval()
        for batch in args.batch:
            euler = (torch.rand(batch, hand.joint_num, 3) - 0.5) * torch.from_numpy(hand.dof_mask)
            with torch.no_grad():
                ours = median_seconds(lambda: model.decode(euler), args.repeats)
                loop = median_seconds(lambda: decode_loop_model(model, euler), max(3, args.repeats // 4))
            print(f"{name:<10} {hand.vertex_num:>5} {batch:>5} | {ours * 1e3:>8.2f} {batch / ours:>9.0f} | "
                  f"{loop * 1e3:>8.2f} {batch / loop:>9.0f} | {loop / ours:>7.1f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("decode", help="meshes per second of model.decode against the loop reference")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--hands", nargs="+", default=["default", "makehuman"],
                   help="'default', 'makehuman' or hand-model folders")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    {"decode": bench_decode}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
