"""Train DeepHandMesh on one subject of the released data (or a synthetic set in its layout).

    python main/train.py --gpu 0-3                                   # as the original
    python main/train.py --cfg main/configs/cpu_small.yaml           # a small run on the CPU
    python main/train.py --gpu 0-3 --continue                        # resume from the latest snapshot
    python main/train.py --data_dir data/synthetic --end_epoch 2 --set output_dir=output/run
    torchrun --nproc_per_node 4 main/train.py --gpu 0-3               # one process per GPU (DDP)

Writes ``output/model_dump/subject_<N>/snapshot_<epoch>.pth.tar`` after every epoch (the original's
layout: ``{'epoch', 'network' ('module.' keys), 'optimizer'}``; the options ``keep_last`` and
``keep_every`` delete older ones, see docs/training.md) and logs to ``output/log/train_logs.txt``
and the console. Without ``--gpu`` or without CUDA it runs on the CPU. Bad arguments (unknown
option, missing data, malformed hand model or snapshot) end with a one-line message and exit code
2; a bug shows its traceback (exit code 1). Started by ``torchrun`` with several processes it
trains with ``DistributedDataParallel`` (see :class:`main.trainer.Trainer`); only rank 0 logs and
writes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from main.options import add_config_args, config_from_args  # noqa: E402
from main.trainer import Trainer  # noqa: E402
from common.errors import exit_code  # noqa: E402
from common.logger import ScriptLog, close_logging, setup_logging  # noqa: E402
from common.utils import distributed  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--continue", dest="continue_train", action="store_true",
                        help="resume from the latest snapshot of the subject (weights, optimizer, epoch)")
    parser.add_argument("--end_epoch", type=int, help="train up to this epoch (exclusive; default cfg.end_epoch)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the initialisation, the sample order and the target views (default 0)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    script_log = ScriptLog()

    def train() -> int:
        config = config_from_args(args)
        if args.continue_train:
            config.continue_train = True
        if args.end_epoch is not None:
            config.set("end_epoch", args.end_epoch, "--end_epoch")
        context = distributed.context_from_env()
        if context is None or context.is_main:
            log = script_log.log = setup_logging(config.log_dir, "train_logs.txt")
        else:  # the other processes: their warnings and errors on the console only
            log = script_log.log = setup_logging(None, level=logging.WARNING, console_prefix=f"[rank {context.rank}] ")
        log.info("train.py %s", " ".join(sys.argv[1:] if argv is None else argv))
        trainer = Trainer(config, seed=args.seed, context=context).set_up()
        try:
            trainer.train()
        except FloatingPointError as err:  # the run diverged: neither bad input nor a bug
            log.error("error: %s", err)
            return 1
        except KeyboardInterrupt:
            log.warning("interrupted; resume with --continue (from the last complete epoch)")
            return 130
        return 0

    try:
        return exit_code(train, script_log.report)
    finally:
        distributed.destroy_process_group()
        close_logging()


if __name__ == "__main__":
    from common.utils.allocator import retain_freed_memory

    retain_freed_memory()
    sys.exit(main())
