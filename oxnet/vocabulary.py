"""The words the processes share: granularities, upgrade actions, upgrade names, metric keys, the
attention key of a stored prediction and the trainer's preset names, each defined once.

The store (``db``), the UI (``app``), the trainer and the library (``oxnet``) write and read these
strings in rows, JSON and command lines, so they must agree; they all import them from here. Plain
strings, standard library only (no torch, no numpy): any process can import it cheaply. The class lists
(:data:`oxnet.classes.PAPER_CLASSES`, ``NIH_BOX_CLASSES``, ``NO_FINDING``) live in :mod:`oxnet.classes`.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "ADD_LABELS",
    "AP40",
    "AP50",
    "AP75",
    "AP_L",
    "AP_M",
    "AP_S",
    "ATTENTION_KEY",
    "AUTO_PRESET",
    "DRAW_BOXES",
    "EDIT",
    "FULL",
    "GRANULARITIES",
    "IMAGE_AUC",
    "IMAGE_AUC_PREFIX",
    "LOSS_PREFIX",
    "MAP",
    "MEAN_IMAGE_AUC",
    "METRIC_KEYS",
    "PER_CLASS_AP",
    "PER_CLASS_AP_PREFIX",
    "SCORE_THRESHOLD",
    "SUGGESTED_ACTIONS",
    "TRAINER_PRESET_NAMES",
    "UNLABELED",
    "UNLABELED_TO_FULL",
    "UNLABELED_TO_WEAK",
    "UPGRADES",
    "UPGRADE_NAMES",
    "WEAK",
    "WEAK_TO_FULL",
    "Granularity",
]

# -- granularities: how much is known about an image -------------------------------------------------
FULL: Final = "full"
WEAK: Final = "weak"
UNLABELED: Final = "unlabeled"
Granularity = Literal["full", "weak", "unlabeled"]
#: The annotation granularities, from most to least informative.
GRANULARITIES: tuple[Granularity, ...] = (FULL, WEAK, UNLABELED)

# -- the upgrades a suggestion asks an annotator for (the values of ``db.models.SuggestedAction``) ------
ADD_LABELS: Final = "add image-level labels"
DRAW_BOXES: Final = "draw boxes"
SUGGESTED_ACTIONS: tuple[str, ...] = (ADD_LABELS, DRAW_BOXES)

# -- upgrade names: a granularity change, as annotation times and costs are kept ----------------------
UNLABELED_TO_WEAK: Final = f"{UNLABELED}->{WEAK}"
WEAK_TO_FULL: Final = f"{WEAK}->{FULL}"
UNLABELED_TO_FULL: Final = f"{UNLABELED}->{FULL}"
#: A save that did not raise the granularity.
EDIT: Final = "edit"
#: The upgrades, cheapest first.
UPGRADE_NAMES: tuple[str, ...] = (UNLABELED_TO_WEAK, WEAK_TO_FULL, UNLABELED_TO_FULL)
#: (from granularity, action) -> upgrade name.
UPGRADES: dict[tuple[str, str], str] = {(UNLABELED, ADD_LABELS): UNLABELED_TO_WEAK, (WEAK, DRAW_BOXES): WEAK_TO_FULL,
                                        (UNLABELED, DRAW_BOXES): UNLABELED_TO_FULL}

# -- metric keys (``oxnet.evaluation.metrics.evaluate``; the store's ``Metric.name``) -------------------
#: AP averaged over IoU 0.40:0.05:0.75 and the classes: the headline number, and what promotion compares.
MAP: Final = "mAP"
AP40: Final = "AP40"
AP50: Final = "AP50"
AP75: Final = "AP75"
AP_S: Final = "AP_S"
AP_M: Final = "AP_M"
AP_L: Final = "AP_L"
MEAN_IMAGE_AUC: Final = "mean_image_auc"
#: The detection score above which half of the detections are right (the suggestion threshold's default).
SCORE_THRESHOLD: Final = "score_threshold"
#: The scalar metrics, in report order.
METRIC_KEYS: tuple[str, ...] = (MAP, AP40, AP50, AP75, AP_S, AP_M, AP_L, MEAN_IMAGE_AUC)
#: Per-class dicts of the evaluation ({class name: value}).
PER_CLASS_AP: Final = "per_class_AP"
IMAGE_AUC: Final = "image_auc"
#: Flattened for the store: ``per_class_AP/<class>``, ``image_auc/<class>``, ``loss/<name>``.
PER_CLASS_AP_PREFIX: Final = f"{PER_CLASS_AP}/"
IMAGE_AUC_PREFIX: Final = f"{IMAGE_AUC}/"
LOSS_PREFIX: Final = "loss/"

# -- predictions ------------------------------------------------------------------------------------
#: The DAA attention maps of a stored prediction: ``Prediction.image_probs[ATTENTION_KEY][<class>]``.
ATTENTION_KEY: Final = "attention"

# -- the background trainer -------------------------------------------------------------------------
#: Names of ``oxnet.active.loop.TRAINER_PRESETS`` (checked equal in tests/test_vocabulary.py).
TRAINER_PRESET_NAMES: tuple[str, ...] = ("cpu", "paper", "tiny")
#: ``--preset auto``: the trainer picks "paper" when a CUDA GPU is present, else "cpu".
AUTO_PRESET: Final = "auto"
