"""Synthetic chest X-rays: determinism, valid boxes, class coverage and geometry, COCO output, CLI."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from oxnet.classes import PAPER_CLASSES
from oxnet.data.records import records_from_coco
from oxnet.data.synthetic import (
    MASS,
    NODULE,
    PNEUMONIA,
    TUBERCULOSIS,
    contact_sheet,
    generate,
    main,
    write_coco,
)


@pytest.fixture(scope="module")
def many():
    """200 images of 128 px (about a second)."""
    return generate(200, size=128, seed=0)


def test_deterministic_per_seed_and_independent_of_n():
    a, b = generate(3, size=64, seed=1), generate(5, size=64, seed=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.boxes, y.boxes)
        assert x.image_labels == y.image_labels
    assert not np.array_equal(a[0].image, generate(1, size=64, seed=2)[0].image)


def test_images_and_boxes_are_valid(many):
    for sample in many:
        assert sample.image.shape == (128, 128) and sample.image.dtype == np.uint8
        assert sample.image.std() > 20  # a chest, not a flat field
        assert sample.boxes.dtype == np.float32 and sample.labels.dtype == np.int64
        assert len(sample.boxes) == len(sample.labels) == len(set(sample.labels.tolist()))
        assert (sample.boxes >= 0).all() and (sample.boxes <= 128).all()
        assert (sample.boxes[:, 2:] - sample.boxes[:, :2] >= 2).all()
        assert sample.image_labels == tuple(sorted(sample.labels.tolist()))


def test_every_class_appears_and_some_images_are_normal(many):
    counts = np.bincount(np.concatenate([s.labels for s in many]), minlength=len(PAPER_CLASSES))
    assert (counts >= 15).all(), counts
    normal = sum(not s.image_labels for s in many)
    assert 20 <= normal <= 60  # normal_fraction 0.2


def _boxes_of(samples, c):
    return np.array([b for s in samples for b, label in zip(s.boxes, s.labels) if label == c])


def test_classes_differ_in_size_and_location(many):
    nodules, masses = _boxes_of(many, NODULE), _boxes_of(many, MASS)
    nodule_side = np.maximum(nodules[:, 2] - nodules[:, 0], nodules[:, 3] - nodules[:, 1])
    mass_side = np.minimum(masses[:, 2] - masses[:, 0], masses[:, 3] - masses[:, 1])
    assert nodule_side.max() < 0.075 * 128 < mass_side.min()  # 3 cm on a 40 cm film
    tb_y = _boxes_of(many, TUBERCULOSIS)[:, 1::2].mean(1)
    pneumonia_y = _boxes_of(many, PNEUMONIA)[:, 1::2].mean(1)
    assert tb_y.max() < 0.4 * 128 < pneumonia_y.mean()  # upper zone vs middle/lower zones


def test_sixteen_bit_and_argument_checks():
    sample = generate(1, size=64, bit_depth=16)[0]
    assert sample.image.dtype == np.uint16 and sample.image.max() > 255
    with pytest.raises(ValueError, match="bit_depth"):
        generate(1, bit_depth=12)
    with pytest.raises(ValueError, match="size"):
        generate(1, size=8)
    assert all(not s.image_labels for s in generate(4, size=64, normal_fraction=1.0))


def test_write_coco_round_trips_through_records(tmp_path):
    paths = write_coco(tmp_path, 10, size=64, seed=3, splits={"train": 0.6, "val": 0.4})
    assert set(paths) == {"train", "val"}
    assert len(list((tmp_path / "images").glob("*.png"))) == 10
    samples = generate(10, size=64, seed=3)
    train = records_from_coco(paths["train"], image_root=tmp_path / "images")
    val = records_from_coco(paths["val"], image_root=tmp_path / "images")
    assert (len(train), len(val)) == (6, 4) and train.classes == PAPER_CLASSES
    for record, sample in zip([*train, *val], samples):
        assert record.granularity == "full" and record.patient_id is not None
        np.testing.assert_allclose(record.boxes, sample.boxes, atol=0.01)
        assert record.labels.tolist() == sample.labels.tolist()
        assert record.negative == (not sample.image_labels)
        np.testing.assert_array_equal(np.asarray(Image.open(record.path)), sample.image)


def test_contact_sheet_and_cli(tmp_path):
    path = contact_sheet(generate(5, size=64), tmp_path / "sheet.png", columns=3)
    assert Image.open(path).size == (192, 128)
    assert main(["--contact-sheet", str(tmp_path / "cli.png"), "-n", "2", "--size", "64"]) == 0
    assert Image.open(tmp_path / "cli.png").size == (256, 64)
    assert main(["--write-coco", str(tmp_path / "coco"), "-n", "4", "--size", "64", "--splits", "a=1,b=1"]) == 0
    assert len(records_from_coco(tmp_path / "coco" / "annotations" / "b.json", image_root=tmp_path / "coco" / "images")) == 2


def test_import_does_not_load_torch():
    code = "import sys, oxnet.data.synthetic; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
