"""In-domain pretraining of the ResNet backbone: self-supervised (SimSiam), then optionally image-level labels.

No ImageNet weights can be had on an air-gapped hospital server, and the detector from random weights
barely learns on a few hundred box images. This module pretrains the detector's ResNet on the
project's own radiographs, labels unused, and writes a torchvision ResNet state_dict that every preset
takes as its start (``weights="/path.pth"``, ``oxnet train --weights``, ``oxnet-trainer --weights``)::

    from oxnet.training.pretrain import PretrainConfig, images_from_folder, pretrain
    result = pretrain(images_from_folder("xrays/"), "runs/pretrain", PretrainConfig(depth=18, epochs=10))
    model = build_model(preset="cpu", weights=str(result.weights))     # backbone_start names the pretraining

**Why SimSiam** (Chen & He, CVPR 2021; heads and loss from the ``lightly`` library): it needs neither
negatives nor a momentum encoder. MoCo v2's queue of negatives is larger than a small project's whole
image set (the same X-ray would be its own negative), and BYOL's and MoCo's momentum encoder costs a
third forward pass per step, which on a CPU is a third more time. SimSiam was designed for ResNets,
works with batches of 64 and fewer (the paper's Table 2) and is two forward passes of one network.
The stop-gradient keeps it from collapsing; the per-epoch ``z_std`` (the standard deviation of the
L2-normalised projections, about ``1/sqrt(dim)`` when healthy, 0 when collapsed) shows whether it did.

**Augmentations** (``torchvision.transforms.v2``, on the 1-channel image): random resized crop at scale
0.5-1.0 (a radiograph's findings can sit anywhere; the aggressive 0.08-1.0 of natural images crops them
away), rotation of at most 10 degrees, horizontal flip, gamma and brightness/contrast (exposure varies
between machines), a small Gaussian blur. No colour jitter, saturation, hue or solarisation: the
images are grayscale and those would teach nothing about them.

**Stages.** (1) SimSiam on every image, SGD with momentum 0.9, weight decay 1e-4, lr 0.05 x batch / 256
(the paper's rule) with cosine decay, the predictor at a fixed lr. (2) With ``label_epochs`` and
labelled records: image-level multi-label BCE (over the project's classes, not-assessed classes masked)
on the weak and full images, a linear layer on the pooled C5 of the SSL backbone, Adam.

**Files** in ``out_dir``: ``last.pt`` (the whole state after every finished epoch, atomically written:
model, optimizer, scheduler, scaler, history; re-running with the same ``out_dir`` continues after the
last finished epoch) and, at the end, ``resnet<depth>_simsiam.pth`` (the backbone's state_dict: keys
of ``torchvision.models.resnet<depth>`` without ``fc.*``) with ``resnet<depth>_simsiam.pth.json``
beside it (see :mod:`oxnet.modeling.weights_file`: the description the detector shows as its start,
and ``freeze_bn``).

**BatchNorm of the detector** after this start: trained by default (``freeze_bn=False`` in the
description). The paper freezes BatchNorm because ImageNet statistics, learnt with large batches on
millions of images, are better than a detection batch's. Statistics from a short SimSiam run on a few
thousand augmented crops at another resolution are not: the detector sees whole images at its own size
and its FPN and heads start from random, the regime in which the project trains BatchNorm from scratch.
``PretrainConfig(freeze_bn=True)`` (``oxnet pretrain --freeze-bn``) records the other choice, and
``freeze_bn`` in the model options overrides either.

**GroupNorm**: ``PretrainConfig(backbone_norm="group")`` (``oxnet pretrain --backbone-norm group``) pretrains
a ResNet with GroupNorm in place of BatchNorm; its file has no running statistics and starts detectors
built with ``backbone_norm="group"`` (the SimSiam heads keep lightly's BatchNorm; they are not saved).

Needs the optional dependency ``lightly`` (``pip install "oxnet-workbench[ssl]"``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models import resnet
from torchvision.transforms import v2
from tqdm.auto import tqdm

from oxnet.data.datasets import UnreadableImage
from oxnet.data.records import Record
from oxnet.data.transforms import load_image
from oxnet.files import atomic_write, write_json
from oxnet.modeling.backbone import IMAGENET_MEAN, IMAGENET_STD
from oxnet.modeling.config import check_backbone_norm
from oxnet.modeling.heads import group_norm
from oxnet.modeling.weights_file import FORMAT as INFO_FORMAT
from oxnet.modeling.weights_file import info_path
from oxnet.training.checkpoint import save_checkpoint
from oxnet.vocabulary import FULL, WEAK

logger = logging.getLogger(__name__)

FORMAT = "oxnet-pretrain"
VERSION = 1
METHOD = "simsiam"
STATE_FILE = "last.pt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
_RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
#: Config fields that may change between a run and its resumption (they do not change the result).
_RUNTIME_FIELDS = ("device", "amp", "num_workers")

__all__ = ["PretrainConfig", "PretrainImage", "PretrainResult", "SimSiam", "images_from_folder", "images_from_records",
           "pretrain", "weights_name", "xray_augmentation"]


def _lightly():
    """lightly's SimSiam heads and loss, or an ImportError that says how to install them."""
    try:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    except ImportError as e:
        raise ImportError("oxnet pretrain needs the 'lightly' package: pip install \"oxnet-workbench[ssl]\" "
                          f"(or pip install 'lightly>=1.6'); {e}") from e
    return SimSiamProjectionHead, SimSiamPredictionHead, NegativeCosineSimilarity


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run (stored in its state file; a resumed run must have the same).

    Args:
        depth: ResNet depth (18, 34, 50, 101): the detector preset's.
        image_size: side of the square crops in pixels (the detector's input size is a good choice).
        epochs: SimSiam epochs (0: skip the self-supervised stage; only with ``label_epochs``).
        batch_size: images per batch (two views each); at least 2 (BatchNorm in the heads).
        lr: SGD learning rate of the backbone and projector; None: 0.05 * batch_size / 256 (SimSiam).
        steps_per_epoch: batches per epoch (None: every image once).
        proj_dim: projection (and prediction output) size; None: the backbone's feature size.
        label_epochs: epochs of the image-level multi-label stage (needs labelled records).
        label_lr: Adam learning rate of that stage.
        crop_scale: the random resized crop's area range (a fraction of the image).
        max_rotation: degrees of the random rotation at most.
        freeze_bn: the detector's BatchNorm default recorded for this start (see the module docstring).
        backbone_norm: "batch" (BatchNorm2d) or "group" (GroupNorm, 32 groups; ``freeze_bn`` must stay False):
            the detector's ``backbone_norm`` that can take the weights.
        seed: augmentations and order come from (seed, epoch, index).
        device: "auto" (CUDA when available), "cpu", "cuda[:N]".
        amp: mixed precision; None: on with CUDA.
        num_workers: DataLoader worker processes.
    """

    depth: int = 18
    image_size: int = 256
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None
    steps_per_epoch: int | None = None
    proj_dim: int | None = None
    label_epochs: int = 0
    label_lr: float = 1e-4
    crop_scale: tuple[float, float] = (0.5, 1.0)
    max_rotation: float = 10.0
    freeze_bn: bool = False
    backbone_norm: str = "batch"
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_scale", tuple(float(x) for x in self.crop_scale))
        if self.depth not in _RESNETS:
            raise ValueError(f"depth must be one of {sorted(_RESNETS)}, got {self.depth}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (the ResNet downsamples 32x), got {self.image_size}")
        if self.epochs < 0 or self.label_epochs < 0 or self.epochs + self.label_epochs < 1:
            raise ValueError(f"epochs and label_epochs must be >= 0 and not both 0, got {self.epochs}, {self.label_epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm in the SimSiam heads), got {self.batch_size}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 <= self.max_rotation <= 45:
            raise ValueError(f"max_rotation must be in [0, 45] degrees, got {self.max_rotation}")
        check_backbone_norm(self.backbone_norm, self.freeze_bn)

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 0.05 * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def weights_name(depth: int) -> str:
    """File name of the backbone weights a run writes: ``resnet<depth>_simsiam.pth``."""
    return f"resnet{depth}_{METHOD}.pth"


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainImage:
    """One image: its file, its store/COCO id when it has one, and (label stage) its image-level labels.

    ``labels`` and ``mask`` are 0/1 per class (mask 0 = not assessed); None for unlabelled images.
    """

    path: str
    image_id: int | None = None
    labels: tuple[float, ...] | None = None
    mask: tuple[float, ...] | None = None


def images_from_folder(folder: str | Path) -> list[PretrainImage]:
    """Every PNG, JPEG and DICOM file under ``folder`` (recursively, sorted by path).

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: it holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    return [PretrainImage(str(p)) for p in paths]


def images_from_records(records: Sequence[Record], num_classes: int | None = None) -> list[PretrainImage]:
    """Images of :class:`~oxnet.data.records.Record` s. With ``num_classes``, the weak and full records with
    at least one known class, with their image-level labels and mask (the label stage's input); without
    it, every record, labels unused (the self-supervised stage's input)."""
    if num_classes is None:
        return [PretrainImage(str(r.path), r.image_id) for r in records]
    out = []
    for r in records:
        if r.granularity not in (WEAK, FULL) or len(r.unknown_labels) >= num_classes:
            continue
        labels = np.zeros(num_classes, dtype=np.float32)
        labels[list(r.image_labels)] = 1.0
        mask = np.ones(num_classes, dtype=np.float32)
        mask[list(r.unknown_labels)] = 0.0
        out.append(PretrainImage(str(r.path), r.image_id, tuple(labels.tolist()), tuple(mask.tolist())))
    return out


class RandomGamma(v2.Transform):
    """Gamma drawn log-uniformly from [exp(-gamma), exp(gamma)] (exposure), on images in [0, 1]."""

    def __init__(self, gamma: float = 0.3) -> None:
        super().__init__()
        self.gamma = gamma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"gamma": math.exp(float(torch.empty(()).uniform_(-self.gamma, self.gamma)))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.adjust_gamma, inpt, gamma=params["gamma"])


def _clamp01(image: Tensor) -> Tensor:
    return image.clamp(0.0, 1.0)


def xray_augmentation(size: int, *, crop_scale: tuple[float, float] = (0.5, 1.0), max_rotation: float = 10.0) -> v2.Compose:
    """One random view of a chest X-ray: Tensor[1, H, W] in [0, 1] -> Tensor[1, size, size] in [0, 1].

    Geometry: random resized crop (area ``crop_scale``, aspect 3/4-4/3), rotation up to ``max_rotation``
    degrees, horizontal flip. Intensity: gamma (p 0.8), brightness/contrast 0.3 (p 0.8), Gaussian blur
    sigma 0.1-1.5 px (p 0.3). No colour operation: the image stays one channel.
    """
    blur = max(3, (size // 20) | 1)
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=crop_scale, ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomRotation(max_rotation),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([RandomGamma(0.3)], p=0.8),
        v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3)], p=0.8),
        v2.RandomApply([v2.GaussianBlur(blur, sigma=(0.1, 1.5))], p=0.3),
        v2.Lambda(_clamp01),
    ])


class _Views(Dataset):
    """``views`` augmented views of each image (+ its labels and mask in the label stage), reproducible
    from (seed, epoch, index) whichever worker loads it."""

    def __init__(self, images: Sequence[PretrainImage], augment: v2.Compose, *, views: int, seed: int) -> None:
        self.images, self.augment, self.views, self.seed, self.epoch = list(images), augment, views, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        item = self.images[index]
        where = f"{item.path} (image id {item.image_id})" if item.image_id is not None else item.path
        try:
            image = load_image(item.path)
        except (OSError, ValueError) as e:
            reason = "file not found" if isinstance(e, FileNotFoundError) else str(e).removeprefix(f"{item.path}: ")
            raise UnreadableImage(f"{where}: {reason}", image_id=item.image_id, reason=reason) from e
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views = [self.augment(image) for _ in range(self.views)]
        if item.labels is None:
            return tuple(views)
        return views[0], torch.tensor(item.labels), torch.tensor(item.mask)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def _backbone(depth: int, norm: str = "batch") -> resnet.ResNet:
    body = _RESNETS[depth](weights=None, norm_layer=group_norm if norm == "group" else nn.BatchNorm2d)
    body.fc = nn.Identity()  # no fc.* keys: the state_dict is the detector's backbone
    return body


def _prepare(images: Tensor) -> Tensor:
    """As the detector does (OXNet._batch): gray -> 3 channels, ImageNet normalisation."""
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


class SimSiam(nn.Module):
    """ResNet backbone + lightly's SimSiam projection and prediction heads.

    ``forward(images: Tensor[B, 1 or 3, H, W] in [0, 1])`` returns ``(z, p)``: the projection (detached,
    the stop-gradient) and the prediction, both Tensor[B, proj_dim].
    """

    def __init__(self, depth: int, proj_dim: int | None = None, norm: str = "batch") -> None:
        super().__init__()
        projection, prediction, _ = _lightly()
        self.backbone = _backbone(depth, norm)
        features = 512 if depth in (18, 34) else 2048
        dim = proj_dim or features
        self.projection_head = projection(features, dim, dim)
        self.prediction_head = prediction(dim, max(dim // 4, 8), dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projection_head(self.backbone(_prepare(images)))
        return z.detach(), self.prediction_head(z)


class ImageLevelClassifier(nn.Module):
    """The backbone's pooled C5 -> one logit per class (the label stage)."""

    def __init__(self, backbone: nn.Module, features: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.backbone(_prepare(images)))


def masked_bce(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Mean BCE over the known (mask 1) entries of Tensor[B, C] logits and 0/1 labels; 0 when none is known."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), weight=mask.float(), reduction="sum")
    return loss / mask.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    """What a run wrote: the weights file, its description, and the per-epoch history
    (``{"stage", "epoch", "loss", "z_std" (SSL), "seconds"}``)."""

    weights: Path
    description: str
    images: int
    label_images: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign: name it
        raise ValueError(f"pretraining state {path} cannot be read (truncated or corrupt?): {type(e).__name__}: {e}; "
                         "remove it to start over") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an oxnet pretraining state (no format={FORMAT!r}); use another out_dir")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"pretraining state {path} has version {state['version']}; this oxnet reads <= {VERSION}")
    return state


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k not in _RUNTIME_FIELDS}


def _loader(dataset: _Views, config: PretrainConfig, epoch: int) -> DataLoader:
    dataset.epoch = epoch
    batch = min(config.batch_size, len(dataset))
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, epoch, 7]).generate_state(1)[0]))
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, generator=generator,
                      num_workers=config.num_workers, persistent_workers=False)


def pretrain(
    images: Sequence[PretrainImage],
    out_dir: str | Path,
    config: PretrainConfig = PretrainConfig(),
    *,
    labelled: Sequence[PretrainImage] = (),
    classes: Sequence[str] = (),
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> PretrainResult:
    """Pretrain a ResNet backbone: SimSiam on ``images`` for ``config.epochs``, then image-level BCE on
    ``labelled`` (with ``labels``/``mask``, see :func:`images_from_records`) for ``config.label_epochs``.

    Re-running with the same ``out_dir`` (and config) continues after the last finished epoch; a run
    whose weights file is written returns at once.

    Args:
        images: the self-supervised stage's images (labels unused); at least 2.
        out_dir: folder of ``last.pt`` and the weights file.
        labelled: the label stage's images; ``classes`` names their label columns.
        callback: called after every step with ``{"stage", "epoch", "epochs", "step", "steps", "loss"}``;
            an exception it raises stops the run (the last finished epoch stays saved).
        progress: tqdm bars on stderr.
        stop_after_epochs: stop (without writing the weights) once this many epochs of both stages are
            finished in this call (a budget; tests use it to simulate a kill).

    Returns:
        :class:`PretrainResult`; ``weights`` exists unless ``stop_after_epochs`` stopped the run first.

    Raises:
        ValueError: too few images, a label stage without labelled images, a state file from another
            config, or a non-finite loss (naming the stage, epoch and step).
        UnreadableImage: an image cannot be read (its path and id in the message).
        ImportError: ``lightly`` is not installed.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    images = list(images)
    labelled = list(labelled)
    if config.epochs and len(images) < 2:
        raise ValueError(f"self-supervised pretraining needs at least 2 images, got {len(images)}")
    if config.label_epochs:
        if not labelled:
            raise ValueError("label_epochs > 0 needs images with image-level labels (weak or full), none given")
        widths = {len(i.labels or ()) for i in labelled}
        if widths != {len(classes)} or not classes:
            raise ValueError(f"labelled images must carry one label per class ({len(classes)} classes), got widths {sorted(widths)}")
        if len(labelled) < 2:
            raise ValueError(f"the label stage needs at least 2 labelled images, got {len(labelled)}")
    weights = out_dir / weights_name(config.depth)
    state_path = out_dir / STATE_FILE
    device = _device(config.device)
    amp = (device.type == "cuda") if config.amp is None else bool(config.amp and device.type == "cuda")

    features = 512 if config.depth in (18, 34) else 2048
    with torch.random.fork_rng(devices=[]):  # the same initial weights for the same seed (and a resume)
        torch.manual_seed(config.seed)
        model = SimSiam(config.depth, config.proj_dim, config.backbone_norm)
        classifier = ImageLevelClassifier(model.backbone, features, len(classes)) if config.label_epochs else None
    _, _, criterion_cls = _lightly()
    criterion = criterion_cls()
    state: dict[str, Any] | None = None
    if state_path.is_file():
        state = _load_state(state_path)
        if _comparable(PretrainConfig.from_dict(state["config"]).to_dict()) != _comparable(config.to_dict()):
            raise ValueError(f"{state_path} was written with other settings ({state['config']}); "
                             "use another out_dir or the same settings to resume")
        if state.get("images") != len(images) or state.get("label_images") != len(labelled):
            logger.warning("%s: resuming with %d images (%d labelled), the run started with %s (%s)", state_path,
                           len(images), len(labelled), state.get("images"), state.get("label_images"))
    history: list[dict[str, Any]] = list(state["history"]) if state else []
    description = _description(config, len(images), len(labelled), classes)
    if state and state.get("stage") == "done" and weights.is_file():
        logger.info("pretraining in %s is finished; using %s", out_dir, weights)
        return PretrainResult(weights, description, len(images), len(labelled), history, time.perf_counter() - started)

    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    epochs_this_call = 0

    def save(stage: str, epoch: int, optimizer, scheduler) -> None:
        save_checkpoint({
            "format": FORMAT, "version": VERSION, "config": config.to_dict(), "stage": stage, "epoch": epoch,
            "model": model.state_dict(), "classifier": classifier.classifier.state_dict() if classifier else None,
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None, "scaler": scaler.state_dict(),
            "history": history, "images": len(images), "label_images": len(labelled), "classes": list(classes),
        }, state_path)

    stage, done = (state["stage"], state["epoch"]) if state else ("ssl" if config.epochs else "labels", 0)
    if state:
        model.load_state_dict(state["model"])
        if classifier is not None and state.get("classifier") is not None:
            classifier.classifier.load_state_dict(state["classifier"])
        if state.get("scaler"):  # empty when written without AMP (CPU)
            scaler.load_state_dict(state["scaler"])
        logger.info("resuming pretraining in %s: stage %s after epoch %d", out_dir, stage, done)

    def stopped() -> bool:
        return stop_after_epochs is not None and epochs_this_call >= stop_after_epochs

    def result() -> PretrainResult:
        return PretrainResult(weights, description, len(images), len(labelled), history, time.perf_counter() - started)

    augment = xray_augmentation(config.image_size, crop_scale=config.crop_scale, max_rotation=config.max_rotation)
    run: dict[str, Any] = dict(scaler=scaler, device=device, callback=callback, progress=progress)
    # -- stage 1: SimSiam ---------------------------------------------------------------------------
    if stage == "ssl":
        dataset = _Views(images, augment, views=2, seed=config.seed)
        steps = _steps(len(dataset), config)
        total = max(1, steps * config.epochs)
        optimizer: torch.optim.Optimizer = torch.optim.SGD([
            {"params": list(model.backbone.parameters()) + list(model.projection_head.parameters())},
            {"params": model.prediction_head.parameters()},  # SimSiam: the predictor's lr is not decayed
        ], lr=config.learning_rate(), momentum=0.9, weight_decay=1e-4)
        cosine = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [cosine, lambda step: 1.0])
        if state and state.get("optimizer") is not None and state["stage"] == "ssl":
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])

        def ssl_loss(x0: Tensor, x1: Tensor) -> tuple[Tensor, dict[str, float]]:
            if device.type == "cuda":
                x0, x1 = x0.contiguous(memory_format=torch.channels_last), x1.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=amp):
                z0, p0 = model(x0)
                z1, p1 = model(x1)
            loss = 0.5 * (criterion(z0.float(), p1.float()) + criterion(z1.float(), p0.float()))
            return loss, {"z_std": F.normalize(z0.float(), dim=1).std(0).mean().item()}

        for epoch in range(done, config.epochs):
            if stopped():
                return result()
            clock = time.perf_counter()
            model.train()
            means = train_one_epoch(ssl_loss, optimizer, _loader(dataset, config, epoch), steps=steps, scheduler=scheduler,
                                    stage="ssl", epoch=epoch, epochs=config.epochs, **run)
            history.append({"stage": "ssl", "epoch": epoch + 1, **means, "lr": optimizer.param_groups[0]["lr"],
                            "seconds": round(time.perf_counter() - clock, 2)})
            logger.info("ssl epoch %d/%d: loss %.4f, z_std %.4f (collapse: 0; healthy: about %.3f)", epoch + 1, config.epochs,
                        means["loss"], means["z_std"], 1 / math.sqrt(model.projection_head.layers[-2].out_features))
            epochs_this_call += 1
            if epoch + 1 < config.epochs:
                save("ssl", epoch + 1, optimizer, scheduler)
            else:
                save("labels" if config.label_epochs else "done", 0, None, None)
        stage, done = ("labels" if config.label_epochs else "done"), 0

    # -- stage 2: image-level labels ----------------------------------------------------------------
    if stage == "labels":
        dataset = _Views(labelled, augment, views=1, seed=config.seed + 1)
        steps = _steps(len(dataset), config)
        label_model = cast(ImageLevelClassifier, classifier)  # stage "labels" needs label_epochs, which built it
        label_model.to(device)
        optimizer = torch.optim.Adam(label_model.parameters(), lr=config.label_lr)
        if state and state.get("optimizer") is not None and state["stage"] == "labels":
            optimizer.load_state_dict(state["optimizer"])

        def label_loss(x: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
            with torch.autocast(device.type, enabled=amp):
                logits = label_model(x)
            return masked_bce(logits, y, mask), {}

        for epoch in range(done, config.label_epochs):
            if stopped():
                return result()
            clock = time.perf_counter()
            label_model.train()
            means = train_one_epoch(label_loss, optimizer, _loader(dataset, config, 10_000 + epoch), steps=steps,
                                    stage="labels", epoch=epoch, epochs=config.label_epochs, **run)
            history.append({"stage": "labels", "epoch": epoch + 1, **means, "seconds": round(time.perf_counter() - clock, 2)})
            logger.info("labels epoch %d/%d: BCE %.4f", epoch + 1, config.label_epochs, means["loss"])
            epochs_this_call += 1
            last = epoch + 1 == config.label_epochs
            save("done" if last else "labels", 0 if last else epoch + 1, optimizer, None)

    _write_weights(model.backbone, weights, config, description, len(images), len(labelled), classes, history)
    return result()


def _steps(images: int, config: PretrainConfig) -> int:
    """Batches per epoch: every image once (the last partial batch dropped), at most ``steps_per_epoch``."""
    return min(images // min(config.batch_size, images), config.steps_per_epoch or images)


def train_one_epoch(
    loss_of: Callable[..., tuple[Tensor, dict[str, float]]],
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    steps: int,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    stage: str,
    epoch: int,
    epochs: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """The plain loop: batch -> ``loss_of(*batch)`` (the loss and monitored values) -> finite check ->
    backward -> optimizer step -> scheduler step, for ``steps`` batches. Returns the means over the epoch
    of ``loss`` and of every monitored value.

    Raises:
        ValueError: a non-finite loss, naming the stage, epoch and step (nothing of that step is applied).
    """
    sums: dict[str, float] = {}
    done = 0
    bar = tqdm(loader, total=steps, desc=f"{stage} epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
    for step, batch in enumerate(bar):
        if step >= steps:
            break
        loss, monitored = loss_of(*(b.to(device, non_blocking=True) for b in batch))
        if not torch.isfinite(loss):
            raise ValueError(f"pretraining ({stage}): non-finite loss {loss.item()} at epoch {epoch + 1} step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        values = {"loss": loss.item(), **monitored}
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        done += 1
        bar.set_postfix(loss=f"{values['loss']:.3f}")
        if callback is not None:
            callback({"stage": stage, "epoch": epoch, "epochs": epochs, "step": step + 1, "steps": steps, "loss": values["loss"]})
    return {key: value / max(1, done) for key, value in sums.items()}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def _description(config: PretrainConfig, images: int, labelled: int, classes: Sequence[str]) -> str:
    parts = []
    if config.epochs:
        parts.append(f"self-supervised: {METHOD}, {_count(images, 'image')}, {_count(config.epochs, 'epoch')}")
    if config.label_epochs:
        parts.append(f"image-level labels: {_count(labelled, 'image')}, {_count(len(classes), 'class')}, "
                     f"{_count(config.label_epochs, 'epoch')}")
    return "; ".join(parts)


def _write_weights(backbone: nn.Module, path: Path, config: PretrainConfig, description: str, images: int,
                   labelled: int, classes: Sequence[str], history: list[dict[str, Any]]) -> None:
    """The backbone's state_dict (CPU tensors, torchvision ResNet keys) and its description, both atomic;
    the description is written first, so a weights file never lacks it."""
    sd = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"pretraining produced non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]}; nothing written")
    write_json(info_path(path), {
        "format": INFO_FORMAT, "version": 1, "description": description, "freeze_bn": config.freeze_bn,
        "backbone_norm": config.backbone_norm,
        "method": METHOD if config.epochs else None, "depth": config.depth, "image_size": config.image_size,
        "images": images, "epochs": config.epochs, "label_images": labelled, "label_epochs": config.label_epochs,
        "classes": list(classes), "config": config.to_dict(), "history": history,
    })
    with atomic_write(path, binary=True) as f:  # a bare state_dict (no "format" entry): torchvision loads it
        torch.save(sd, f)
