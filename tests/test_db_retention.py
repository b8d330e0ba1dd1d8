"""Checkpoint retention: protected versions and the newest ready ones keep their files; failed,
abandoned, older and orphaned versions lose theirs; temp files of interrupted writes go."""

from __future__ import annotations

from sqlalchemy import select

from db.models import ModelStatus, ModelVersion
from db.projects import ensure_project
from db.versions import create_model_version, finish_model_version, promote_model_version, record_metrics
from db.retention import apply_retention, folder_size, protected_versions
from db.workbench import SqlStore


def _version(session, models, status, mAP=None, files=("model.pt",)):
    version = create_model_version(session, config={})
    folder = models / f"version-{version.id:05d}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"x" * 1000)
    if status is not ModelStatus.TRAINING:
        finish_model_version(session, version.id, status=status,
                             checkpoint_path=str(folder / "model.pt") if status is ModelStatus.READY else None)
    if mAP is not None:
        record_metrics(session, version.id, "val", {"mAP": mAP})
    return version.id


def test_retention_keeps_newest_best_and_last_n_and_removes_the_rest(db_sessionmaker, tmp_path):
    """Failed versions used to keep last.pt/best.pt/model.pt and temp files forever."""
    models = tmp_path / "models" / "default"
    with db_sessionmaker.begin() as s:
        ensure_project(s)
        best = _version(s, models, ModelStatus.READY, 0.5)
        old = _version(s, models, ModelStatus.READY, 0.1)
        failed = _version(s, models, ModelStatus.FAILED, files=("last.pt", "best.pt", "model.pt", ".model.pt.abc.tmp"))
        kept = [_version(s, models, ModelStatus.READY, m) for m in (0.2, 0.3)]
        newest = _version(s, models, ModelStatus.READY, 0.05, files=("model.pt", ".model.pt.x1.tmp"))
        training = _version(s, models, ModelStatus.TRAINING, files=("last.pt", ".last.pt.y.tmp"))
        (models / "version-00099").mkdir()
        (models / "version-00099" / "last.pt").write_bytes(b"x" * 1000)
    before = folder_size(models)
    with db_sessionmaker.begin() as s:
        assert protected_versions(s) == {newest: "serving version", best: "best val mAP"}  # no promotion yet: newest serves
        report = apply_retention(s, models, keep_ready=2)
    assert report.removed == {old: "older ready version beyond the retention", failed: "failed version",
                              99: "no model version row"}
    assert set(report.kept) == {newest, best, *kept}
    assert report.freed_bytes == 1000 + 4000 + 1000 + 1000 == before - folder_size(models)
    left = sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.is_file())
    assert left == sorted([f"version-{i:05d}/model.pt" for i in (best, *kept, newest)]
                          + [f"version-{training:05d}/last.pt", f"version-{training:05d}/.last.pt.y.tmp"])
    with db_sessionmaker() as s:
        row = s.get(ModelVersion, old)
        assert row.checkpoint_path is None and "older ready version beyond the retention" in row.config["checkpoint_removed"]
        assert s.get(ModelVersion, best).checkpoint_path.endswith("model.pt")


def test_an_abandoned_version_of_a_killed_trainer_loses_its_files(db_sessionmaker, tmp_path):
    models = tmp_path / "models" / "default"
    with db_sessionmaker.begin() as s:
        ensure_project(s)
        ready = _version(s, models, ModelStatus.READY, 0.3)
        killed = _version(s, models, ModelStatus.TRAINING, files=("last.pt", "best.pt", ".best.pt.q.tmp"))
    store = SqlStore(db_sessionmaker, models_dir=models)
    assert store.abandon_unfinished() == 1
    assert not (models / f"version-{killed:05d}").exists() and (models / f"version-{ready:05d}" / "model.pt").is_file()
    with db_sessionmaker() as s:
        assert s.scalars(select(ModelVersion.status).order_by(ModelVersion.id)).all() == [ModelStatus.READY, ModelStatus.FAILED]
    assert SqlStore(db_sessionmaker, models_dir=models, keep_ready=None).retain() is None  # retention off


def test_a_promoted_older_version_keeps_its_checkpoint(db_sessionmaker, tmp_path):
    """The serving version (promoted or rolled back to) is protected however old and however bad."""
    models = tmp_path / "models" / "default"
    with db_sessionmaker.begin() as s:
        ensure_project(s)
        serving = _version(s, models, ModelStatus.READY, 0.01)
        others = [_version(s, models, ModelStatus.READY, m) for m in (0.5, 0.2, 0.3)]
        promote_model_version(s, serving, annotator="dr.admin")
    with db_sessionmaker.begin() as s:
        assert protected_versions(s) == {serving: "serving version", others[-1]: "newest ready version",
                                         others[0]: "best val mAP"}
        report = apply_retention(s, models, keep_ready=0)
    assert report.removed == {others[1]: "older ready version beyond the retention"}
    assert (models / f"version-{serving:05d}" / "model.pt").is_file()
