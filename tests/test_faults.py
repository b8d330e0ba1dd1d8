"""kill -9 in the middle of things: the trainer at each phase of a round, an import inside its
transaction, an annotator's writer between saves. Labels, boxes and audit rows are counted before and
after; the audit log must replay to every image's state. Each kill is a real SIGKILL of a child process,
sent by the child to itself at the chosen point (patched in by the test, not by the code under test)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.engine import init_db, make_sessionmaker
from db.lifecycle import granularity_mismatches, image_state, replay_audit
from db.models import AuditEntry, Box, Image, ImageLabel, ModelStatus, ModelVersion
from oxnet.training.checkpoint import verify_checkpoint
from tests.test_trainer import make_store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def counts(url: str) -> dict[str, int]:
    """Rows that annotations are made of (the trainer must never change them)."""
    with make_sessionmaker(init_db(url))() as s:
        return {
            "images": s.scalar(select(func.count()).select_from(Image)),
            "labels": s.scalar(select(func.count()).select_from(ImageLabel)),
            "boxes": s.scalar(select(func.count()).select_from(Box)),
            "audit": s.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.image_id.is_not(None))),
        }


def consistent(url: str) -> None:
    with make_sessionmaker(init_db(url))() as s:
        assert granularity_mismatches(s) == []
        for image in s.scalars(select(Image)):
            assert replay_audit(s, image.id) == image_state(image)


def run_child(code: str, env_url: str) -> int:
    """Run ``code`` in a fresh Python; returns its exit status (-9: it was killed)."""
    result = subprocess.run([sys.executable, "-c", code, env_url], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if result.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"exit {result.returncode}: {result.stdout[-2000:]} {result.stderr[-3000:]}")
    return result.returncode


KILL = "import os, signal\ndef die(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"

TRAINER = KILL + """
import sys
from dataclasses import replace
import oxnet.active.loop as loop, db.workbench as workbench
from db.workbench import SqlStore
from oxnet.active.loop import TRAINER_PRESETS, Trainer
PHASE = {phase!r}
if PHASE == "train":
    real_fit = loop.fit
    def fit(*a, callback=None, **k):
        def cb(p):
            callback(p)
            if p.step >= 1:
                die()
        return real_fit(*a, callback=cb, **k)
    loop.fit = fit
elif PHASE == "save":
    loop.Trainer._compact = lambda self, *a, **k: die()
elif PHASE == "score":
    loop.Trainer._score = lambda self, *a, **k: die()
elif PHASE == "write":
    real_write = SqlStore.write_results
    def write(self, *a):
        real_write(self, *a)
        die()
    SqlStore.write_results = write
elif PHASE == "finish":
    real_log = workbench.log_event
    def log(session, who, action, *a, **k):
        real_log(session, who, action, *a, **k)
        if action == "model_version_ready":
            session.flush()
            die()  # inside the transaction that makes the version ready
    workbench.log_event = log
settings = replace(TRAINER_PRESETS["tiny"], steps_per_epoch=1, pretrain_epochs=0, min_interval_s=0.0, heartbeat_s=0.2,
                   max_rounds=1, device="cpu")
Trainer(SqlStore.open(sys.argv[1]), settings).run()
"""


def test_kill_9_of_the_trainer_at_each_phase_loses_nothing_and_resumes(tmp_path):
    url = make_store(tmp_path)
    before = counts(url)
    phases = ["train", "save", "score", "write", "finish"]
    for phase in phases:
        assert run_child(TRAINER.format(phase=phase), url) == -signal.SIGKILL, phase
        assert counts(url) == before, phase
        with make_sessionmaker(init_db(url))() as s:
            statuses = s.scalars(select(ModelVersion.status).order_by(ModelVersion.id)).all()
        assert statuses[-1] is ModelStatus.TRAINING and ModelStatus.READY not in statuses, (phase, statuses)
    assert run_child(TRAINER.format(phase="none"), url) == 0  # a clean round after five kills
    assert counts(url) == before
    consistent(url)
    with make_sessionmaker(init_db(url))() as s:
        versions = s.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        assert [v.status for v in versions] == [ModelStatus.FAILED] * 5 + [ModelStatus.READY]
        assert all(v.config["error"].startswith("abandoned") for v in versions[:5])
        ready = versions[-1]
        verify_checkpoint(ready.checkpoint_path, sha256=ready.config["checkpoint_sha256"])
        folders = sorted(p.name for p in Path(ready.checkpoint_path).parents[1].iterdir())
        assert folders == [f"version-{ready.id:05d}"]  # the killed versions' files (and temp files) are gone


IMPORT = KILL + """
import sys
import db.importers.write as importers
from db.__main__ import main
real_insert = importers.insert
calls = []
def insert(table, *a, **k):
    calls.append(table)
    if len(calls) == {after}:
        die()  # after {after} bulk insert(s) of the import's transaction
    return real_insert(table, *a, **k)
importers.insert = insert
sys.exit(main(["--db", sys.argv[1], "import", "coco", {coco!r}, "--images", {images!r}]))
"""


def test_kill_9_of_an_import_inside_its_transaction_leaves_nothing_half_imported(tmp_path):
    from oxnet.data.synthetic import write_coco

    paths = write_coco(tmp_path / "synth", 40, size=64, seed=5)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_db(url).dispose()
    coco, images = str(paths["synthetic"]), str(tmp_path / "synth" / "images")
    empty = counts(url)
    for after in (1, 2, 3, 4):  # killed at the images, labels, boxes and audit inserts
        assert run_child(IMPORT.format(after=after, coco=coco, images=images), url) == -signal.SIGKILL
        assert counts(url) == empty == {"images": 0, "labels": 0, "boxes": 0, "audit": 0}
    assert run_child(IMPORT.format(after=-1, coco=coco, images=images), url) == 0
    full = counts(url)
    truth = json.loads(Path(coco).read_text())
    assert full["images"] == full["audit"] == 40 and full["boxes"] == len(truth["annotations"]) > 0
    consistent(url)


WRITER = """
import sys, itertools
from db.engine import init_db, make_sessionmaker
from db.lifecycle import set_boxes, set_image_labels
Session = make_sessionmaker(init_db(sys.argv[1]))
from sqlalchemy import select
from db.models import Image, LabelClass
with Session() as s:
    ids = s.scalars(select(Image.id).order_by(Image.id)).all()  # tests.test_trainer.PLAN: 6-8 weak, 9-11 unlabeled
    weak = s.scalars(select(Image.id).where(Image.id.in_(ids[6:9]), Image.no_finding.is_(False))).all()
    unlabeled = ids[9:12]
    first, second = s.scalars(select(LabelClass.name).order_by(LabelClass.ordinal)).all()[:2]
assert weak and unlabeled
for n in itertools.count():
    with Session.begin() as s:
        if n % 2:
            set_image_labels(s, weak[n % len(weak)], {first: n % 4 == 1}, annotator="dr.kill")
        else:
            set_boxes(s, unlabeled[n % len(unlabeled)], [(second, 1, 1, 5 + n % 7, 9)], annotator="dr.kill",
                      complete=n % 3 == 0)
    print(n, flush=True)
"""


def test_kill_9_of_a_writer_between_and_during_saves_keeps_the_audit_exact(tmp_path):
    url = make_store(tmp_path)
    for delay in (1.5, 2.0, 2.5):
        with make_sessionmaker(init_db(url))() as s:
            audit_before = s.scalar(select(func.count()).select_from(AuditEntry))
        writer = subprocess.Popen([sys.executable, "-c", WRITER, url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline()  # it saves
        time.sleep(delay)
        writer.kill()
        printed = 1 + len(writer.stdout.read().splitlines())
        writer.wait()
        with make_sessionmaker(init_db(url))() as s:
            added = s.scalar(select(func.count()).select_from(AuditEntry)) - audit_before
        assert added in (printed, printed + 1)  # every committed save has its audit row (one may commit unprinted)
        consistent(url)
