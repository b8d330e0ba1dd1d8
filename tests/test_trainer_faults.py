"""Faults around the trainer: DICOM stores that train, unreadable files marked corrupt, checkpoints
verified by checksum with a fallback, retention of model files, no space left on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from db.engine import init_db, make_sessionmaker
from db.importers import import_folder, import_vindr
from db.models import FileStatus, Image, Metric, ModelStatus, ModelVersion, Score, Split
from db.workbench import SqlStore
from oxnet.active.loop import Trainer
from tests.test_db_import import write_dicom
from tests.test_trainer import SETTINGS


def _blob(size: int, centre: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A 12-bit radiograph-like image: noise plus one bright disc (the lesion) at ``centre``."""
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(1200, 80, (size, size))
    image[(yy - centre[1]) ** 2 + (xx - centre[0]) ** 2 < 36] = 3000
    return np.clip(image, 0, 4095).astype(np.uint16)


def dicom_store(folder: Path) -> str:
    """A VinDr import (6 DICOMs with boxes: 4 train, 2 val) plus a DICOM folder import (3 unlabeled,
    MONOCHROME1 among them) into one store; returns its URL."""
    rng = np.random.default_rng(0)
    vindr = folder / "vindr"
    vindr.mkdir(parents=True)
    rows = ["image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"]
    for k in range(6):
        cx, cy = 16 + 5 * k, 40 - 3 * k
        write_dicom(vindr / f"v{k}.dicom", _blob(64, (cx, cy), rng), bits_stored=12, window=(2048, 4096),
                    patient_id=f"P{k}")
        rows.append(f"v{k},Nodule/Mass,8,R1,{cx - 7},{cy - 7},{cx + 7},{cy + 7}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    plain = folder / "xrays"
    plain.mkdir()
    for k in range(3):
        write_dicom(plain / f"u{k}.dcm", _blob(64, (30, 30), rng), bits_stored=12,
                    photometric="MONOCHROME1" if k == 0 else "MONOCHROME2", patient_id=f"Q{k}")
    url = f"sqlite:///{folder / 'store.db'}"
    sessions = make_sessionmaker(init_db(url))
    with sessions.begin() as session:
        report = import_vindr(session, folder / "train.csv", images=vindr, split="train")
        assert not report.errors and len(report.imported) == 6, report.errors
        report = import_folder(session, plain, split="train")
        assert not report.errors and len(report.imported) == 3, report.errors
        session.execute(update(Image).where(Image.path.in_([str(vindr / "v4.dicom"), str(vindr / "v5.dicom")]))
                        .values(split=Split.VAL))
    return url


def test_a_dicom_folder_and_a_vindr_import_train_validate_and_score(tmp_path):
    """A store of DICOM files only (VinDr boxes + an unlabeled DICOM folder) goes through a
    whole round: it trains, is validated on its val DICOMs and scores the unlabeled ones."""
    url = dicom_store(tmp_path)
    store = SqlStore.open(url)
    [result] = Trainer(store, SETTINGS).run()
    assert result.status == "ready", result.error
    assert result.label_counts["full"] == 4 and result.label_counts["unlabeled"] == 3
    assert "val" not in result.notes  # validated on the val split's DICOMs, not skipped
    with store.sessions.begin() as session:
        version = session.scalars(select(ModelVersion)).one()
        assert version.status is ModelStatus.READY
        names = set(session.scalars(select(Metric.name).where(Metric.model_version_id == version.id,
                                                              Metric.split == Split.VAL)))
        assert "mAP" in names
        scored = session.scalars(select(Image.path).join(Score, Score.image_id == Image.id)).all()
        assert sorted(Path(p).name for p in scored) == ["u0.dcm", "u1.dcm", "u2.dcm"]
        assert all(i.file_status is FileStatus.OK for i in session.scalars(select(Image)))


def test_an_unreadable_file_is_marked_corrupt_and_the_round_goes_on(tmp_path):
    """One train file gone, one garbage val file and one unlabeled file of another size no
    longer fail every round: each is marked in the store with its reason, left out, and the round is ready."""
    url = dicom_store(tmp_path)
    sessions = make_sessionmaker(init_db(url))
    vindr = tmp_path / "vindr"
    (vindr / "v1.dicom").unlink()  # train, full
    (vindr / "v5.dicom").write_bytes(b"not a dicom file at all")  # val: every val image is read
    write_dicom(tmp_path / "xrays" / "u2.dcm", np.zeros((32, 32), np.uint8), patient_id="Q2")  # unlabeled, scored
    store = SqlStore.open(url)
    [result] = Trainer(store, SETTINGS).run()
    assert result.status == "ready", result.error
    with sessions.begin() as session:
        status = {Path(i.path).name: (i.file_status, i.file_error) for i in session.scalars(select(Image))}
        scored = sorted(Path(p).name for p in session.scalars(select(Image.path).join(Score, Score.image_id == Image.id)))
        version = session.scalars(select(ModelVersion)).one()
        notes = version.config["notes"]["unreadable"]
    assert status["v5.dicom"][0] is FileStatus.CORRUPT and "not a readable DICOM file" in status["v5.dicom"][1]
    assert status["v1.dicom"][0] is FileStatus.MISSING and "file not found" in status["v1.dicom"][1]
    assert status["u2.dcm"][0] is FileStatus.CORRUPT and "image is 32x32, the record says 64x64" in status["u2.dcm"][1]
    assert {s for s, _ in status.values()} == {FileStatus.OK, FileStatus.CORRUPT, FileStatus.MISSING}
    assert scored == ["u0.dcm", "u1.dcm"]
    assert "image 6: not a readable DICOM" in notes and "image 9: image is 32x32" in notes and "found by the trainer" in status["v5.dicom"][1]
    assert version.config["notes"]["missing"].endswith("image 2")
    [second] = Trainer(store, SETTINGS).run()  # the next snapshot leaves them out from the start
    assert second.status == "ready" and "unreadable" not in second.notes


def _version_rows(url):
    with make_sessionmaker(init_db(url)).begin() as session:
        return [(v.id, v.status, v.checkpoint_path, dict(v.config))
                for v in session.scalars(select(ModelVersion).order_by(ModelVersion.id))]


@pytest.mark.slow
def test_checkpoints_are_checksummed_and_a_bad_one_falls_back_with_a_warning(tmp_path):
    """NaN weights in an intact file, a changed file and a deleted file are each passed over
    with a warning in the round's notes; the round warm-starts from the newest good version, else from scratch."""
    import torch

    from oxnet.training.checkpoint import file_sha256, load_checkpoint, save_checkpoint

    url = dicom_store(tmp_path)
    store = SqlStore.open(url)
    results = [r for _ in range(2) for r in Trainer(store, SETTINGS).run()]
    assert [r.status for r in results] == ["ready", "ready"]
    (v1, _, path1, config1), (v2, _, path2, config2) = _version_rows(url)
    assert config1["checkpoint_sha256"] == file_sha256(path1) and config2["checkpoint_sha256"] == file_sha256(path2)
    assert config2["warm_start"] == path1 and "warm_start" not in config2["notes"]

    state = load_checkpoint(path2)  # NaN weights in an intact zip, with a checksum that matches them
    name = next(k for k, v in state["student"].items() if v.is_floating_point())
    state["student"][name] = torch.full_like(state["student"][name], float("nan"))
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, path2)
    with store.sessions.begin() as session:
        session.get(ModelVersion, v2).config = {**config2, "checkpoint_sha256": file_sha256(path2)}
    [third] = Trainer(store, SETTINGS).run()
    assert third.status == "ready"
    v3, _, path3, config3 = _version_rows(url)[-1]
    assert config3["warm_start"] == path1
    assert f"model version {v2}: checkpoint {path2} has non-finite (NaN/inf) weights" in config3["notes"]["warm_start"]
    assert config3["notes"]["warm_start"].endswith(f"warm start from {path1}")

    with open(path3, "r+b") as f:  # one byte changed on disk
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    Path(path1).unlink()
    [fourth] = Trainer(store, SETTINGS).run()
    assert fourth.status == "ready"
    _, _, _, config4 = _version_rows(url)[-1]
    warning = config4["notes"]["warm_start"]
    assert config4["warm_start"] is None and warning.endswith("training from scratch")
    assert f"model version {v3}: checkpoint {path3} has checksum" in warning and "not the" in warning
    assert f"model version {v2}:" in warning and f"model version {v1}: checkpoint {path1} does not exist" in warning


@pytest.mark.slow
def test_a_checkpoint_from_before_a_model_field_existed_still_warm_starts(tmp_path):
    """A store's checkpoints outlive upgrades: a model_config without the fields added since (here the
    backbone's norm and the anchors) is that model with their defaults, so the next round warm-starts
    from it instead of training from scratch; a field this code does not know is named in the warning."""
    from oxnet.training.checkpoint import file_sha256, load_checkpoint, save_checkpoint

    url = dicom_store(tmp_path)
    store = SqlStore.open(url)

    def rewrite(version_id, path, config, change):
        state = load_checkpoint(path)
        state["model_config"] = change(dict(state["model_config"]))
        save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, path)
        with store.sessions.begin() as session:
            session.get(ModelVersion, version_id).config = {**config, "checkpoint_sha256": file_sha256(path)}

    [first] = Trainer(store, SETTINGS).run()
    assert first.status == "ready", first.error
    (v1, _, path1, config1), = _version_rows(url)
    rewrite(v1, path1, config1, lambda c: {k: v for k, v in c.items() if k not in ("backbone_norm", "anchor_sizes", "anchor_ratios")})
    [second] = Trainer(store, SETTINGS).run()
    assert second.status == "ready", second.error
    v2, _, path2, config2 = _version_rows(url)[-1]
    assert config2["warm_start"] == path1 and "warm_start" not in config2["notes"]

    rewrite(v2, path2, config2, lambda c: {**c, "stride_of_the_future": 3})
    [third] = Trainer(store, SETTINGS).run()
    config3 = _version_rows(url)[-1][3]
    assert third.status == "ready" and config3["warm_start"] is None
    assert "fields this version does not know: ['stride_of_the_future']" in config3["notes"]["warm_start"]


def test_a_round_whose_weights_turn_nan_is_not_made_ready(tmp_path, monkeypatch):
    """A NaN checkpoint is never made ready: the round fails with the reason instead."""
    import oxnet.active.loop as loop

    url = dicom_store(tmp_path)
    real = loop.load_checkpoint

    def nan_state(path, **kwargs):
        state = real(path, **kwargs)
        for tensor in state["student"].values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
        return state

    monkeypatch.setattr(loop, "load_checkpoint", nan_state)
    [result] = Trainer(SqlStore.open(url), SETTINGS).run()
    assert result.status == "failed" and "non-finite (NaN/inf) weights" in result.error
    assert [v[1] for v in _version_rows(url)] == [ModelStatus.FAILED]


def test_a_full_disk_fails_the_round_with_no_space_left_on_the_folder(tmp_path, monkeypatch):
    """The trainer records "no space left on <folder>", not torch's inline_container.cc."""
    import shutil

    import oxnet.training.checkpoint as checkpoint
    from db.trainer_lock import trainer_state

    url = dicom_store(tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=4 << 20))
    store = SqlStore.open(url)
    [result] = Trainer(store, SETTINGS).run()
    assert result.status == "failed"
    assert f"no space left on {store.models_dir}" in result.error and "inline_container" not in result.error
    with store.sessions.begin() as session:
        assert "no space left on" in _version_rows(url)[0][3]["error"]
        assert "no space left on" in (trainer_state(session, store.project).last_error or "")
