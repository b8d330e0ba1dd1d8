"""Distributed training: two CPU processes (gloo) run fit() for a few OXnet steps and end identical."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from oxnet.data import records_from_coco
from tests.test_engine import CLASSES, write_coco

pytestmark = pytest.mark.slow  # processes, whole training runs: deselect with -m 'not slow'

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then fit(). The final student,
    teacher and prototypes are captured from train_one_round's arguments (only rank 0 writes checkpoints)."""
    import oxnet.training.engine as engine
    from oxnet.training.settings import TrainConfig

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    real = engine.train_one_round

    def capture(model, optimizer, loader, *, teacher, **kwargs):
        losses = real(model, optimizer, loader, teacher=teacher, **kwargs)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        state = {"student": teacher.student.state_dict(), "teacher": teacher.teacher.state_dict(), "losses": losses,
                 "ema_step": int(teacher.ema_step)}
        torch.save(state, Path(folder) / f"rank{rank}.pt")
        return losses

    engine.train_one_round = capture
    root = Path(folder)
    train = [
        r
        for name, kind in (("full_1", None), ("weak_101", "weak"), ("unlabeled_201", "unlabeled"))
        for r in records_from_coco(root / f"{name}.json", granularity=kind, classes=CLASSES)
    ]
    val = records_from_coco(root / "full_301.json", classes=CLASSES)
    config = TrainConfig(
        preset="tiny", model={"image_size": 64}, method="oxnet", epochs=1, batch_size=3, steps_per_epoch=3,
        device="cpu", out_dir=str(root / "run"), seed=0, lr=1e-3,
    )
    engine.fit(train, val, config, classes=CLASSES, progress=False)


def test_two_processes_end_with_identical_student_teacher_and_prototypes(tmp_path):
    write_coco(tmp_path, 4, kind="full", seed=1, first_id=1)
    write_coco(tmp_path, 3, kind="weak", seed=2, first_id=101)
    write_coco(tmp_path, 3, kind="unlabeled", seed=3, first_id=201)
    write_coco(tmp_path, 2, kind="full", seed=4, first_id=301)
    context = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError("the distributed run did not finish within 240 s")

    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert states[0]["ema_step"] == states[1]["ema_step"] == 3
    assert states[0]["losses"] == states[1]["losses"]  # losses are averaged over the ranks
    for key in ("student", "teacher"):
        assert states[0][key].keys() == states[1][key].keys()
        for name, value in states[0][key].items():
            torch.testing.assert_close(value, states[1][key][name], rtol=0, atol=1e-6, msg=f"{key}.{name}")
    assert states[0]["student"]["prototype_initialized"].all()
    # The ranks trained (each on its own slice): the weights moved away from the shared initialisation.
    torch.manual_seed(0)
    from oxnet.training.settings import TrainConfig
    from oxnet.modeling.detector import OXNet

    initial = OXNet.from_config(TrainConfig(preset="tiny", model={"image_size": 64}).model_config(len(CLASSES)))
    assert not torch.equal(initial.state_dict()["cls_head.out.weight"], states[0]["student"]["cls_head.out.weight"])
    # Only rank 0 wrote checkpoints, and it wrote the weights both ranks hold.
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    torch.testing.assert_close(last["student"]["prototypes"], states[1]["student"]["prototypes"], rtol=0, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "last.pt"]
