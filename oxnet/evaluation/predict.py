"""Prediction and evaluation of a trained model: detections in ORIGINAL image pixels
(:func:`predict`), the COCO ground truth of fully labeled records (:func:`ground_truth`) and both
through :func:`oxnet.evaluation.metrics.evaluate` (:func:`evaluate_model`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.ops import box_convert
from tqdm.auto import tqdm

from oxnet.data.datasets import OmniDataset, collate
from oxnet.data.records import Record
from oxnet.data.transforms import to_original_pixels
from oxnet.evaluation.metrics import evaluate
from oxnet.modeling.detector import OXNet
from oxnet.training.distributed import to_device
from oxnet.vocabulary import FULL


def ground_truth(records: Sequence[Record], classes: Sequence[str]) -> dict[str, Any]:
    """The COCO ground-truth dict of fully labeled records, in ORIGINAL pixels, for
    :func:`oxnet.evaluation.metrics.evaluate`: category id ``i + 1`` is ``classes[i]``; every image keeps its
    image-level labels (``image_labels``, class names) for the image-level AUC.

    Raises:
        ValueError: a record is not "full" (boxes may be missing: it cannot be evaluated).
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for r in records:
        if r.granularity != FULL:
            raise ValueError(
                f"{r.path} (image id {r.image_id}) is {r.granularity}: evaluation needs fully labeled images"
            )
        images.append(
            {
                "id": r.image_id,
                "file_name": str(r.path),
                "width": r.width,
                "height": r.height,
                "image_labels": [classes[c] for c in r.image_labels],
            }
        )
        xywh = box_convert(torch.tensor(r.boxes, dtype=torch.float64).reshape(-1, 4), "xyxy", "xywh")  # float64: exact widths
        for bbox, label in zip(xywh.tolist(), r.labels.tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": r.image_id,
                    "category_id": label + 1,
                    "bbox": bbox,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


@torch.no_grad()
def predict(
    model: OXNet,
    records: Sequence[Record],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    category_ids: Sequence[int] | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Detect on ``records`` (any granularity; images are resized to the model's ``image_size``).

    Args:
        model: an :class:`~oxnet.modeling.detector.OXNet` (put in eval mode for the call, then restored).
        records: the images.
        batch_size, num_workers: of the DataLoader.
        device: where ``model`` is.
        category_ids: COCO category id of each class index; default ``1..C``.
        progress: show a tqdm bar.

    Returns:
        One dict per record, in order, on the CPU, ready for :func:`oxnet.evaluation.metrics.evaluate` and
        :func:`oxnet.evaluation.metrics.coco_results`: "image_id" int, "boxes" Tensor[D, 4] (x1, y1, x2, y2) in
        ORIGINAL image pixels, "scores" Tensor[D], "labels" Tensor[D] int64 category ids,
        "image_probs" Tensor[C] (class index order) and "attention" Tensor[C, h, w] (DAA attention on the
        C5 grid of the resized image).
    """
    device = torch.device(device)
    num_classes = model.num_classes
    ids = torch.arange(1, num_classes + 1) if category_ids is None else torch.as_tensor(list(category_ids))
    if ids.shape != (num_classes,):
        raise ValueError(f"category_ids must have one id per class ({num_classes}), got {ids.tolist()}")
    dataset = OmniDataset(records, num_classes=num_classes, size=model.config.image_size, train=False)
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    was_training = model.training
    model.eval()
    results = []
    try:
        for images, _, targets in tqdm(loader, desc="predict", disable=not progress, leave=False):
            size = tuple(images.shape[-2:])
            for det, t in zip(model(to_device(images, device)), targets):
                results.append(
                    {
                        "image_id": int(t["image_id"]),
                        "boxes": to_original_pixels(det["boxes"].float().cpu(), size, t["orig_size"]),
                        "scores": det["scores"].float().cpu(),
                        "labels": ids[det["labels"].cpu()],
                        "image_probs": det["image_probs"].float().cpu(),
                        "attention": det["attention"].float().cpu(),
                    }
                )
    finally:
        model.train(was_training)
    return results


def evaluate_model(
    model: OXNet,
    records: Sequence[Record],
    classes: Sequence[str],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> dict[str, Any]:
    """:func:`predict` on fully labeled ``records`` and :func:`oxnet.evaluation.metrics.evaluate` against their
    ground truth in original pixels. Returns the metrics dict of ``evaluate`` (mAP, AP40, ...)."""
    truth = ground_truth(records, classes)
    predictions = predict(model, records, batch_size=batch_size, device=device, num_workers=num_workers)
    return evaluate(truth, predictions)

