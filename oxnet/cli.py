"""The ``oxnet`` command line: train, eval, predict, demo, anchors and pretrain (:mod:`oxnet.cli_pretrain`).

    oxnet train --train boxes.json --weak weak.json --unlabeled unlabeled.json --val val.json \\
        --images DIR --method oxnet --preset cpu --epochs 10 --out runs/oxnet
    oxnet eval --checkpoint runs/oxnet/best.pt --data val.json --images DIR
    oxnet predict --checkpoint runs/oxnet/best.pt --data test.json --images DIR --out results.json --overlays overlays/
    oxnet demo
    oxnet anchors --dataset boxes.json --image-size 512     # anchor sizes fitted to the boxes, and their coverage
    torchrun --nproc_per_node=2 -m oxnet train ...     # one process per GPU (or CPU processes with gloo)

Results go to stdout as JSON; logs and progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

from oxnet.cli_pretrain import add_parser as add_pretrain_parser
from oxnet.modeling.config import PRESETS, ModelConfig
from oxnet.training.settings import DEFAULT_REPEAT_THRESHOLD, METHODS, SCHEDULES, WARMUP_FACTOR, TrainConfig
from oxnet.vocabulary import FULL, GRANULARITIES, UNLABELED, WEAK

logger = logging.getLogger("oxnet.cli")


# --------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------
def _files(value: str) -> list[str]:
    return [part for part in value.split(",") if part]


def key_value(value: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE a Python literal (number, tuple, ...) or else a string."""
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key.strip(), ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key.strip(), raw


def _proportions(value: str) -> dict[str, float]:
    pairs = [key_value(part) for part in value.split(",") if part]
    try:
        return {key: float(number) for key, number in pairs}
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected full=0.5,weak=0.25,unlabeled=0.25, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oxnet",
        description="OXnet: thoracic disease detection from boxes, image-level labels and unlabeled chest X-rays.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Data files are COCO JSON (bbox = [x, y, w, h] in pixels; optional per-image 'image_labels' list\n"
            "of class names, 'No Finding' = none). Run 'oxnet COMMAND --help' for the options of a command.\n"
            "Multi-GPU / multi-machine: torchrun --nproc_per_node=N -m oxnet train ..."
        ),
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a detector (RetinaNet, OXnet or an ablation) and keep the best checkpoint",
        description="Train on full (boxes), weak (image-level labels) and unlabeled images; validate on a "
        "fully labeled set every epoch. Restarting with the same --out resumes after the last complete epoch.",
    )
    data = train.add_argument_group("data")
    data.add_argument("--train", type=_files, required=True, metavar="FILE[,FILE]",
                      help="COCO files of fully labeled images (images with their own 'granularity' keep it)")
    data.add_argument("--weak", type=_files, default=[], metavar="FILE[,FILE]",
                      help="COCO files read as weakly labeled (image-level labels; boxes are dropped)")
    data.add_argument("--unlabeled", type=_files, default=[], metavar="FILE[,FILE]",
                      help="COCO files read as unlabeled (all labels dropped)")
    data.add_argument("--val", required=True, metavar="FILE", help="COCO file of fully labeled validation images")
    data.add_argument("--images", metavar="DIR",
                      help="folder that relative file_name entries refer to (default: each JSON file's folder)")
    method = train.add_argument_group("method and model")
    method.add_argument("--method", default="oxnet", choices=sorted(METHODS),
                        help="retinanet (boxes only), sfl, daa, daa_gpa or oxnet (all three parts); default oxnet")
    method.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                        help="model size: paper (ResNet-101, 512 px), cpu (ResNet-18, 256 px), tiny; default cpu")
    method.add_argument("--image-size", type=int, help="network input side in pixels (default: the preset's)")
    method.add_argument("--depth", type=int, choices=[18, 34, 50, 101], help="ResNet depth (default: the preset's)")
    method.add_argument("--model-option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="any ModelConfig field, e.g. levels=(2,3,4,5,6,7), backbone_norm=group, "
                             "anchor_sizes=(24,48,96,192,384) or weights=/path/resnet50.pth")
    method.add_argument("--init", metavar="CKPT", help="warm start from a checkpoint's student weights")
    method.add_argument("--weights", metavar="FILE|random|imagenet",
                        help="backbone start: a torchvision ResNet state_dict (e.g. from oxnet pretrain), random or imagenet")
    schedule = train.add_argument_group("schedule")
    defaults = TrainConfig()
    schedule.add_argument("--epochs", type=int, default=defaults.epochs)
    schedule.add_argument("--pretrain-epochs", type=int, default=defaults.pretrain_epochs,
                          help="plain RetinaNet epochs on the full images first; student and teacher start from it")
    schedule.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per batch and process")
    schedule.add_argument("--proportions", type=_proportions, default=defaults.proportions,
                          metavar="full=F,weak=W,unlabeled=U", help="share of each granularity per batch")
    schedule.add_argument("--steps-per-epoch", type=int, help="batches per epoch (default: every usable image once on average)")
    schedule.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4 from scratch, 1e-5 pretrained)")
    schedule.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    schedule.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="max gradient norm (0: off)")
    schedule.add_argument("--ema-decay", type=float, default=defaults.ema_decay, help="mean teacher decay")
    add_recipe_options(schedule)
    schedule.add_argument("--plateau-patience", type=int, default=defaults.plateau_patience,
                          help="epochs without better val mAP before the LR is divided by 10 (--schedule plateau)")
    schedule.add_argument("--early-stop-patience", type=int, default=defaults.early_stop_patience,
                          help="epochs without better val mAP before training stops (0: never)")
    run = train.add_argument_group("run")
    run.add_argument("--out", default=defaults.out_dir, metavar="DIR", help="checkpoint folder (last.pt, best.pt)")
    run.add_argument("--seed", type=int, default=defaults.seed)
    _add_runtime(run)
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="mixed precision (default: on with CUDA)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint on a fully labeled COCO file (prints metrics JSON)",
        description="mAP over IoU 0.40:0.05:0.75, AP40, AP75, AP by size, per-class AP and image-level AUC.",
    )
    _add_model_input(evaluate)
    evaluate.set_defaults(func=_eval)

    predict = commands.add_parser(
        "predict", help="detect on the images of a COCO file; write COCO results JSON (and overlays)",
        description="Writes COCO results (image_id, category_id, bbox [x, y, w, h], score) in original pixels, "
        "with the data file's category ids (matched by class name).",
    )
    _add_model_input(predict)
    predict.add_argument("--out", required=True, metavar="FILE", help="results JSON to write")
    predict.add_argument("--overlays", metavar="DIR",
                         help="also write one PNG per image: boxes and the attention map of the top class")
    predict.add_argument("--score-threshold", type=float, default=0.3, help="boxes drawn on overlays (default 0.3)")
    predict.set_defaults(func=_predict)

    demo = commands.add_parser(
        "demo", help="train RetinaNet and OXnet briefly on synthetic chest X-rays and print both metrics",
        description="Generates synthetic chest X-rays (a quarter with boxes, the rest weak, unlabeled and "
        "validation), trains RetinaNet on the boxes and OXnet (a third of the epochs RetinaNet pretraining, "
        "then all three granularities) for the same number of steps, and prints the validation metrics of "
        "the best epoch of both. About 3 minutes with the tiny preset on 2 CPU cores.",
    )
    demo.add_argument("--preset", default="tiny", choices=["tiny", "cpu"], help="model size (default tiny)")
    demo.add_argument("--epochs", type=int, default=5, help="epochs of each method (default 5)")
    demo.add_argument("--images", type=int, default=160, help="synthetic images in all (default 160)")
    demo.add_argument("--steps-per-epoch", type=int, default=20, help="batches of 8 per epoch (default 20)")
    demo.add_argument("--out", metavar="DIR", help="keep data and checkpoints here (default: a temporary folder)")
    demo.add_argument("--seed", type=int, default=0)
    _add_runtime(demo)
    demo.set_defaults(func=_demo)

    anchors = commands.add_parser(
        "anchors", help="fit anchor sizes to a COCO file's boxes and print how many boxes they cover (JSON)",
        description="Fits one anchor size per pyramid level (k-means on log box size at the network input) and "
        "aspect ratios to the boxes, and prints the box-size quantiles and the share of boxes whose best anchor "
        "has IoU >= 0.5 under the default and the fitted anchors, centred on the box and on the model's anchor "
        "grid (see oxnet.data.anchors). Reads the JSON only. Use the result with oxnet train --model-option.",
    )
    anchors.add_argument("--dataset", required=True, metavar="FILE", help="COCO file of the training boxes")
    anchors.add_argument("--image-size", type=int, required=True, help="network input side in pixels")
    anchors.add_argument("--levels", type=lambda v: tuple(int(x) for x in v.split(",") if x), default=(3, 4, 5, 6, 7),
                         metavar="L,L,...", help="pyramid levels (default 3,4,5,6,7)")
    anchors.set_defaults(func=_anchors)
    add_pretrain_parser(commands)
    return parser


def add_recipe_options(group) -> None:
    """The learning-rate schedule and class balancing of ``oxnet train`` and the sweep (:func:`recipe_options`)."""
    group.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps, metavar="N",
                       help=f"raise the LR linearly from {WARMUP_FACTOR:g} x LR over the first N steps of each phase (default 0: off)")
    group.add_argument("--schedule", choices=SCHEDULES, default=TrainConfig.schedule,
                       help="plateau: LR / 10 when val mAP stalls (per epoch; default); cosine: per-step cosine "
                       "decay to 0 over each phase (resumes only with the same epochs and steps per epoch)")
    group.add_argument("--class-balanced", action="store_true",
                       help="repeat-factor sampling (LVIS): full and weak images of rare classes are drawn more often")
    group.add_argument("--repeat-threshold", type=float, metavar="T",
                       help="classes in fewer than a share T of a pool's images are repeated, sqrt(T / share) times "
                       f"(implies --class-balanced; default {DEFAULT_REPEAT_THRESHOLD})")


def recipe_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`TrainConfig` fields of the options of :func:`add_recipe_options`."""
    balanced = args.class_balanced or args.repeat_threshold is not None
    threshold = args.repeat_threshold if args.repeat_threshold is not None else DEFAULT_REPEAT_THRESHOLD
    return {"warmup_steps": args.warmup_steps, "schedule": args.schedule, "repeat_threshold": threshold if balanced else None}


def _add_runtime(group) -> None:
    group.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")


def _add_model_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint written by oxnet train")
    parser.add_argument("--data", required=True, metavar="FILE", help="COCO JSON of the images")
    parser.add_argument("--images", metavar="DIR", help="folder of relative file_name entries (default: JSON's folder)")
    parser.add_argument("--weights", default="student", choices=["student", "teacher"],
                        help="the trained student (default) or its mean teacher")
    parser.add_argument("--batch-size", type=int, default=8)
    _add_runtime(parser)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------
def _read(files: Sequence[str], images: str | None, classes: Sequence[str] | None, granularity: str | None):
    from oxnet.data import records_from_coco

    records = []
    for file in files:
        part = records_from_coco(file, granularity=granularity, image_root=images, classes=classes)
        classes = part.classes
        records.extend(part)
    return records, list(cast("Sequence[str]", classes))  # callers give classes or at least one file


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _train(args: argparse.Namespace) -> int:
    from oxnet.training.engine import fit

    model_options = dict(args.model_option)
    unknown = set(model_options) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"--model-option: unknown ModelConfig fields {sorted(unknown)}")
    if args.image_size is not None:
        model_options["image_size"] = args.image_size
    if args.depth is not None:
        model_options["depth"] = args.depth
    if args.weights is not None:
        model_options["weights"] = args.weights
    config = TrainConfig(
        preset=args.preset, model=model_options, method=args.method, epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs, batch_size=args.batch_size, proportions=args.proportions,
        steps_per_epoch=args.steps_per_epoch, lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, plateau_patience=args.plateau_patience,
        early_stop_patience=args.early_stop_patience or None, num_workers=args.num_workers, seed=args.seed,
        device=args.device, amp=args.amp, out_dir=args.out, init_checkpoint=args.init, **recipe_options(args),
    )
    train, classes = _read(args.train, args.images, None, None)
    for files, granularity in ((args.weak, WEAK), (args.unlabeled, UNLABELED)):
        train += _read(files, args.images, classes, granularity)[0]
    val, _ = _read([args.val], args.images, classes, None)
    history = fit(train, val, config, classes=classes, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        best = next((e for e in history.epochs if e["epoch"] == history.best_epoch), None)
        _print_json(
            {
                "best_checkpoint": str(history.best_checkpoint) if history.best_checkpoint else None,
                "last_checkpoint": str(history.last_checkpoint),
                "best_epoch": history.best_epoch,
                "epochs": len(history.epochs),
                "stopped_early": history.stopped_early,
                "metrics": best["metrics"] if best else None,
            }
        )
    return 0


def _load(args: argparse.Namespace):
    """(model on its device, classes, records of --data)."""
    from oxnet.training.checkpoint import load_checkpoint, model_from_state
    from oxnet.training.distributed import resolve_device

    state = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = model_from_state(state, weights=args.weights, source=f"checkpoint {args.checkpoint}").to(device)
    records, classes = _read([args.data], args.images, state["classes"], None)
    return model, classes, records, device


def _eval(args: argparse.Namespace) -> int:
    from oxnet.evaluation.predict import evaluate_model

    model, classes, records, device = _load(args)
    metrics = evaluate_model(
        model, records, classes, batch_size=args.batch_size, device=device, num_workers=args.num_workers
    )
    _print_json(metrics)
    return 0


def _category_ids(path: str, classes: Sequence[str]) -> list[int]:
    """COCO category id of each class, by name in the data file; 1..C when it lists no categories."""
    with open(path, encoding="utf-8") as f:
        categories = json.load(f).get("categories") or []
    if not categories:
        return list(range(1, len(classes) + 1))
    id_of = {c["name"]: int(c["id"]) for c in categories}
    missing = [name for name in classes if name not in id_of]
    if missing:
        raise ValueError(f"{path}: its categories lack the model's classes {missing}; add them to 'categories'")
    return [id_of[name] for name in classes]


def _predict(args: argparse.Namespace) -> int:
    from oxnet.data import load_image
    from oxnet.data.overlay import draw_prediction
    from oxnet.evaluation.predict import predict
    from oxnet.evaluation.metrics import coco_results

    model, classes, records, device = _load(args)
    category_ids = _category_ids(args.data, classes)
    predictions = predict(
        model, records, batch_size=args.batch_size, device=device, category_ids=category_ids,
        num_workers=args.num_workers, progress=True,
    )
    results = coco_results(predictions)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results))
    if args.overlays:
        folder = Path(args.overlays)
        folder.mkdir(parents=True, exist_ok=True)
        for record, prediction in zip(records, predictions):
            picture = draw_prediction(
                load_image(record.path), prediction, classes, category_ids=category_ids,
                score_threshold=args.score_threshold,
            )
            picture.save(folder / f"{record.path.stem}.png")
    _print_json({"images": len(records), "detections": len(results), "results": str(out), "overlays": args.overlays})
    return 0


def _demo(args: argparse.Namespace) -> int:
    from oxnet.data import records_from_coco
    from oxnet.data.synthetic import write_coco
    from oxnet.training.engine import fit

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oxnet-demo-") as scratch:
        root = Path(args.out) if args.out else Path(scratch)
        size = PRESETS[args.preset].image_size
        splits = {FULL: 0.25, WEAK: 0.35, UNLABELED: 0.15, "val": 0.25}
        files = write_coco(root / "data", args.images, size=size, seed=args.seed, splits=splits)
        images = root / "data" / "images"
        read = {g: records_from_coco(files[g], granularity=None if g == "val" else g, image_root=images)
                for g in splits}
        classes = read["val"].classes
        train = [r for g in GRANULARITIES for r in read[g]]
        logger.info("synthetic data in %s: %s", root / "data", {g: len(r) for g, r in read.items()})
        # Equal compute for both: the same batches per epoch and epochs; a from-scratch demo learns in
        # minutes with Adam at 1e-3 (the default 1e-4 needs several times more steps).
        common = dict(preset=args.preset, batch_size=8, steps_per_epoch=args.steps_per_epoch, lr=1e-3, seed=args.seed,
                      device=args.device, num_workers=args.num_workers, early_stop_patience=None)
        pretrain = max(1, args.epochs // 3)
        runs = {
            "retinanet": TrainConfig(method="retinanet", epochs=args.epochs, out_dir=str(root / "retinanet"), **common),
            "oxnet": TrainConfig(method="oxnet", pretrain_epochs=pretrain, epochs=max(1, args.epochs - pretrain),
                                 out_dir=str(root / "oxnet"), **common),
        }
        report: dict[str, Any] = {"data": {g: len(r) for g, r in read.items()}, "preset": args.preset}
        for name, config in runs.items():
            logger.info("training %s", name)
            history = fit(train, read["val"], config, classes=classes)
            best = next(e for e in history.epochs if e["epoch"] == history.best_epoch)
            report[name] = {"best_epoch": history.best_epoch, **best["metrics"]}
        report["seconds"] = round(time.perf_counter() - started, 1)
        if args.out:
            report["out"] = str(root)
        _print_json(report)
    return 0


def _anchors(args: argparse.Namespace) -> int:
    from oxnet.data.anchors import anchor_report

    ModelConfig(levels=args.levels, image_size=args.image_size)  # the levels a model can have
    _print_json(anchor_report(args.dataset, args.image_size, args.levels))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oxnet`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input: one clear line, no traceback
        logger.debug("traceback", exc_info=True)
        print(f"oxnet {args.command}: error: {e}", file=sys.stderr)
        return 1
