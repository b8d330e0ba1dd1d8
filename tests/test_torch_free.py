"""The store, its command line and the trainer control load no torch: the store speaks the trainer's
protocol (oxnet.active.protocol) in plain values, the demo draws its images only when seeding, and the
trainer picks its preset itself. (tests/test_installed.py runs ``python -m db`` where torch is absent.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "oxnet.data.synthetic")


def _loaded_after(modules: str) -> list[str]:
    """Which of :data:`HEAVY` a fresh interpreter holds after ``import <modules>``."""
    code = f"import sys; import {modules}; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return eval(result.stdout)  # a list literal printed by the child


def test_the_store_modules_load_no_torch():
    assert _loaded_after("db.workbench, db.demo, db.service, db.__main__, db.costs, oxnet.active.protocol") == []


def test_the_trainer_control_loads_no_torch(tmp_path):
    """Importing it and starting a trainer without a preset: the preset is torch's choice (paper on a CUDA
    GPU, else cpu), made without torch."""
    stub = tmp_path / "trainer.py"  # a stand-in trainer that records its options
    stub.write_text("import json, sys; open(sys.argv[0] + '.argv', 'w').write(json.dumps(sys.argv[1:]))\n")
    code = (f"import sys, time; import app.trainer_control as control; control.TRAINER_COMMAND = [sys.executable, {str(stub)!r}]; "
            f"control.start_trainer('sqlite:///{tmp_path / 'w.db'}'); print([m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert eval(result.stdout) == []
    argv = Path(f"{stub}.argv")
    for _ in range(600):
        if argv.is_file() and argv.read_text():
            break
        time.sleep(0.1)
    import torch

    assert json.loads(argv.read_text()) == ["--preset", "paper" if torch.cuda.is_available() else "cpu"]


def test_the_trainer_control_refuses_an_unknown_preset(tmp_path):
    from app.trainer_control import start_trainer

    with pytest.raises(ValueError, match="preset must be one of .*'gpu'"):
        start_trainer(f"sqlite:///{tmp_path / 'w.db'}", preset="gpu")
    assert not (tmp_path / "workbench_data" / "trainer.pid").exists()  # nothing started


def test_the_trainer_resolves_auto_to_a_preset():
    import torch

    from app.trainer import _parser, resolve_preset
    from oxnet.active.loop import TRAINER_PRESETS

    assert resolve_preset("auto") == ("paper" if torch.cuda.is_available() else "cpu")
    assert resolve_preset("tiny") == "tiny" and resolve_preset(_parser().parse_args([]).preset) in TRAINER_PRESETS
    assert _parser().parse_args(["--preset", "auto"]).preset == "auto"


def test_the_store_writes_plain_results(db_sessionmaker, tmp_path):
    """SqlStore.write_results takes numpy values (the trainer converts its tensors) and keeps the boxes
    best first, at most MAX_BOXES, and the attention maps rounded."""
    from sqlalchemy import select

    from db.models import Prediction, Score, Suggestion
    from db.versions import create_model_version
    from db.workbench import MAX_BOXES, SqlStore
    from oxnet.active.protocol import ScoredImage
    from oxnet.vocabulary import ATTENTION_KEY, DRAW_BOXES

    from tests.test_db_repository import _images

    ids = _images(db_sessionmaker, 1)
    with db_sessionmaker.begin() as session:
        version = create_model_version(session, config={}).id
    scores = np.linspace(0.1, 0.9, MAX_BOXES + 5).astype(np.float32)
    result = ScoredImage(
        image_id=ids[0], granularity="weak", boxes=np.tile(np.float32([1.234, 2, 30.5, 40]), (len(scores), 1)),
        scores=scores, labels=np.zeros(len(scores), dtype=np.int64), image_probs=np.float32([0.25, 0.123456]),
        attention=np.full((2, 2, 3), 1 / 3, dtype=np.float32), value=0.5, disagreement=0.25, uncertainty=0.125,
        conflict=0.0,
    )
    store = SqlStore(db_sessionmaker, models_dir=tmp_path)
    store.write_results(version, ["A", "B"], [result], [{"image_id": ids[0], "action": DRAW_BOXES, "score": 1.0,
                                                        "reason": {"text": "because"}}])
    with db_sessionmaker.begin() as session:
        prediction = session.scalars(select(Prediction)).one()
        assert [b["score"] for b in prediction.boxes] == [round(float(s), 4) for s in scores[::-1][:MAX_BOXES]]
        assert prediction.boxes[0] == {"class": "A", "bbox": [1.23, 2.0, 30.5, 40.0], "score": 0.9}
        assert prediction.image_probs["B"] == pytest.approx(0.1235)
        assert prediction.image_probs[ATTENTION_KEY]["A"] == [[0.3333] * 3] * 2
        assert session.scalars(select(Score)).one().details == {"disagreement": 0.25, "uncertainty": 0.125, "conflict": 0.0}
        assert session.scalars(select(Suggestion)).one().action.value == DRAW_BOXES


def test_a_lock_owner_is_dead_when_its_local_process_is_gone_or_a_zombie():
    import os
    import socket

    from db.workbench import _dead_local_owner

    host = socket.gethostname()
    assert not _dead_local_owner(f"{host}:{os.getpid()}") and not _dead_local_owner(None)
    assert not _dead_local_owner("elsewhere:1")  # another host's process: cannot tell, so alive
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(600):
        if _dead_local_owner(f"{host}:{zombie.pid}"):  # exited, not yet reaped
            break
        time.sleep(0.05)
    assert _dead_local_owner(f"{host}:{zombie.pid}")
    zombie.wait()
    assert _dead_local_owner(f"{host}:{zombie.pid}")  # reaped: no such process
