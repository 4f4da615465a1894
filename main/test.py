"""Test a trained snapshot: meshes for every sample, and joint / depth / mesh errors.

    python main/test.py --test_epoch 34                     # output/model_dump/subject_4/snapshot_34.pth.tar
    python main/test.py --test_epoch 1 --cfg main/configs/cpu_small.yaml
    python main/test.py --test_epoch 1 --data_dir data/synthetic --set output_dir=output/run
    python main/test.py --init --cfg main/configs/cpu_small.yaml   # the untrained model, as train.py starts it

Writes, under ``output/result/subject_<N>/``, each input crop (``<index>_<seq>_cam<cam>_frame<f>_img.png``),
the test-mode mesh (``…_mesh.obj``: root at identity, i.e. the wrist's frame, as the original) and
``metrics.json`` (see :class:`main.tester.Tester` for the definitions), and prints the metrics.
Bad arguments (missing snapshot, wrong data folder, unknown option) end with a one-line message and
exit code 2; a bug shows its traceback (exit code 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from main.options import add_config_args, config_from_args  # noqa: E402
from main.tester import Tester  # noqa: E402
from common.errors import exit_code  # noqa: E402
from common.logger import ScriptLog, close_logging, setup_logging  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--test_epoch", type=int, help="epoch of the snapshot to test")
    which.add_argument("--init", action="store_true",
                       help="test the model as train.py initialises it (with --seed), writing metrics_init.json")
    parser.add_argument("--seed", type=int, default=0, help="with --init: train.py's --seed")
    add_config_args(parser)
    return parser.parse_args(argv)


def format_metrics(metrics: dict) -> str:
    def mm(key):
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.3f} mm"
    return (f"epoch {metrics['epoch']}: {metrics['evaluated_samples']} of {metrics['samples']} sample(s) evaluated; "
            f"joint error {mm('joint_error_mm')} ({metrics['valid_joints']} keypoints), "
            f"depth error {mm('depth_error_mm')} ({metrics['depth_pixels']} pixels), "
            f"mesh error {mm('mesh_error_mm')} ({metrics['mesh_samples']} meshes), "
            f"surface error {mm('surface_error_mm')} (90th percentile {mm('surface_out_to_gt_p90_mm')} "
            f"output to truth, {mm('surface_gt_to_out_p90_mm')} truth to output)")


def main(argv=None) -> int:
    args = parse_args(argv)
    script_log = ScriptLog()

    def test() -> None:
        config = config_from_args(args)
        log = script_log.log = setup_logging(config.log_dir, "test_logs.txt")
        log.info("test.py %s", " ".join(sys.argv[1:] if argv is None else argv))
        epoch = None if args.init else args.test_epoch
        tester = Tester(config, epoch, args.seed).set_up()
        metrics = tester.test()
        log.info(format_metrics(metrics))
        log.info("wrote crops, meshes and metrics.json to %s", tester.result_dir)

    try:
        return exit_code(test, script_log.report)
    finally:
        close_logging()


if __name__ == "__main__":
    from common.utils.allocator import retain_freed_memory

    retain_freed_memory()
    sys.exit(main())
