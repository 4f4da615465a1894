"""Speed and memory measurements, kept out of the test suite's pass/fail (figures: BENCHMARKS.md).

    python tools/bench.py decode [--batch 1 64 1024] [--hands default makehuman]
    python tools/bench.py losses [--batch 8] [--hands default makehuman]
    python tools/bench.py renderer [--sizes 64 128 256] [--subdivide 0 1 2] [--backends native pytorch3d]
                                  [--batch 8] [--backends native-tensor native-triton]
                                  [--tile-sizes 0 16] [--device cuda] [--no-memory]
                                  [--threads 1 --clock thread]
    python tools/bench.py kernel [--size 256 --views 6 --batch 8] [--device cuda]
    python tools/bench.py data --data data/synthetic [--rounds 9] [--profile] [--workers 2] [--batch 8] [--size 256]
    python tools/bench.py surface [--shift 0.3 3 8] [--hands default makehuman] [--points N]
    python tools/bench.py influences [--hands default makehuman] [--random 1000]
    python tools/bench.py train --cfg main/configs/cpu_small.yaml --data_dir data/synthetic
    python tools/bench.py scaling --procs 1 2 --cfg main/configs/cpu_small.yaml --data_dir data/synthetic
    python tools/bench.py ops --cfg main/configs/cpu_small.yaml --data_dir data/synthetic
    python tools/bench.py fit [--frames 1000] [--hands default makehuman] [--device cuda] [--no-accuracy]

Each prints the median of repeated runs with the sizes it used and the machine. ``decode``
compares ``Model.decode`` with the plain loop reference (the original's approach: per-sample FK
in Python, LBS summed over joints); ``losses`` the penetration and Laplacian losses with the
original's loops and dense matrix; ``renderer`` times the depth renderer's backends per view
against image size and face count, and the native one's peak memory; ``data`` the sample reader
against a transcription of the original's on one thread, and the loader's workers (rate, peak memory);
``surface`` the exact point-to-surface distance of ``test.py``'s surface metric against evaluating
every triangle; ``influences`` is no timing: what a glTF reader limited to four skinning influences
per vertex (three.js) loses on the exported hand (mm); ``train`` takes a training iteration apart (one
process, or each process of a ``torchrun`` launch); ``scaling`` runs ``train`` under ``torchrun``
with 1, 2, … processes and compares samples/s; ``ops`` counts the operations and host waits of a
training iteration per stage (what a GPU's host dispatches). The references are in ``tools/reference.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tools.benchmarks.timing import load_hands, machine_description, median_seconds  # noqa: E402
from common.errors import exit_code  # noqa: E402
from common.utils.device import usable_cpus  # noqa: E402

JSON_TAG = "BENCH_JSON "


def gemm_throughput(size: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matrix-product rate in FLOP/s (a ``size``² × ``size``² product, median)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size ** 3 / median_seconds(lambda: a @ b, repeats)


def bench_decode(args) -> None:
    from main.config import cfg
    from main.model import get_model
    from tools.reference import decode_loop_model

    print(f"decode: {machine_description()}; median of {args.repeats} runs (loop: fewer at large batches)")
    print("ours: model.decode with the identity part computed once (model.identity()), as the demo and editor do")
    print("correctives: our decode's pose-corrective MLP (with the pose-independent rest) alone, the part whose")
    print("work the loop also does, and its rate; bound: loop / correctives, the speed-up if FK and LBS were free")
    print(f"float32 matrix product on this machine (2048x2048, for scale): {gemm_throughput() / 1e9:.0f} GFLOP/s")
    print(f"{'hand':<10} {'V':>5} {'batch':>5} | {'ours ms':>8} {'meshes/s':>9} | "
          f"{'loop ms':>8} {'meshes/s':>9} | {'speed-up':>8} | {'correctives ms':>14} {'GFLOP/s':>7} {'bound':>7}")
    for name, hand in load_hands(args.hands):
        model = get_model("test", hand, cfg).eval()
        corrective_layer = model.skin_refine_net.fc_pose[-1].weight  # [3V, hidden]
        for batch in args.batch:
            euler = (torch.rand(batch, hand.joint_num, 3) - 0.5) * torch.from_numpy(hand.dof_mask)
            loop_repeats = max(3, args.repeats * 4 // max(4, batch))
            with torch.no_grad():
                identity = model.identity()
                ours = median_seconds(lambda: model.decode(euler, identity), args.repeats)
                loop = median_seconds(lambda: decode_loop_model(model, euler), loop_repeats, warmup=1)
                layer = median_seconds(lambda: model.rest_vertices(euler, identity), args.repeats)
            layer_flops = 2 * corrective_layer.numel() * batch
            print(f"{name:<10} {hand.vertex_num:>5} {batch:>5} | {ours * 1e3:>8.2f} {batch / ours:>9.0f} | "
                  f"{loop * 1e3:>8.2f} {batch / loop:>9.0f} | {loop / ours:>7.1f}x | {layer * 1e3:>14.2f} "
                  f"{layer_flops / layer / 1e9:>7.0f} {loop / layer:>6.1f}x")


def bench_losses(args) -> None:
    from tools.benchmarks import losses

    print(f"losses: {machine_description()}")
    losses.run(load_hands(args.hands), args.batch, args.repeats)


def bench_surface(args) -> None:
    from common import metrics
    from tools.reference import surface_distance_every_triangle

    print(f"surface: {machine_description()}")
    print("each vertex of the hand moved by a random offset of about --shift mm (Gaussian, per axis "
          "shift/sqrt(3)), its distance to the unmoved surface; every triangle: point_triangle_sq "
          "over all pairs, in chunks")
    print(f"{'hand':<10} {'points':>6} {'faces':>6} {'shift mm':>8} | {'ours ms':>8} | "
          f"{'every triangle ms':>17} | {'speed-up':>8}")
    for name, hand in load_hands(args.hands):
        vertices = torch.tensor(hand.vertices, dtype=torch.float64)
        faces = torch.tensor(hand.faces, dtype=torch.long)

        gen = torch.Generator().manual_seed(0)
        for shift in args.shift:
            points = vertices[:args.points] if args.points else vertices
            points = points + shift / 3 ** 0.5 * torch.randn(points.shape, generator=gen, dtype=torch.float64)
            ours = median_seconds(lambda: metrics.point_surface_distance(points, vertices, faces), args.repeats,
                                  warmup=1)
            every = median_seconds(lambda: surface_distance_every_triangle(points, vertices, faces), 1,
                                   warmup=0)
            print(f"{name:<10} {len(points):>6} {len(faces):>6} {shift:>8.1f} | {ours * 1e3:>8.1f} | "
                  f"{every * 1e3:>17.0f} | {every / ours:>7.0f}x")


def bench_renderer(args) -> None:
    from tools.benchmarks.renderer import compare_renderers, memory_growth, subdivide, variant
    from common.renderer.depth_renderer import pytorch3d_available

    hands = []
    for name, hand in load_hands(args.hands):
        for times in args.subdivide:
            label = name if times == 0 else f"{name}/{4 ** times}"
            hands.append((label, hand if times == 0 else subdivide(hand.vertices, hand.faces, times)))
    print(f"renderer: {machine_description()}  ('/4': each face split in four, same surface)")
    backends = list(args.backends)
    if "pytorch3d" in backends and not pytorch3d_available():
        print("PyTorch3D does not import here: its rows are left out")
        backends.remove("pytorch3d")
    variants = []
    for name in backends:
        variants += [variant(name, tile) for tile in args.tile_sizes] if name == "pytorch3d" else [variant(name)]
    if variants:
        compare_renderers(hands, sizes=args.sizes, views=args.views, repeats=args.repeats, variants=variants,
                          device=args.device, clock=args.clock, batch=args.batch)
    if args.memory:
        memory_growth(hands, sizes=args.sizes, views=args.views, device=args.device)


def kernel_setting(text: str):
    """``HxWxSTEPxWARPS`` (``8x8x16x4``) as four powers of two (Triton's block sizes must be),
    for ``kernel --tiles``."""
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != 4 or any(v < 1 or v & (v - 1) for v in values):
        raise argparse.ArgumentTypeError(f"expected HxWxSTEPxWARPS like 8x8x16x4, each a power of two; got '{text}'")
    return values


def bench_kernel(args) -> None:
    from tools.benchmarks.renderer import kernel_tiles

    print(f"kernel: {machine_description()}")
    for name, hand in load_hands(args.hands):
        print(f"hand: {name}")
        kernel_tiles(hand, size=args.size, views=args.views, batch=args.batch, repeats=args.repeats,
                     device=args.device, tiles=args.tiles)


def bench_data(args) -> None:
    from tools.benchmarks import data

    data.run(args)


def bench_train(args) -> int:
    """The training iteration's stage table; with ``--variant``, one table per variant (the
    configuration with that variant's ``--set`` assignments on top), built and timed one after the
    other in this process, then their samples/s side by side."""
    import logging

    from main.options import check_options, config_from_args
    from main.trainer import Trainer
    from tools.benchmarks.iteration import format_profile, profile_iterations
    from common.logger import close_logging, setup_logging
    from common.utils import distributed

    base = config_from_args(args)
    variants = [("as configured", [])] + [(text, text.split()) for text in args.variants]
    configs = []
    for name, assignments in variants:
        config = base.copy()
        config.update_from_strings(assignments)
        check_options(config)
        configs.append((name, config))
    context = distributed.context_from_env()
    setup_logging(None, level=logging.WARNING)
    summary = []
    try:
        for name, config in configs:
            trainer = Trainer(config, seed=0, context=context)
            trainer.make_batch_generator()
            trainer.make_model()
            result = profile_iterations(trainer, args.iterations, args.warmup)
            summary.append((name, result))
            if trainer.is_main:
                title = (f"training iteration: {machine_description()}\n"
                         f"ResNet-{config.resnet_type}, input {tuple(config.input_img_shape)}, "
                         f"{config.render_view_num} views of {tuple(config.rendered_img_shape)}, "
                         f"{trainer.hand_model.vertex_num} vertices / {len(trainer.hand_model.faces)} faces, "
                         f"batch {trainer.batch_size} per process, {trainer.world_size} process(es), "
                         f"{args.iterations} iterations after {args.warmup} (median)"
                         + (f"; variant: {name}" if len(configs) > 1 else ""))
                print(format_profile(result, title))
                if args.json:
                    print(JSON_TAG + json.dumps(dict(result, variant=name)))
            del trainer
        if len(summary) > 1 and (context is None or context.is_main):
            first = summary[0][1]["samples_per_s"]
            print("\nvariants side by side (samples/s, against the first):")
            for name, result in summary:
                print(f"  {name:<48} {result['samples_per_s']:>9.2f}  {result['samples_per_s'] / first:>5.2f}x")
    finally:
        distributed.destroy_process_group()
        close_logging()
    return 0


def bench_ops(args) -> int:
    """The ATen operations and host waits of one training iteration, per stage."""
    import logging

    from main.options import check_options, config_from_args
    from main.trainer import Trainer
    from tools.benchmarks.ops import count_iteration_ops, format_ops
    from common.logger import close_logging, setup_logging

    config = config_from_args(args)
    check_options(config)
    setup_logging(None, level=logging.WARNING)
    try:
        trainer = Trainer(config, seed=0)
        trainer.make_batch_generator()
        trainer.make_model()
        result = count_iteration_ops(trainer)
        print(format_ops(result, f"operations of one training iteration: {machine_description()}\n"
                                 f"ResNet-{config.resnet_type}, {config.render_view_num} views of "
                                 f"{tuple(config.rendered_img_shape)}, batch {trainer.batch_size}, "
                                 f"native_rasteriser={config.native_rasteriser}"))
    finally:
        close_logging()
    return 0


def bench_scaling(args) -> int:
    cores = usable_cpus()
    forwarded = ["--iterations", str(args.iterations), "--warmup", str(args.warmup), "--json"]
    if args.cfg_file:
        forwarded += ["--cfg", args.cfg_file]
    if args.data_dir:
        forwarded += ["--data_dir", str(Path(args.data_dir).resolve())]
    for item in args.assignments:
        forwarded += ["--set", item]
    print(f"scaling: {machine_description()}; torchrun, gloo; each process gets "
          f"{cores} cores / processes torch threads")
    results = []
    for procs in args.procs:
        threads = max(1, cores // procs)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                   str(ROOT / "tools" / "bench.py"), "train"] + forwarded
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(JSON_TAG)]
        if done.returncode != 0 or not lines:
            print(f"{procs} process(es) failed (exit code {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        result = json.loads(lines[-1][len(JSON_TAG):])
        results.append((procs, threads, result))
    base = results[0][2]["samples_per_s"]
    print(f"{'processes':>9} {'threads each':>12} {'global batch':>12} | {'iteration ms':>12} "
          f"{'samples/s':>9} {'vs first':>8}")
    for procs, threads, r in results:
        print(f"{procs:>9} {threads:>12} {r['global_batch']:>12} | {r['stages_ms']['iteration']:>12.1f} "
              f"{r['samples_per_s']:>9.2f} {r['samples_per_s'] / base:>7.2f}x")
    return 0


def bench_influences(args) -> None:
    from tools.benchmarks import influences

    influences.run(load_hands(args.hands), args.random, args.seed)


def main(argv=None) -> int:
    from main.options import add_config_args
    from common.renderer.depth_renderer import DEFAULT_TILE_SIZE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    hands_help = "'default', 'makehuman' (../shared/hand_models/makehuman_right) or hand-model folders"

    p = sub.add_parser("decode", help="meshes per second of model.decode against the loop reference")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument("--hands", nargs="+", default=["default", "makehuman"], help=hands_help)
    p.add_argument("--repeats", type=int, default=20)

    p = sub.add_parser("losses", help="penetration and Laplacian losses against the original's loops and dense matrix")
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--hands", nargs="+", default=["default", "makehuman"], help=hands_help)
    p.add_argument("--repeats", type=int, default=20)

    p = sub.add_parser("renderer", help="depth renderer time per view against image size and face count")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--hands", nargs="+", default=["default"], help=hands_help)
    p.add_argument("--subdivide", type=int, nargs="+", default=[0],
                   help="also each hand with every face split in four this many times (0: as is)")
    p.add_argument("--batch", type=int, default=1, help="samples per call, each seen by --views cameras")
    p.add_argument("--backends", nargs="+", choices=["native", "native-tensor", "native-triton", "pytorch3d", "auto"],
                   default=["native", "pytorch3d"],
                   help="renderer backends to compare (pytorch3d: PyTorch3D's kernel, skipped where it does not "
                        "import; auto: what renderer_backend auto runs)")
    p.add_argument("--tile-sizes", dest="tile_sizes", type=int, nargs="+", default=[DEFAULT_TILE_SIZE],
                   help=f"tile sizes of the PyTorch3D rows (0: untiled; default {DEFAULT_TILE_SIZE})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="wall time, or (with --threads 1 on the CPU) the thread's CPU time, which other jobs on "
                        "the machine hardly change")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the native backend's peak-memory table")
    p.add_argument("--repeats", type=int, default=5)

    p = sub.add_parser("kernel", help="the native renderer's binned Triton kernel per tile size (CUDA)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hands", nargs="+", default=["default"], help=hands_help)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tiles", type=kernel_setting, nargs="+", metavar="HxWxSTEPxWARPS",
                   help="the settings timed, e.g. 8x8x16x4 (tile height, width, faces per step, warps; "
                        "default: the eight of the table in BENCHMARKS.md)")

    p = sub.add_parser("data", help="the sample reader against the original's (one thread); the loader's workers")
    p.add_argument("--data", required=True, help="data folder in the released layout")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: skip the loader part)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="input and depth-map crop size")
    p.add_argument("--views", type=int, default=6, help="target views per sample")
    p.add_argument("--repeats", type=int, default=3, help="loader epochs timed (after one that starts the workers)")
    p.add_argument("--rounds", type=int, default=9, help="alternating runs of each reader")
    p.add_argument("--samples", type=int, default=0, help="samples per run (0: as many as the data set has)")
    p.add_argument("--profile", action="store_true", help="also show where each reader's time goes (cProfile)")

    p = sub.add_parser("surface", help="exact point-to-surface distance (test.py's surface metric)")
    p.add_argument("--shift", type=float, nargs="+", default=[0.3, 3.0, 8.0],
                   help="typical distance of the points from the surface, mm")
    p.add_argument("--hands", nargs="+", default=["default", "makehuman"], help=hands_help)
    p.add_argument("--points", type=int, default=0, help="only the first N vertices as points (0: all)")
    p.add_argument("--repeats", type=int, default=5)

    p = sub.add_parser("influences", help="what a 4-influence glTF reader (three.js) loses on the exported hand, mm")
    p.add_argument("--hands", nargs="+", default=["default", "makehuman"], help=hands_help)
    p.add_argument("--random", type=int, default=1000, help="random poses within the joint limits")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("ops", help="ATen operations and host waits of one training iteration, per stage")
    add_config_args(p)

    for name, text in (("train", "a training iteration taken apart (works under torchrun)"),
                       ("scaling", "samples/s of torchrun (gloo) with 1, 2, ... processes")):
        p = sub.add_parser(name, help=text)
        add_config_args(p)
        p.add_argument("--iterations", type=int, default=10, help="iterations timed")
        p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
        if name == "train":
            p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
            p.add_argument("--variant", dest="variants", action="append", default=[], metavar="'KEY=VALUE ...'",
                           help="also time the configuration with these assignments (space-separated, as "
                                "--set takes them), e.g. --variant 'channels_last=true encoder_bf16=true'; "
                                "repeatable")
        else:
            p.add_argument("--procs", type=int, nargs="+", default=[1, 2])

    from tools.benchmarks import fit as fit_benchmark

    fit_benchmark.add_arguments(sub.add_parser("fit", help="the keypoint fitter: speed and accuracy"))

    for p in sub.choices.values():
        if p.prog.split()[-1] not in ("train", "scaling", "ops"):
            p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    for name in ("repeats", "iterations", "rounds"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1")
    torch.manual_seed(0)
    run = {"decode": bench_decode, "losses": bench_losses, "renderer": bench_renderer, "kernel": bench_kernel,
           "data": bench_data, "surface": bench_surface, "influences": bench_influences,
           "fit": fit_benchmark.run,
           "train": bench_train, "scaling": bench_scaling, "ops": bench_ops}[args.what]
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    from common.utils.allocator import retain_freed_memory

    retain_freed_memory()
    sys.exit(main())
