"""Speed measurements, kept out of the test suite's pass/fail.

    python main/bench.py decode [--batch 1 64] [--hands default makehuman] [--repeats 20]
    python main/bench.py renderer [--sizes 64 128 256] [--views 6] [--hands default]
    python main/bench.py data --data data/synthetic [--workers 2] [--batch 8] [--size 256]

Each prints the median of repeated runs with the sizes it used. ``decode`` compares
``Model.decode`` with the plain loop reference (the original's approach: per-sample FK in Python,
LBS summed over joints); ``renderer`` times the depth renderer per view; ``data`` times the data
loader on a data set in the released layout (e.g. one made by ``data/make_synthetic.py``).
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


def bench_renderer(args) -> None:
    from common.nets.renderer_bench import time_renderer

    print(f"depth renderer on the CPU, {torch.get_num_threads()} threads; B=1 sample x {args.views} views "
          f"in one call; median of {args.repeats} runs")
    print(f"{'hand':<10} {'faces':>6} {'size':>9} | {'ms/view':>8} {'ms/call':>8} | {'+backward ms/view':>17}")
    for name, hand in load_hands(args.hands):
        forward = time_renderer(hand, sizes=args.sizes, views=args.views, repeats=args.repeats)
        both = time_renderer(hand, sizes=args.sizes, views=args.views, repeats=args.repeats, backward=True)
        for f, b in zip(forward, both):
            print(f"{name:<10} {f['faces']:>6} {f['size']:>4}x{f['size']:<4} | {f['ms_per_view']:>8.1f} "
                  f"{f['ms_per_call']:>8.1f} | {b['ms_per_view']:>17.1f}")


def bench_data(args) -> None:
    from torch.utils.data import DataLoader

    from common.utils.hand_model import is_hand_model_folder
    from common.utils.hand_model_source import resolve_hand_model
    from data.dataset import DeepHandMeshDataset

    data = Path(args.data)
    hand_dir = data / "hand_model"
    hand = load_hand_model(hand_dir) if is_hand_model_folder(hand_dir) else resolve_hand_model()
    dataset = DeepHandMeshDataset(data, mode="train", joint_names=hand.joint_names,
                                  input_img_shape=(args.size, args.size), rendered_img_shape=(args.size, args.size),
                                  render_view_num=args.views, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0, drop_last=True)
    print(f"data loader: {len(dataset)} samples in {data}, batch {args.batch}, {args.workers} workers, "
          f"crops {args.size}x{args.size}, {args.views} target views; median of {args.repeats} epochs")
    rates = []
    for _ in range(args.repeats + 1):  # the first epoch starts the workers
        start, count = time.perf_counter(), 0
        for batch in loader:
            count += batch["img"].shape[0]
        rates.append(count / (time.perf_counter() - start))
    print(f"samples/s: {statistics.median(rates[1:]):.1f} (first epoch, with worker start-up: {rates[0]:.1f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("decode", help="meshes per second of model.decode against the loop reference")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--hands", nargs="+", default=["default", "makehuman"],
                   help="'default', 'makehuman' or hand-model folders")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p = sub.add_parser("renderer", help="depth renderer time per view against image size")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--hands", nargs="+", default=["default"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p = sub.add_parser("data", help="data-loader samples per second")
    p.add_argument("--data", required=True, help="data folder in the released layout")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="input and depth-map crop size")
    p.add_argument("--views", type=int, default=6, help="target views per sample")
    p.add_argument("--repeats", type=int, default=3, help="epochs timed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    {"decode": bench_decode, "renderer": bench_renderer, "data": bench_data}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
