"""Image records of three annotation granularities, read from COCO-style files.

A :class:`Record` describes one image: where it is, how big it is, and what is known about it -
lesion boxes ("full"), image-level findings only ("weak"), or nothing ("unlabeled").
:func:`records_from_coco` reads the COCO dialect of ``../shared/data/nih-cxr/annotations/*.json`` and of
the store's export (``db.export_coco``): ``bbox`` = [x, y, w, h] in original pixels, an optional
``image_labels`` list of class names per image (``"No Finding"`` = explicitly negative), an optional
``absent_labels`` list of the class names assessed absent, an optional ``granularity`` per image and an
optional ``patient_id``.

Present, absent, not assessed: an image WITHOUT an ``absent_labels`` field means what it always did
(the classes in ``image_labels`` are present, every other class absent; the nih-cxr files are read that
way). An image WITH the field (the store's export writes it) lists its absent classes explicitly, and a
class in neither list was not assessed: it is :attr:`Record.unknown_labels`, masked from the image-level
loss. A weak image with no known class at all is read as unlabeled.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from oxnet.classes import NO_FINDING
from oxnet.data.annotation import annotation_problems, box_problem
from oxnet.vocabulary import FULL, GRANULARITIES, UNLABELED, WEAK, Granularity


@dataclass(frozen=True, eq=False)
class Record:
    """One image and what is known about it.

    Args:
        image_id: unique integer id (the COCO image id).
        path: absolute path of the image file (PNG, JPEG or DICOM).
        granularity: ``"full"`` (boxes are complete; zero boxes = no lesion), ``"weak"`` (image-level
            labels only) or ``"unlabeled"``.
        width, height: size of the image file in pixels.
        boxes: ``ndarray[K, 4]`` float32 in (x1, y1, x2, y2), ORIGINAL pixels. Empty unless ``"full"``.
        labels: ``ndarray[K]`` int64, 0-based class index of each box.
        image_labels: sorted 0-based indices of the classes present in the image. For full images this
            includes the classes of the boxes. Empty for unlabeled images.
        patient_id: optional patient identifier (splits are made per patient).
        negative: the image is explicitly labelled "No Finding" (no class present).
        unknown_labels: sorted 0-based indices of the classes nobody assessed (neither present nor
            absent); only weak images have them. Every other class not in ``image_labels`` is absent.
    """

    image_id: int
    path: Path
    granularity: Granularity
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    image_labels: tuple[int, ...] = ()
    patient_id: str | int | None = None
    negative: bool = False
    unknown_labels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        where = f"{self.path} (image id {self.image_id})"
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"{where}: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"{where}: width and height must be positive, got {self.width}x{self.height}")
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"{where}: {len(boxes)} boxes but {len(labels)} labels")
        if len(boxes) and self.granularity != FULL:
            raise ValueError(f"{where}: a {self.granularity} image cannot have boxes")
        if self.granularity == UNLABELED and (self.image_labels or self.negative):
            raise ValueError(f"{where}: an unlabeled image cannot have image-level labels")
        image_labels = tuple(sorted(set(int(c) for c in self.image_labels) | set(labels.tolist())))
        if self.negative and image_labels:
            raise ValueError(f"{where}: {NO_FINDING!r} together with findings {list(image_labels)}")
        unknown = tuple(sorted(set(int(c) for c in self.unknown_labels)))
        if unknown and self.granularity != WEAK:
            raise ValueError(f"{where}: only a weak image can have not-assessed classes ({self.granularity} images "
                             "are all known or all unknown)")
        if unknown and self.negative:
            raise ValueError(f"{where}: {NO_FINDING!r} means every class is absent, but {list(unknown)} are not assessed")
        if set(unknown) & set(image_labels):
            raise ValueError(f"{where}: classes {sorted(set(unknown) & set(image_labels))} are both present and not assessed")
        object.__setattr__(self, "unknown_labels", unknown)
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "image_labels", image_labels)


class Records(list[Record]):
    """A list of :class:`Record` that remembers the class names and what was skipped while reading.

    Attributes:
        classes: class names; ``Record.labels`` and ``Record.image_labels`` index into them.
        skipped: one message per skipped entry (``on_error="skip"``); ``len(skipped)`` is the count.
    """

    def __init__(self, records: Iterable[Record] = (), *, classes: Sequence[str], skipped: Sequence[str] = ()):
        super().__init__(records)
        self.classes: tuple[str, ...] = tuple(classes)
        self.skipped: list[str] = list(skipped)

    def __add__(self, other: Iterable[Record]) -> Records:  # type: ignore[override]  # records only, not list's any-list overload
        """Concatenate, keeping ``classes`` (which must agree) and ``skipped``: ``boxes + weak + unlabeled``."""
        classes = getattr(other, "classes", self.classes)
        if tuple(classes) != self.classes:
            raise ValueError(f"cannot concatenate records with classes {self.classes} and {tuple(classes)}")
        return Records([*self, *other], classes=self.classes, skipped=self.skipped + getattr(other, "skipped", []))

    def __iadd__(self, other: Iterable[Record]) -> Records:  # type: ignore[override]
        return self + other

    def __getitem__(self, index):  # a slice keeps the classes
        if isinstance(index, slice):
            return Records(super().__getitem__(index), classes=self.classes)
        return super().__getitem__(index)


def records_from_coco(
    coco: Mapping[str, Any] | str | Path,
    *,
    granularity: Granularity | None = None,
    image_root: str | Path | None = None,
    classes: Sequence[str] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> Records:
    """Read the images of a COCO-style dict or JSON file as :class:`Record` objects.

    The granularity of an image is its own ``granularity`` field when present (the store's export sets
    it), else the ``granularity`` argument, else the file's default: ``"full"`` when the file has
    annotations, ``"weak"`` when its images carry ``image_labels``, else ``"unlabeled"``.
    An image read as ``"weak"`` keeps the classes of its boxes as image-level labels and drops the boxes;
    one read as ``"unlabeled"`` drops all labels (so ``granularity="weak"`` on a box file simulates
    weaker annotation).

    Args:
        coco: a COCO dict or the path of a COCO JSON file.
        granularity: granularity of images without their own ``granularity`` field.
        image_root: folder that relative ``file_name`` entries are relative to; defaults to the JSON
            file's folder (required for a dict with relative file names).
        classes: class names in model order; categories and ``image_labels`` are mapped by name.
            Defaults to the file's categories sorted by id.
        on_error: ``"raise"`` raises ValueError at the first bad entry; ``"skip"`` leaves the entry out
            with a ``warnings.warn`` and lists it in ``Records.skipped``. A bad annotation leaves out its
            whole image: a full image with a dropped box would teach that the lesion is background.

    Returns:
        Records, in the order of ``coco["images"]``.

    Raises:
        ValueError: naming the file and the entry, for a missing image file, a box outside its image or
            of zero size, an unknown category or class name, an annotation whose ``image_id`` has no
            image, a duplicate image id or a missing field.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES} or None, got {granularity!r}")
    data: Mapping[str, Any]
    root: Path | None
    if isinstance(coco, (str, Path)):
        source = str(coco)
        try:
            with open(coco, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: cannot read COCO JSON: {e}") from e
        root = Path(image_root) if image_root is not None else Path(source).resolve().parent
    elif isinstance(coco, Mapping):
        source = "<COCO dict>"
        data = coco
        root = Path(image_root) if image_root is not None else None
    else:
        raise TypeError(f"coco must be a dict or a path, got {type(coco).__name__}")
    if not isinstance(data.get("images"), list):
        raise ValueError(f"{source}: no 'images' list")
    images: list[dict] = data["images"]
    annotations: list[dict] = data.get("annotations") or []
    categories: list[dict] = data.get("categories") or []

    try:
        category_names = {c["id"]: c["name"] for c in categories}
    except KeyError as e:
        raise ValueError(f"{source}: category without {e}") from e
    if classes is None:
        classes = [category_names[i] for i in sorted(category_names)]
    class_index = {name: i for i, name in enumerate(classes)}
    if len(class_index) != len(classes):
        raise ValueError(f"classes has duplicate names: {list(classes)}")

    if annotations:
        default_granularity: Granularity = FULL
    elif any("image_labels" in image for image in images):
        default_granularity = WEAK
    else:
        default_granularity = UNLABELED
    default_granularity = granularity or default_granularity

    skipped: list[str] = []
    bad_images: set[Any] = set()  # image ids left out in skip mode

    def fail(message: str, image_id: Any = None) -> None:
        message = f"{source}: {message}"
        if on_error == "raise":
            raise ValueError(message)
        warnings.warn(f"skipped: {message}", stacklevel=3)
        skipped.append(message)
        if image_id is not None:
            bad_images.add(image_id)

    id_counts = Counter(image.get("id") for image in images)
    for image_id, count in id_counts.items():
        if count > 1:
            fail(f"image id {image_id} appears {count} times", image_id)
    for image in images:
        missing = [key for key in ("id", "file_name", "width", "height") if key not in image]
        if missing:
            fail(f"image id {image.get('id')} ({image.get('file_name')}): missing field {missing[0]!r}", image.get("id"))

    boxes_of: dict[Any, list[tuple[list[float], int]]] = {}
    size_of = {image.get("id"): (image.get("width"), image.get("height")) for image in images}
    for ann in annotations:
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        where = f"annotation id {ann_id} (image id {image_id})"
        if image_id not in size_of:
            fail(f"{where}: no image with id {image_id}")
            continue
        if image_id in bad_images:
            continue
        name = category_names.get(ann.get("category_id"))
        if name is None:
            fail(f"{where}: unknown category_id {ann.get('category_id')!r}", image_id)
            continue
        if name not in class_index:
            fail(f"{where}: class {name!r} is not one of {list(classes)}", image_id)
            continue
        box = _xyxy(ann.get("bbox"), size_of[image_id])
        if isinstance(box, str):
            fail(f"{where}: {box}", image_id)
            continue
        boxes_of.setdefault(image_id, []).append((box, class_index[name]))

    records = []
    for image in images:
        image_id = image.get("id")
        if image_id in bad_images:
            continue
        record = _record(image, boxes_of.get(image_id, []), default_granularity, root, class_index)
        if isinstance(record, str):
            fail(f"image id {image_id} ({image.get('file_name')}): {record}", image_id)
        else:
            records.append(record)
    return Records(records, classes=classes, skipped=skipped)


def _xyxy(bbox: Any, size: tuple[Any, Any]) -> list[float] | str:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2], or the reason it is invalid for an image of ``size`` (w, h)
    (the one box check, :func:`oxnet.data.annotation.box_problem`, said in COCO's terms)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
        width, height = float(size[0]), float(size[1])
    except (TypeError, ValueError):
        return f"bbox must be 4 numbers [x, y, w, h] on an image with width and height, got {bbox!r}"
    problem = box_problem(x, y, x + w, y + h, width, height)
    if problem is not None:
        said = {"finite": "is not finite", "empty": "has zero or negative size",
                "outside": f"lies outside the {width:g}x{height:g} image"}
        return f"bbox {bbox} {said.get(problem[0], problem[1])}"
    return [x, y, x + w, y + h]


def _record(
    image: Mapping[str, Any],
    boxes: list[tuple[list[float], int]],
    default_granularity: Granularity,
    root: Path | None,
    class_index: Mapping[str, int],
) -> Record | str:
    """Build the record of one COCO image (with all required fields), or return why it is invalid."""
    granularity = image.get("granularity", default_granularity)
    if granularity not in GRANULARITIES:
        return f"granularity must be one of {GRANULARITIES}, got {granularity!r}"
    path = Path(image["file_name"])
    if not path.is_absolute():
        if root is None:
            return "relative file_name needs image_root"
        path = root / path
    if not path.is_file():
        return f"image file {path} does not exist"

    names = image.get("image_labels") or []
    if isinstance(names, str) or not isinstance(names, Sequence):
        return f"image_labels must be a list of class names, got {names!r}"
    unknown = [n for n in names if n != NO_FINDING and n not in class_index]
    if unknown:
        return f"image_labels {unknown} are not among the classes {list(class_index)}"
    negative = NO_FINDING in names
    present = {class_index[n] for n in names if n != NO_FINDING}
    absent_names = image.get("absent_labels")
    class_of = {i: n for n, i in class_index.items()}
    problems = {p.kind for p in annotation_problems(  # the one annotation check (boxes: checked by _xyxy)
        [(class_of[c], x1, y1, x2, y2) for (x1, y1, x2, y2), c in boxes], classes=class_index, width=math.inf, height=math.inf,
        present=[n for n in names if n != NO_FINDING], no_finding=negative,
    )}
    if "no_finding_with_findings" in problems:
        return f"{NO_FINDING!r} together with findings or boxes"
    if absent_names is None:
        absent = set(class_index.values()) - present  # the old dialect: every class not listed is absent
    else:
        if isinstance(absent_names, str) or not isinstance(absent_names, Sequence):
            return f"absent_labels must be a list of class names, got {absent_names!r}"
        unknown_names = [n for n in absent_names if n not in class_index]
        if unknown_names:
            return f"absent_labels {unknown_names} are not among the classes {list(class_index)}"
        absent = {class_index[n] for n in absent_names}
        if negative:
            absent = set(class_index.values())
        both = sorted(n for n in absent_names if class_index[n] in present)  # a box makes its class present
        if both:
            return f"classes {both} are in both image_labels and absent_labels"

    box_array = np.array([b for b, _ in boxes], np.float32).reshape(-1, 4)
    label_array = np.array([c for _, c in boxes], np.int64)
    if granularity == WEAK:
        present |= set(label_array.tolist())
        absent -= present
    if granularity != FULL:
        box_array, label_array = box_array[:0], label_array[:0]
    if granularity == WEAK and not present and not absent and not negative:
        granularity = UNLABELED  # nothing about it is known
    unknown_classes = set(class_index.values()) - present - absent if granularity == WEAK else set()
    if granularity == UNLABELED:
        present, negative = set(), False
    try:
        return Record(
            image_id=int(image["id"]),
            path=path.absolute(),
            granularity=granularity,
            width=int(image["width"]),
            height=int(image["height"]),
            boxes=box_array,
            labels=label_array,
            image_labels=tuple(present),
            patient_id=image.get("patient_id"),
            negative=negative,
            unknown_labels=tuple(unknown_classes),
        )
    except (TypeError, ValueError) as e:
        return str(e)
