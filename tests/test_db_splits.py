"""The one patient split (oxnet.data.splits): the store, the sweep and the simulation place every image
alike, images without a patient id by ``image:<id>``, and the store's splits are those it always made."""

import hashlib

import pytest
from sqlalchemy import select

from db.models import Image
from db.projects import assign_splits, ensure_project
from oxnet.data.records import Record
from oxnet.data.splits import patient_key, split_of, split_patients
from oxnet.experiments.simulate import plan_labels
from oxnet.experiments.sweep import split_by_patient

PATIENTS = [f"p{i // 3}" for i in range(45)] + [None] * 15  # 15 patients with 3 images, 15 images without one


def _store(Session, seed, fractions):
    with Session.begin() as s:
        project = ensure_project(s)
        s.add_all([Image(project_id=project.id, path=f"/x/{i}.png", width=64, height=64, source="t", patient_id=p)
                   for i, p in enumerate(PATIENTS)])
        s.flush()
        assign_splits(s, seed=seed, fractions=fractions)
        return {image_id: (patient, split.value) for image_id, patient, split in
                s.execute(select(Image.id, Image.patient_id, Image.split).order_by(Image.id))}


def _old_store_rule(seed, key, fractions):
    """The store's placement as it was written before the split became one function (the oracle:
    existing stores' splits must not move)."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def test_the_store_keeps_its_rule_and_patient_less_images_are_their_own_patient(db_sessionmaker):
    fractions = (0.6, 0.2, 0.2)
    placed = _store(db_sessionmaker, 7, fractions)
    for image_id, (patient, split) in placed.items():
        key = patient if patient is not None else f"image:{image_id}"
        assert split == _old_store_rule(7, key, fractions) == split_of(patient_key(patient, image_id), seed=7, fractions=fractions)
    by_patient = {}
    for patient, split in placed.values():
        if patient is not None:
            by_patient.setdefault(patient, set()).add(split)
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert {s for p, s in placed.values() if p is None} == {"train", "val", "test"}  # spread, not lumped together


def test_sweep_and_simulation_split_as_the_store_does(db_sessionmaker):
    fractions = (0.6, 0.2, 0.2)
    placed = _store(db_sessionmaker, 3, fractions)
    coco = {"images": [{"id": i, "patient_id": p, "file_name": f"{i}.png", "width": 64, "height": 64}
                       for i, (p, _) in placed.items()], "annotations": []}
    plan = plan_labels(coco, seed=0, initial_full=1, initial_weak=1, fractions=fractions, split_seed=3)
    assert {i: split for i, (split, _) in plan.items()} == {i: split for i, (_, split) in placed.items()}

    records = [Record(i, f"/x/{i}.png", "full", 64, 64, patient_id=p) for i, (p, _) in placed.items()]
    rest, held = split_by_patient(records, 0.25, seed=3)
    store_val = _store_rest_val(db_sessionmaker, 3)
    assert {r.image_id for r in held} == store_val and len(rest) + len(held) == len(records)


def _store_rest_val(Session, seed):
    with Session.begin() as s:
        assign_splits(s, seed=seed, fractions=(0.75, 0.25, 0.0), reassign=True)
        return set(s.scalars(select(Image.id).where(Image.split == "val")))


def test_a_split_left_empty_is_an_error_naming_it():
    with pytest.raises(ValueError, match="the val split got no patient: 1 patients are too few"):
        split_patients(["only"], seed=0, fractions=(0.999999, 0.000001, 0.0), require=("val",))
    with pytest.raises(ValueError, match="fractions must be three non-negative numbers"):
        split_patients(["a"], fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="got no patient"):
        split_by_patient([Record(1, "/x/1.png", "full", 64, 64, patient_id="p")], 0.000001, seed=0)
