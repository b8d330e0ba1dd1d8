"""Checkpoint retention: which model versions keep their files, and removing the others' files.

Protected (:func:`protected_versions`): the newest ready version and the ready version with the best
val mAP. Besides them the ``keep_ready`` newest ready versions keep their checkpoints; failed and
abandoned versions, older ready ones and folders without a version row lose theirs. Light: no torch,
so the UI can show :func:`folder_size` of the models folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Metric, ModelStatus, ModelVersion, Split
from db.projects import DEFAULT_PROJECT, get_project
from db.versions import serving_model_version
from oxnet.vocabulary import MAP

__all__ = ["DEFAULT_KEEP_READY", "Retention", "apply_retention", "folder_size", "protected_versions"]

#: Ready model versions whose checkpoints are kept besides the protected ones (newest first).
DEFAULT_KEEP_READY = 3


def protected_versions(session: Session, project: str = DEFAULT_PROJECT) -> dict[int, str]:
    """Model versions whose checkpoints retention never deletes, with the reason: the serving version
    (its suggestions and boxes are what annotators see; promote/rollback may return to it), the newest
    ready version (it warm-starts the next round) and the ready version with the best val mAP."""
    project_id = get_project(session, project).id
    protected: dict[int, str] = {}
    serving = serving_model_version(session, project)
    if serving is not None:
        protected[serving.id] = "serving version"
    newest = session.scalar(select(func.max(ModelVersion.id)).where(
        ModelVersion.project_id == project_id, ModelVersion.status == ModelStatus.READY))
    if newest is not None:
        protected.setdefault(newest, "newest ready version")
    best = session.scalar(
        select(Metric.model_version_id).join(ModelVersion, ModelVersion.id == Metric.model_version_id)
        .where(ModelVersion.project_id == project_id, ModelVersion.status == ModelStatus.READY,
               Metric.split == Split.VAL, Metric.name == MAP)
        .order_by(Metric.value.desc(), Metric.model_version_id.desc()).limit(1)
    )
    if best is not None:
        protected.setdefault(best, "best val mAP")
    return protected


@dataclass
class Retention:
    """What :func:`apply_retention` did: versions whose files were removed, bytes freed, files left alone."""

    removed: dict[int, str] = field(default_factory=dict)
    freed_bytes: int = 0
    kept: dict[int, str] = field(default_factory=dict)


def folder_size(folder: str | Path) -> int:
    """Bytes of the regular files under ``folder`` (0 when it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _version_id(folder: Path) -> int | None:
    stem = folder.name.removeprefix("version-")
    return int(stem) if folder.name.startswith("version-") and stem.isdigit() else None


def apply_retention(session: Session, models_dir: str | Path, project: str = DEFAULT_PROJECT, *,
                    keep_ready: int = DEFAULT_KEEP_READY) -> Retention:
    """Delete checkpoint files that are no longer needed, in the project's folder ``models_dir``.

    Kept: the :func:`protected_versions` and the ``keep_ready`` newest other ready versions (less any
    temp files of an interrupted write, ``.*.tmp``), and the folder of a version still training.
    Removed: every file of failed (and abandoned) versions, of ready versions
    beyond those (their row, metrics and predictions stay; ``checkpoint_path`` becomes None and the
    config says why), and folders without a version row. The caller owns the transaction.
    """
    if keep_ready < 0:
        raise ValueError(f"keep_ready must be >= 0, got {keep_ready}")
    models_dir = Path(models_dir)
    project_id = get_project(session, project).id
    versions = {v.id: v for v in session.scalars(select(ModelVersion).where(ModelVersion.project_id == project_id))}
    keep = protected_versions(session, project)
    others = sorted((i for i, v in versions.items() if v.status == ModelStatus.READY and i not in keep), reverse=True)
    keep.update({i: f"one of the {keep_ready} newest ready versions" for i in others[:keep_ready]})
    report = Retention(kept=dict(keep))
    if not models_dir.is_dir():
        return report
    for folder in sorted(models_dir.glob("version-*")):
        version_id = _version_id(folder)
        if version_id is None or not folder.is_dir():
            continue
        version = versions.get(version_id)
        if version is not None and version.status == ModelStatus.TRAINING:
            continue  # a round writes there now
        if version_id in keep:
            for tmp in folder.glob(".*.tmp"):  # left by a write interrupted by a kill
                report.freed_bytes += tmp.stat().st_size
                tmp.unlink(missing_ok=True)
            continue
        size = folder_size(folder)
        if size == 0 and not any(folder.iterdir()):
            folder.rmdir()
            continue
        shutil.rmtree(folder, ignore_errors=True)
        report.freed_bytes += size
        if version is None:
            report.removed[version_id] = "no model version row"
            continue
        reason = "failed version" if version.status == ModelStatus.FAILED else "older ready version beyond the retention"
        report.removed[version_id] = reason
        if version.checkpoint_path:
            version.config = {**(version.config or {}), "checkpoint_removed": f"{version.checkpoint_path} ({reason})"}
            version.checkpoint_path = None
    return report
