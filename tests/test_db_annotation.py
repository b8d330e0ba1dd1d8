"""The one annotation check (oxnet.data.annotation): the importers, the UI's save, the lifecycle edits and
the training records run it, each naming its file or field."""

import numpy as np
import pytest
from PIL import Image as PILImage

from db.importers import import_coco
from db.lifecycle import set_boxes, set_image_labels
from db.models import Image
from db.projects import ensure_project
from db.service import validate_annotation
from oxnet.data.annotation import annotation_problems, box_problem
from oxnet.data.records import records_from_coco


def test_box_problem_kinds():
    assert box_problem(1, 1, 5, 5, 10, 10) is None
    assert box_problem("a", 1, 5, 5, 10, 10)[0] == "numbers"
    assert box_problem(float("nan"), 1, 5, 5, 10, 10)[0] == "finite"
    assert box_problem(5, 1, 5, 5, 10, 10)[0] == "empty"
    assert box_problem(1, 1, 11, 5, 10, 10) == ("outside", "box (x1, y1, x2, y2) = [1.0, 1.0, 11.0, 5.0] lies outside the 10x10 image")


def test_problems_in_order_with_their_boxes_and_classes():
    problems = annotation_problems(
        [("", 1, 1, 5, 5), ("Elbow", 1, 1, 5, 5), ("Mass", 5, 5, 1, 1), ("Mass", 1, 1, 2, 9), ("Nodule", 1, 1, 9, 9)],
        classes=["Mass", "Nodule"], width=10, height=10, present={"Mass"}, absent={"Nodule", "Knee"},
        no_finding=True, complete=True, require_label=True, min_box=4,
    )
    assert [(p.kind, p.box, p.names) for p in problems] == [
        ("no_class", 0, ("",)), ("unknown_class", 1, ("Elbow",)), ("box", 2, ("Mass",)), ("small_box", 3, ("Mass",)),
        ("unknown_finding", None, ("Knee",)), ("absent_and_present", None, ("Nodule",)),
        ("no_finding_with_findings", None, ()),
    ]
    assert problems[2].reason == "box (x1, y1, x2, y2) = [5.0, 5.0, 1.0, 1.0] is inverted or empty"
    nothing = annotation_problems([], classes=["Mass"], width=10, height=10, require_label=True)
    assert [p.kind for p in nothing] == ["nothing"]
    assert [p.kind for p in annotation_problems([], classes=["Mass"], width=10, height=10, present={"Mass"}, complete=True)] == ["unboxed"]


def test_every_door_refuses_no_finding_with_a_box_and_a_box_outside_the_image(db_sessionmaker, tmp_path):
    """The same contradictions refused by the UI save, the lifecycle, the importer and the training records."""
    PILImage.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "a.png")
    PILImage.fromarray(np.ones((30, 40), np.uint8)).save(tmp_path / "b.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30, "image_labels": ["No Finding"]},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 2, "bbox": [1, 1, 10, 10]},
                        {"id": 6, "image_id": 2, "category_id": 2, "bbox": [35, 1, 10, 10]}],
        "categories": [{"id": 1, "name": "Mass"}, {"id": 2, "name": "Nodule"}],
    }
    assert validate_annotation(["Mass", "Nodule"], set(), True, [("Nodule", 1, 1, 11, 11)], 40, 30) == [
        "'No finding' cannot go with ticked findings or boxes: untick one of them"]
    assert "lies outside the 40x30 image" in validate_annotation(["Nodule"], set(), False, [("Nodule", 35, 1, 45, 11)], 40, 30)[0]
    with pytest.raises(ValueError, match=r"image id 1 \(a.png\): 'No Finding' together with findings or boxes"):
        records_from_coco({**coco, "images": coco["images"][:1], "annotations": coco["annotations"][:1]}, image_root=tmp_path)
    with pytest.raises(ValueError, match=r"annotation id 6 \(image id 2\): bbox \[35, 1, 10, 10\] lies outside the 40x30 image"):
        records_from_coco(coco, image_root=tmp_path)
    with db_sessionmaker.begin() as s:
        report = import_coco(s, coco, images=tmp_path)
    errors = sorted(reason for _, reason in report.errors)
    assert report.imported == [] and len(errors) == 2
    assert "'No Finding' together with findings" in " ".join(errors) and "lies outside the 40x30 image" in " ".join(errors)
    with db_sessionmaker.begin() as s:
        project = ensure_project(s, "default", ["Mass", "Nodule"])
        image = Image(project_id=project.id, path="/img/x.png", width=40, height=30, source="test")
        s.add(image)
        s.flush()
        set_image_labels(s, image.id, {"Nodule": False}, annotator="a")
        with pytest.raises(ValueError, match=rf"image {image.id}: \['Nodule'\] are labelled absent"):
            set_boxes(s, image.id, [("Nodule", 1, 1, 11, 11)], annotator="a")
