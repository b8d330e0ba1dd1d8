"""The background trainer of the workbench (one per store). Logic: oxnet.active.loop (rounds), db.workbench (store).

    OXNET_DB_URL=sqlite:///workbench.db oxnet-trainer --preset cpu       # until SIGTERM (or python -m app.trainer)
    oxnet-trainer --preset tiny --max-rounds 1                            # one round, then exit
    oxnet-trainer --preset auto                                           # paper on a CUDA GPU, else cpu
    oxnet-trainer --preset cpu --weights /models/resnet18.pth             # backbone from a local state_dict
    oxnet-trainer --preset cpu --ssl-epochs 10                            # backbone pretrained on the project's images
    oxnet-trainer --stop                                                  # ask the running one to stop now
    oxnet-trainer --stop-after-round                                      # ... once its round is saved

Exit status: 0 after a clean stop (SIGTERM, SIGINT, a stop request, --max-rounds), 2 for options it
refuses, 3 when another trainer holds the store's lock, 4 when the store is locked, read-only, full or
cannot be opened (one sentence: what failed, which file, what to do), 1 on another error outside a
round (a failing round is recorded and retried).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from db.engine import init_db, make_sessionmaker, store_error_message
from db.projects import DEFAULT_PROJECT
from db.retention import DEFAULT_KEEP_READY
from db.workbench import SqlStore, request_stop
from oxnet.active.loop import TRAINER_PRESETS, AlreadyRunning, Trainer
from oxnet.vocabulary import AUTO_PRESET


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="SQLAlchemy URL of the store (default: $OXNET_DB_URL, else sqlite:///workbench.db)")
    parser.add_argument("--project", default=DEFAULT_PROJECT)
    parser.add_argument("--preset", choices=[*sorted(TRAINER_PRESETS), AUTO_PRESET], default="cpu",
                        help=f"trainer settings (default cpu; {AUTO_PRESET}: paper when a CUDA GPU is present, "
                             "else cpu)")
    parser.add_argument("--method", help="training method (default oxnet)")
    parser.add_argument("--epochs", type=int, help="epochs per round")
    parser.add_argument("--steps-per-epoch", type=int, help="batches per epoch")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--weights", help="backbone start of a first round: random, imagenet (tried; random init with a "
                        "warning when unavailable) or a local torchvision ResNet state_dict file (default: the preset's)")
    parser.add_argument("--ssl-epochs", type=int, help="before the first round, pretrain the backbone self-supervised "
                        "(SimSiam) on the project's training images for this many epochs, once (cached beside the models)")
    parser.add_argument("--ssl-label-epochs", type=int, help="then this many epochs of image-level BCE on the weak and full images")
    parser.add_argument("--min-interval", type=float, help="seconds between rounds at least")
    parser.add_argument("--max-interval", type=float, help="start a round after this many seconds even without new labels")
    parser.add_argument("--max-rounds", type=int, help="exit after this many rounds")
    parser.add_argument("--strategy", help="ranking of the suggestions (default cost_aware; see oxnet.active.strategies)")
    parser.add_argument("--pool-size", type=int, help="images scored per round at most (default: every not-full image)")
    parser.add_argument("--promote-tolerance", type=_tolerance,
                        help="a new model version serves suggestions when its val mAP is at least the serving "
                             "version's minus this (absolute, default 0.02); otherwise it stays a candidate")
    parser.add_argument("--keep-ready", type=int, default=DEFAULT_KEEP_READY,
                        help="ready model versions whose checkpoints are kept besides the newest and the best "
                             "(default %(default)s; -1 keeps all); failed versions' files are always removed")
    parser.add_argument("--stale-after", type=float, default=300.0, help="seconds after which a silent trainer's lock is taken")
    parser.add_argument("--stop", action="store_true", help="ask the running trainer to stop now (its round is discarded), then exit")
    parser.add_argument("--stop-after-round", action="store_true", help="ask the running trainer to stop once its round is saved, then exit")
    return parser


def _tolerance(text: str) -> float:
    """A finite number >= 0 (argparse type of --promote-tolerance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except ValueError as e:  # refused settings or store contents, e.g. no such project: say it, no traceback
        print(f"oxnet-trainer: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a locked, read-only or full store is one sentence, not SQL
        message = store_error_message(e, args.db)
        if message is None:
            raise
        print(f"oxnet-trainer: error: {message}", file=sys.stderr)
        return 4


def resolve_preset(name: str) -> str:
    """``name``, or for ``auto`` ``"paper"`` when a CUDA GPU is present, else ``"cpu"``."""
    if name != AUTO_PRESET:
        return name
    import torch

    return "paper" if torch.cuda.is_available() else "cpu"


def _run(args: argparse.Namespace) -> int:
    if args.stop or args.stop_after_round:
        with make_sessionmaker(init_db(args.db)).begin() as session:
            request_stop(session, args.project, annotator="cli", after_round=args.stop_after_round)
        print("stop after this round requested" if args.stop_after_round else "stop requested")
        return 0
    overrides = {key: value for key, value in {
        "method": args.method, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size, "device": args.device, "min_interval_s": args.min_interval,
        "max_interval_s": args.max_interval, "max_rounds": args.max_rounds, "strategy": args.strategy,
        "pool_size": args.pool_size, "promote_tolerance": args.promote_tolerance,
        "ssl_epochs": args.ssl_epochs, "ssl_label_epochs": args.ssl_label_epochs,
    }.items() if value is not None}
    preset = TRAINER_PRESETS[resolve_preset(args.preset)]
    if args.weights is not None:
        if args.weights not in ("random", "imagenet") and not Path(args.weights).is_file():
            print(f"oxnet-trainer: error: --weights {args.weights}: no such file (or use random, imagenet)", file=sys.stderr)
            return 2
        overrides["model"] = {**preset.model, "weights": args.weights}
    settings = replace(preset, **overrides)
    store = SqlStore.open(args.db, project=args.project, stale_after=timedelta(seconds=args.stale_after),
                          keep_ready=None if args.keep_ready < 0 else args.keep_ready)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        Trainer(store, settings, stop=stop).run()
    except AlreadyRunning as e:
        print(f"trainer refused: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
