"""The options of the scripts that decode a hand (the demo, the editor, animations, export, the
keypoint fitter): the hand model, the snapshot and the device; the model they load; and the
scripts' console and entry."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from common.errors import exit_code
from common.hand.hand_model_source import resolve_hand_model
from common.io.checkpoint import load_decoder_checkpoint
from common.utils.device import select_device
from main.config import ROOT_DIR, cfg
from main.model import get_decoder

ROOT = ROOT_DIR
TEMPLATE_SEED = 0  # the random draws of a decoder built without a checkpoint (load_model)


class ConsoleFormatter(logging.Formatter):
    """Messages as they are; warnings and errors prefixed ``warning:`` / ``error:``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def setup_console_logging() -> None:
    """The demo scripts' console: information on stderr as plain lines, warnings prefixed (the
    training scripts have :func:`common.logger.setup_logging` instead)."""
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The options that choose the hand model, the checkpoint and the device (demo, editor, animate)."""
    parser.add_argument("--hand_model", help="hand-model folder (default: data/hand_model if it holds a "
                        "model, else the project's default hand)")
    parser.add_argument("--ckpt", help="snapshot to load (original layout included)")
    parser.add_argument("--subject", type=int, help="with --test_epoch: demo/subject_N/snapshot_E.pth.tar")
    parser.add_argument("--test_epoch", type=int, help="with --subject: the snapshot's epoch")
    parser.add_argument("--gpu", dest="gpu_ids", help="GPU id; the CPU when absent or no GPU exists")
    parser.add_argument("--resnet_type", type=int, default=cfg.resnet_type,
                        help="ignored, kept for old command lines: decoding reads no backbone weights, "
                             "so a snapshot of any ResNet depth loads")


def check_model_args(parser: argparse.ArgumentParser, args) -> None:
    if (args.subject is None) != (args.test_epoch is None):
        parser.error("--subject and --test_epoch go together")
    if args.ckpt and args.subject is not None:
        parser.error("give either --ckpt or --subject/--test_epoch, not both")


def checkpoint_path(args) -> Path | None:
    if args.ckpt:
        return Path(args.ckpt)
    if args.subject is not None:
        return ROOT / "demo" / f"subject_{args.subject}" / f"snapshot_{args.test_epoch}.pth.tar"
    return None


def load_model(args):
    """The hand model, the decoder (checkpoint loaded or correctives zeroed) and the device.

    The model is :func:`main.model.get_decoder`'s: no encoder and no training objective (renderer,
    penetration tables, Laplacian), none of which decoding uses.

    Returns:
        ``(hand_model, model, device, checkpoint_text)``; ``checkpoint_text`` says which snapshot
        was loaded and which of its parts decoding does not use, or that the correctives are zero.
    """
    hand_model = resolve_hand_model(args.hand_model)
    device = select_device(args.gpu_ids)
    # Built under a fixed seed, without touching the caller's random state: without a checkpoint
    # the identity code and the correctives' hidden layers stay as drawn (only the last layers are
    # zeroed), and what reads them (personalise.py --pose_corrective adapts a last layer on top of
    # a hidden one) is then the same from one run to the next.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TEMPLATE_SEED)
        model = get_decoder(hand_model, cfg)
    ckpt = checkpoint_path(args)
    if ckpt is None:
        model.zero_correctives()
        text = "no checkpoint given: skeleton and skin correctives are zero (the template as it is)"
    else:
        loaded = load_decoder_checkpoint(model, ckpt)
        text = f"checkpoint: {ckpt} (epoch {loaded.ckpt.get('epoch', '?')})"
        if loaded.ignored:
            text += f"\nignored (the encoder; decoding does not use it): {', '.join(loaded.ignored)}"
        if loaded.absent:
            text += f"\nthe checkpoint holds no {', '.join(loaded.absent)}: not used for decoding"
    model.to(device).eval()
    return hand_model, model, device, text


def script_main(run, parse_args, argv=None) -> int:
    """A demo script's ``main``: console logging, its arguments, then ``run(args)`` through
    :func:`common.errors.exit_code` (one line and exit code 2 for bad input, a traceback for a bug)."""
    setup_console_logging()
    args = parse_args(argv)
    return exit_code(lambda: run(args))
