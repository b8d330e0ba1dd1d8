"""Records from COCO-style dicts and files, image loading, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oxnet.data.records import Record, records_from_coco
from oxnet.data.transforms import load_image

NIH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih-cxr"
CATEGORIES = [{"id": 7, "name": "Nodule"}, {"id": 2, "name": "Mass"}]  # sorted by id: Mass=0, Nodule=1


def _png(path: Path, width: int = 40, height: int = 30, value: int = 100) -> Path:
    Image.fromarray(np.full((height, width), value, np.uint8)).save(path)
    return path


def _coco(tmp_path: Path) -> dict:
    """Three images: two with boxes, one explicitly negative with zero boxes."""
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30, "patient_id": "p1"},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30, "image_labels": ["Nodule"]},
            {"id": 3, "file_name": "c.png", "width": 40, "height": 30, "image_labels": ["No Finding"]},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [20, 10, 20, 20]},
            {"id": 12, "image_id": 2, "category_id": 2, "bbox": [0, 0, 4, 4]},
        ],
        "categories": CATEGORIES,
    }


def test_full_records_from_dict(tmp_path):
    records = records_from_coco(_coco(tmp_path), image_root=tmp_path)
    assert records.classes == ("Mass", "Nodule")
    assert records.skipped == []
    a, b, c = records
    assert [r.granularity for r in records] == ["full"] * 3
    assert a.path == (tmp_path / "a.png").absolute() and a.path.is_absolute()
    assert (a.width, a.height, a.patient_id) == (40, 30, "p1")
    np.testing.assert_allclose(a.boxes, [[1, 2, 11, 7], [20, 10, 40, 30]])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert a.labels.tolist() == [1, 0] and a.image_labels == (0, 1)
    # full: classes of the boxes union the listed image labels
    assert b.labels.tolist() == [0] and b.image_labels == (0, 1)
    assert c.negative and c.image_labels == () and c.boxes.shape == (0, 4)


def test_classes_argument_maps_by_name(tmp_path):
    records = records_from_coco(_coco(tmp_path), image_root=tmp_path, classes=["Nodule", "Mass", "Other"])
    assert records.classes == ("Nodule", "Mass", "Other")
    assert records[0].labels.tolist() == [0, 1]


def test_concatenation_keeps_classes_and_checks_them(tmp_path):
    coco = _coco(tmp_path)
    full = records_from_coco(coco, image_root=tmp_path)
    weak = records_from_coco({"images": [], "categories": CATEGORIES}, granularity="weak")
    combined = full + weak + [full[0]]
    assert combined.classes == ("Mass", "Nodule") and len(combined) == 4
    assert combined[1:].classes == combined.classes and combined[1:][0] is full[1]
    other = records_from_coco(coco, image_root=tmp_path, classes=["Nodule", "Mass"])
    with pytest.raises(ValueError, match="cannot concatenate"):
        full + other
    with pytest.raises(ValueError, match="cannot concatenate"):
        full += other


def test_granularity_defaults_and_overrides(tmp_path):
    coco = _coco(tmp_path)
    weak = {"images": coco["images"][1:], "categories": CATEGORIES}
    unlabeled = {"images": [dict(coco["images"][0])], "categories": CATEGORIES}
    assert [r.granularity for r in records_from_coco(weak, image_root=tmp_path)] == ["weak", "weak"]
    assert records_from_coco(unlabeled, image_root=tmp_path)[0].granularity == "unlabeled"

    # the argument demotes a box file: weak keeps the box classes as image labels, unlabeled keeps nothing
    demoted = records_from_coco(coco, image_root=tmp_path, granularity="weak")
    assert demoted[0].granularity == "weak" and demoted[0].boxes.shape == (0, 4)
    assert demoted[0].image_labels == (0, 1) and demoted[2].negative
    nothing = records_from_coco(coco, image_root=tmp_path, granularity="unlabeled")
    assert all(r.image_labels == () and not r.negative and len(r.boxes) == 0 for r in nothing)

    # an image's own field (the store's export) wins over the argument
    coco["images"][1]["granularity"] = "unlabeled"
    assert [r.granularity for r in records_from_coco(coco, image_root=tmp_path, granularity="weak")] == [
        "weak",
        "unlabeled",
        "weak",
    ]


def test_file_with_relative_and_absolute_paths(tmp_path):
    coco = _coco(tmp_path)
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "a.png").write_bytes((tmp_path / "a.png").read_bytes())
    coco["images"][1]["file_name"] = str(tmp_path / "b.png")
    coco["images"] = coco["images"][:2]
    coco["annotations"] = coco["annotations"][:2]
    path = tmp_path / "ann" / "coco.json"
    path.write_text(json.dumps(coco))
    records = records_from_coco(path)  # relative names resolve against the JSON's folder
    assert records[0].path == tmp_path / "ann" / "a.png"
    assert records[1].path == tmp_path / "b.png"


def test_relative_names_in_dict_need_image_root(tmp_path):
    with pytest.raises(ValueError, match="image id 1 .*a.png.*image_root"):
        records_from_coco(_coco(tmp_path))


def _missing_file(coco, tmp_path):
    (tmp_path / "b.png").unlink()


def _box_outside(coco, tmp_path):
    coco["annotations"][2]["bbox"] = [35, 0, 10, 4]


def _zero_box(coco, tmp_path):
    coco["annotations"][2]["bbox"] = [3, 3, 0, 4]


def _unknown_category(coco, tmp_path):
    coco["annotations"][2]["category_id"] = 99


def _unknown_image_label(coco, tmp_path):
    coco["images"][1]["image_labels"] = ["Dragon"]


def _negative_with_finding(coco, tmp_path):
    coco["images"][1]["image_labels"] = ["No Finding", "Nodule"]


def _missing_field(coco, tmp_path):
    del coco["images"][1]["width"]


@pytest.mark.parametrize(
    "corrupt, pattern",
    [
        (_missing_file, r"image id 2 \(b.png\): image file .*b.png does not exist"),
        (_box_outside, r"annotation id 12 \(image id 2\): bbox \[35, 0, 10, 4\] lies outside"),
        (_zero_box, r"annotation id 12 \(image id 2\): bbox .* zero or negative size"),
        (_unknown_category, r"annotation id 12 \(image id 2\): unknown category_id 99"),
        (_unknown_image_label, r"image id 2 \(b.png\): image_labels \['Dragon'\]"),
        (_negative_with_finding, r"image id 2 \(b.png\): 'No Finding' together"),
        (_missing_field, r"image id 2 \(b.png\): missing field 'width'"),
    ],
)
def test_bad_entry_raises_or_skips_its_image(tmp_path, corrupt, pattern):
    coco = _coco(tmp_path)
    corrupt(coco, tmp_path)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=f"bad.json: {pattern}"):
        records_from_coco(path)
    with pytest.warns(UserWarning, match=pattern):
        records = records_from_coco(path, on_error="skip")
    assert len(records.skipped) == 1
    assert [r.image_id for r in records] == [1, 3]


def test_unknown_class_name_against_classes(tmp_path):
    with pytest.raises(ValueError, match=r"annotation id 10 \(image id 1\): class 'Nodule' is not one of"):
        records_from_coco(_coco(tmp_path), image_root=tmp_path, classes=["Mass"])


def test_annotation_without_image(tmp_path):
    coco = _coco(tmp_path)
    coco["annotations"].append({"id": 13, "image_id": 42, "category_id": 2, "bbox": [0, 0, 1, 1]})
    with pytest.raises(ValueError, match=r"<COCO dict>: annotation id 13 \(image id 42\): no image with id 42"):
        records_from_coco(coco, image_root=tmp_path)
    with pytest.warns(UserWarning, match="annotation id 13"):
        records = records_from_coco(coco, image_root=tmp_path, on_error="skip")
    assert len(records) == 3 and len(records.skipped) == 1


def test_duplicate_image_ids(tmp_path):
    coco = _coco(tmp_path)
    coco["images"][2]["id"] = 2
    with pytest.raises(ValueError, match="image id 2 appears 2 times"):
        records_from_coco(coco, image_root=tmp_path)
    with pytest.warns(UserWarning, match="image id 2 appears 2 times"):
        records = records_from_coco(coco, image_root=tmp_path, on_error="skip")
    assert [r.image_id for r in records] == [1]


def test_unreadable_json_and_bad_arguments(tmp_path):
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: cannot read COCO JSON"):
        records_from_coco(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="on_error"):
        records_from_coco({"images": []}, on_error="ignore")
    with pytest.raises(ValueError, match="granularity"):
        records_from_coco({"images": []}, granularity="boxes")
    with pytest.raises(TypeError, match="dict or a path"):
        records_from_coco([1, 2])


def test_record_validation(tmp_path):
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match="x.png.*granularity"):
        Record(1, path, "partial", 10, 10)
    with pytest.raises(ValueError, match="weak image cannot have boxes"):
        Record(1, path, "weak", 10, 10, boxes=[[0, 0, 1, 1]], labels=[0])
    with pytest.raises(ValueError, match="1 boxes but 2 labels"):
        Record(1, path, "full", 10, 10, boxes=[[0, 0, 1, 1]], labels=[0, 1])
    with pytest.raises(ValueError, match="unlabeled image cannot have image-level labels"):
        Record(1, path, "unlabeled", 10, 10, image_labels=(2,))
    record = Record(1, str(path), "full", 10, 10, boxes=[[0, 0, 1, 1]], labels=[3], image_labels=[1])
    assert record.image_labels == (1, 3) and isinstance(record.path, Path)


@pytest.mark.parametrize(
    "mode, array, expected",
    [
        ("L", np.array([[0, 255], [51, 102]], np.uint8), [[0, 1], [0.2, 0.4]]),
        ("I;16", np.array([[0, 65535], [13107, 26214]], np.uint16), [[0, 1], [0.2, 0.4]]),
    ],
)
def test_load_png_8_and_16_bit(tmp_path, mode, array, expected):
    path = tmp_path / f"{mode[0]}.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    image = load_image(path)
    assert image.shape == (1, 2, 2) and image.dtype == torch.float32
    torch.testing.assert_close(image[0], torch.tensor(expected, dtype=torch.float32), atol=1e-4, rtol=0)


def test_load_jpeg_and_rgb_as_grayscale(tmp_path):
    gray = np.full((16, 24), 128, np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.png")
    for name in ("g.jpg", "rgb.jpg", "rgb.png"):
        image = load_image(tmp_path / name)
        assert image.shape == (1, 16, 24)
        torch.testing.assert_close(image, torch.full_like(image, 128 / 255), atol=2 / 255, rtol=0)


def test_load_corrupt_file_names_it(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="corrupt.png: not a PNG, JPEG or DICOM file"):
        load_image(path)


@pytest.mark.skipif(not NIH.is_dir(), reason="../shared/data/nih-cxr is absent")
def test_real_nih_cxr_files():
    expected = {"boxes": (704, "full"), "image_labels": (307, "weak"), "unlabeled": (298, "unlabeled")}
    for name, (count, granularity) in expected.items():
        records = records_from_coco(NIH / "annotations" / f"{name}.json", image_root=NIH / "images")
        assert len(records) == count and records.skipped == []
        assert {r.granularity for r in records} == {granularity}
        assert records.classes[1] == "Cardiomegaly" and len(records.classes) == 8
    boxes = records_from_coco(NIH / "annotations" / "boxes.json", image_root=NIH / "images")
    assert sum(len(r.boxes) for r in boxes) == 787
    assert all(r.image_labels and r.patient_id is not None for r in boxes)


def test_absent_labels_field_separates_absent_from_not_assessed(tmp_path):
    coco = _coco(tmp_path)
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    images = coco["images"]
    # without the field (the nih-cxr dialect): every class not listed is absent -> all known
    old = records_from_coco(coco, image_root=tmp_path)
    assert all(r.unknown_labels == () for r in old)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2]
    images[1].update(granularity="weak", absent_labels=[])  # Nodule present, Mass not assessed
    images[2].update(granularity="weak", absent_labels=[])  # "No Finding" = all absent, whatever the list says
    images[0]["absent_labels"] = []  # a full image: all known, whatever the list says
    records = {r.image_id: r for r in records_from_coco(coco, image_root=tmp_path)}
    nodule, mass = names.index("Nodule"), names.index("Mass")
    assert records[2].granularity == "weak" and records[2].image_labels == (nodule,)
    assert records[2].unknown_labels == (mass,)
    assert records[3].negative and records[3].unknown_labels == ()
    assert records[1].granularity == "full" and records[1].unknown_labels == ()
    images[1]["absent_labels"] = ["Mass"]  # now assessed: all known
    assert records_from_coco(coco, image_root=tmp_path)[1].unknown_labels == ()


def test_weak_image_with_no_known_class_is_read_as_unlabeled(tmp_path):
    coco = _coco(tmp_path)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2]
    coco["images"][1].update(image_labels=[], absent_labels=[], granularity="weak")
    records = {r.image_id: r for r in records_from_coco(coco, image_root=tmp_path)}
    assert records[2].granularity == "unlabeled" and records[2].unknown_labels == ()


@pytest.mark.parametrize(
    "absent, pattern",
    [(["Dragon"], r"image id 2 \(b.png\): absent_labels \['Dragon'\]"),
     (["Nodule"], r"image id 2 \(b.png\): classes \['Nodule'\] are in both"),
     ("Mass", r"image id 2 \(b.png\): absent_labels must be a list")],
)
def test_bad_absent_labels_name_the_image(tmp_path, absent, pattern):
    coco = _coco(tmp_path)
    coco["images"][1]["absent_labels"] = absent
    with pytest.raises(ValueError, match=pattern):
        records_from_coco(coco, image_root=tmp_path)
    with pytest.warns(UserWarning, match=pattern):
        skipped = records_from_coco(coco, image_root=tmp_path, on_error="skip")
    assert [r.image_id for r in skipped] == [1, 3] and len(skipped.skipped) == 1


def test_record_validates_not_assessed_classes(tmp_path):
    path = _png(tmp_path / "r.png", 10, 10)
    with pytest.raises(ValueError, match="only a weak image"):
        Record(1, path, "full", 10, 10, unknown_labels=(1,))
    with pytest.raises(ValueError, match="both present and not assessed"):
        Record(1, path, "weak", 10, 10, image_labels=(1,), unknown_labels=(1,))
    with pytest.raises(ValueError, match="every class is absent"):
        Record(1, path, "weak", 10, 10, negative=True, unknown_labels=(1,))
    assert Record(1, path, "weak", 10, 10, image_labels=(0,), unknown_labels=[2, 1]).unknown_labels == (1, 2)
