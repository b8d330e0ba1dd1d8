"""``oxnet pretrain``: in-domain pretraining of the backbone (see :mod:`oxnet.training.pretrain`).

    oxnet pretrain --images xrays/ --preset cpu --epochs 10 --out runs/pretrain           # a folder, labels unused
    oxnet pretrain --data train.json,unlabeled.json --images IMAGES_DIR --labels weak.json \\
        --label-epochs 3 --out runs/pretrain                                              # COCO files + BCE stage
    oxnet train ... --weights runs/pretrain/resnet18_simsiam.pth

Prints JSON (weights file, description, images, per-epoch history, seconds) on stdout; progress bars
and logs on stderr. Re-running the same command continues after the last finished epoch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from oxnet.modeling.config import PRESETS
from oxnet.vocabulary import UNLABELED

logger = logging.getLogger("oxnet.cli")


def add_parser(commands: Any) -> None:
    """Add the ``pretrain`` subcommand to ``oxnet``'s subparsers."""
    from oxnet.training.pretrain import PretrainConfig

    defaults = PretrainConfig()
    p = commands.add_parser(
        "pretrain", help="pretrain the ResNet backbone on your own X-rays (self-supervised SimSiam, labels unused)",
        description="Self-supervised pretraining (SimSiam, from the lightly library) of the detector's ResNet on a "
        "folder or COCO files of images, then optionally an image-level multi-label stage (BCE) on images with "
        "image_labels. Writes OUT/resnet<depth>_simsiam.pth, a torchvision ResNet state_dict every preset takes "
        "(oxnet train --weights FILE), with its description in FILE.json. Restarting with the same --out resumes "
        "after the last finished epoch.",
    )
    data = p.add_argument_group("data")
    data.add_argument("--images", metavar="DIR",
                      help="without --data: a folder of PNG/JPEG/DICOM files (searched recursively); with --data: "
                           "the folder relative file_name entries refer to")
    data.add_argument("--data", type=lambda v: [f for f in v.split(",") if f], default=[], metavar="FILE[,FILE]",
                      help="COCO files whose images are used (their labels are not)")
    data.add_argument("--labels", type=lambda v: [f for f in v.split(",") if f], default=[], metavar="FILE[,FILE]",
                      help="COCO files with image_labels (weak) or boxes (full) for the image-level stage")
    model = p.add_argument_group("model and schedule")
    model.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                       help="the detector preset the weights are for: its depth and image size (default cpu)")
    model.add_argument("--depth", type=int, choices=[18, 34, 50, 101], help="ResNet depth (default: the preset's)")
    model.add_argument("--image-size", type=int, help="crop side in pixels (default: the preset's image size)")
    model.add_argument("--epochs", type=int, default=defaults.epochs, help="SimSiam epochs (default %(default)s)")
    model.add_argument("--label-epochs", type=int, default=0, help="image-level BCE epochs after it (needs --labels)")
    model.add_argument("--batch-size", type=int, default=defaults.batch_size)
    model.add_argument("--steps-per-epoch", type=int, help="batches per epoch (default: every image once)")
    model.add_argument("--lr", type=float, help="SGD learning rate (default 0.05 x batch / 256)")
    model.add_argument("--label-lr", type=float, default=defaults.label_lr, help="Adam learning rate of the label stage")
    model.add_argument("--freeze-bn", action="store_true",
                       help="record that detectors should freeze this backbone's BatchNorm (default: train it)")
    model.add_argument("--backbone-norm", default="batch", choices=["batch", "group"],
                       help="BatchNorm (default) or GroupNorm in the ResNet; group weights need train --model-option "
                            "backbone_norm=group")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/pretrain", metavar="DIR", help="state (last.pt) and weights folder")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    run.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (default: on with CUDA)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from oxnet.cli import _print_json
    from oxnet.data import records_from_coco
    from oxnet.training.pretrain import PretrainConfig, PretrainImage, images_from_folder, images_from_records, pretrain

    preset = PRESETS[args.preset]
    config = PretrainConfig(
        depth=args.depth or preset.depth, image_size=args.image_size or preset.image_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, steps_per_epoch=args.steps_per_epoch, label_epochs=args.label_epochs,
        label_lr=args.label_lr, freeze_bn=args.freeze_bn, backbone_norm=args.backbone_norm, seed=args.seed,
        device=args.device, amp=args.amp, num_workers=args.num_workers,
    )
    if args.data:
        images = []
        for file in args.data:
            images += images_from_records(records_from_coco(file, granularity=UNLABELED, image_root=args.images))
    elif args.images:
        images = images_from_folder(args.images)
    elif not args.labels:
        raise ValueError("give the images: --images DIR (a folder) or --data FILE[,FILE] (COCO)")
    else:
        images = []
    labelled: list[PretrainImage] = []
    classes: list[str] = []
    for file in args.labels:
        records = records_from_coco(file, image_root=args.images, classes=classes or None)
        classes = list(records.classes)
        labelled += images_from_records(records, len(classes))
    if args.labels and not args.data and not args.images:
        images = [type(i)(i.path, i.image_id) for i in labelled]  # the labelled images, labels unused
    if args.labels and not config.label_epochs:
        logger.warning("--labels given without --label-epochs: the image-level stage does not run")
    try:
        result = pretrain(images, args.out, config, labelled=labelled, classes=classes, progress=not args.no_progress)
    except ImportError as e:
        print(f"oxnet pretrain: error: {e}", file=sys.stderr)
        return 1
    _print_json({
        "weights": str(result.weights), "description": result.description, "images": result.images,
        "label_images": result.label_images, "epochs": config.epochs, "label_epochs": config.label_epochs,
        "freeze_bn": config.freeze_bn, "history": result.history, "seconds": round(result.seconds, 1),
        "use": f"oxnet train ... --weights {result.weights}"
               + (" --model-option backbone_norm=group" if config.backbone_norm == "group" else ""),
    })
    return 0
