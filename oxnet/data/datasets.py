"""The training/evaluation dataset of mixed granularities and its collate function.

One sample is ``(image, teacher_image, target)``; :func:`collate` stacks samples into the batch the
model consumes::

    images:          Tensor[B, 1, S, S] float32 in [0, 1]   student view
    teacher_images:  Tensor[B, 1, S, S] float32 in [0, 1]   teacher view (same resize and flip)
    targets:         list of B dicts
        "granularity":  "full" | "weak" | "unlabeled"
        "boxes":        Tensor[K, 4] float32 (x1, y1, x2, y2) in pixels of the S x S image (K = 0 unless full)
        "labels":       Tensor[K] int64, 0-based class indices
        "image_labels": Tensor[C] float32, 1 = class present (full: classes of its boxes; unlabeled: zeros)
        "image_label_mask": Tensor[C] float32, 1 = class known (present or absent), 0 = not assessed
                        (full: all ones; weak: zeros at ``Record.unknown_labels``; unlabeled: all zeros)
        "image_id":     int
        "orig_size":    (height, width) of the original image
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from oxnet.data.records import Record
from oxnet.data.transforms import STUDENT_AUGMENT, TEACHER_AUGMENT, Photometric, load_image, resize_flip
from oxnet.vocabulary import FULL, UNLABELED, WEAK

Target = dict[str, Any]

_IMAGE_ID = re.compile(r"\(image id (-?\d+)\)")


class UnreadableImage(ValueError):
    """A sample's file cannot be read or does not match its record (missing, corrupt, other size).

    ``image_id`` names the record. The message holds ``(image id N)``, so the id survives a DataLoader
    worker (which re-raises the exception type with the formatted traceback as its only argument).
    """

    def __init__(self, message: str, *, image_id: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        if image_id is None:
            found = _IMAGE_ID.findall(message)
            image_id = int(found[-1]) if found else None
        self.image_id = image_id
        self.reason = reason or message.strip().splitlines()[-1].split("): ", 1)[-1]


class OmniDataset(Dataset[tuple[Tensor, Tensor, Target]]):
    """Images of all three granularities, resized to ``size`` x ``size``, as two views.

    In training mode both views share one random horizontal flip and get their own photometric
    augmentation (``student`` mild, ``teacher`` stronger with cutout). In evaluation mode
    (``train=False``) nothing is random and the teacher view is the student view.
    Randomness is drawn from (``seed``, epoch, index): call :meth:`set_epoch` before each epoch.

    Args:
        records: the images (for example from :func:`~oxnet.data.records.records_from_coco`).
        num_classes: number of classes C (length of ``image_labels``).
        size: side S of the square network input; images are resized without cropping.
        train: augment (True) or not (False).
        flip_p: probability of a horizontal flip in training mode.
        student, teacher: photometric augmentation of each view in training mode.
        seed: base seed of the augmentation.
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        num_classes: int,
        size: int = 512,
        train: bool = True,
        flip_p: float = 0.5,
        student: Photometric = STUDENT_AUGMENT,
        teacher: Photometric = TEACHER_AUGMENT,
        seed: int = 0,
    ) -> None:
        if num_classes <= 0 or size <= 0:
            raise ValueError(f"num_classes and size must be positive, got {num_classes} and {size}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        duplicates = [i for i, n in Counter(r.image_id for r in records).items() if n > 1]
        if duplicates:
            raise ValueError(f"duplicate image ids: {duplicates[:10]}")
        for r in records:
            if any(not 0 <= c < num_classes for c in (*r.image_labels, *r.unknown_labels)):
                raise ValueError(f"{r.path} (image id {r.image_id}): class index outside [0, {num_classes})")
        self.records = list(records)
        self.num_classes = num_classes
        self.size = size
        self.train = train
        self.flip_p = flip_p
        self.student = student
        self.teacher = teacher
        self.seed = seed
        self.epoch = 0

    @property
    def granularities(self) -> list[str]:
        """Granularity of each sample, in index order (the input of ``MixedBatchSampler``)."""
        return [self._granularity(r) for r in self.records]

    @property
    def class_sets(self) -> list[tuple[int, ...]]:
        """Classes of each sample, in index order, from the records (no image is read): a full image's
        box classes, a weak image's present classes, none for an unlabeled image (class-balanced
        sampling in ``MixedBatchSampler``)."""
        return [self._classes(r) for r in self.records]

    def _classes(self, record: Record) -> tuple[int, ...]:
        granularity = self._granularity(record)
        if granularity == FULL:
            return tuple(np.unique(record.labels).tolist())
        return record.image_labels if granularity == WEAK else ()

    def _granularity(self, record: Record) -> str:
        """A weak image with no known class (every class not assessed) is trained as unlabeled."""
        if record.granularity == WEAK and len(record.unknown_labels) >= self.num_classes:
            return UNLABELED
        return record.granularity

    def set_epoch(self, epoch: int) -> None:
        """Draw new augmentations for ``epoch`` (call before creating the epoch's DataLoader iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Target]:
        """Returns ``(image, teacher_image, target)``: two Tensor[1, S, S] and the target dict.

        Raises:
            UnreadableImage: the file is missing, cannot be decoded or has another size than its record.
        """
        record = self.records[index]
        where = f"{record.path} (image id {record.image_id})"
        try:
            image = load_image(record.path)
        except (OSError, ValueError) as e:
            reason = str(e).removeprefix(f"{record.path}: ")
            if isinstance(e, FileNotFoundError):
                reason = "file not found"
            raise UnreadableImage(f"{where}: {reason}", image_id=record.image_id, reason=reason) from e
        if tuple(image.shape[-2:]) != (record.height, record.width):
            reason = f"image is {image.shape[-1]}x{image.shape[-2]}, the record says {record.width}x{record.height}"
            raise UnreadableImage(f"{where}: {reason}", image_id=record.image_id, reason=reason)
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        )
        flip = self.train and torch.rand((), generator=generator).item() < self.flip_p
        image, boxes = resize_flip(image, torch.from_numpy(record.boxes), self.size, flip)
        if self.train:
            student, teacher = self.student(image, generator), self.teacher(image, generator)
        else:
            student = teacher = image
        image_labels = torch.zeros(self.num_classes, dtype=torch.float32)
        granularity = self._granularity(record)
        image_labels[list(record.image_labels)] = 1.0
        if granularity == UNLABELED:
            mask = torch.zeros(self.num_classes, dtype=torch.float32)
        else:
            mask = torch.ones(self.num_classes, dtype=torch.float32)
            mask[list(record.unknown_labels)] = 0.0
        target = {
            "granularity": granularity,
            "boxes": boxes,
            "labels": torch.tensor(record.labels, dtype=torch.int64),
            "image_labels": image_labels,
            "image_label_mask": mask,
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        return student, teacher, target


def collate(batch: Sequence[tuple[Tensor, Tensor, Target]]) -> tuple[Tensor, Tensor, list[Target]]:
    """Stack ``OmniDataset`` samples: ``(images[B, 1, S, S], teacher_images[B, 1, S, S], targets)``."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    shapes = {tuple(image.shape) for image, _, _ in batch}
    if len(shapes) != 1:
        raise ValueError(f"all images of a batch must have one size, got {sorted(shapes)}")
    images = torch.stack([image for image, _, _ in batch])
    teacher_images = torch.stack([teacher for _, teacher, _ in batch])
    return images, teacher_images, [target for _, _, target in batch]
