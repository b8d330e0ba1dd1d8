"""Checkpoints: round trip, atomic writes, clear errors for bad files, load_model."""

from __future__ import annotations

import pytest
import torch

from oxnet.training.checkpoint import load_checkpoint, load_model, save_checkpoint
from oxnet.modeling.config import build_model
from oxnet.modeling.teacher import MeanTeacher

CLASSES = ["Mass", "Nodule", "Fracture"]


def trained_state() -> tuple[dict, MeanTeacher, torch.optim.Optimizer]:
    """A student + teacher after one optimizer step, with initialised prototypes."""
    torch.manual_seed(0)
    student = build_model(preset="tiny", num_classes=3, image_size=64)
    teacher = MeanTeacher(student)
    teacher.train()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    images = torch.rand(2, 1, 64, 64)
    targets = [
        {"granularity": "full", "boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
         "image_labels": torch.tensor([0.0, 1.0, 0.0])},
        {"granularity": "weak", "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "image_labels": torch.tensor([1.0, 0.0, 1.0])},
    ]
    sum(teacher(images, targets, images).values()).backward()
    optimizer.step()
    teacher.update_teacher()
    state = {
        "classes": CLASSES, "model_config": student.config.to_dict(), "student": student.state_dict(),
        "teacher": teacher.teacher.state_dict(), "ema_step": int(teacher.ema_step),
        "optimizer": optimizer.state_dict(), "epoch": 1, "history": {"epochs": [{"metrics": {"AP_S": None}}]},
    }
    return state, teacher, optimizer


def test_round_trip_restores_weights_optimizer_and_prototypes(tmp_path):
    state, teacher, optimizer = trained_state()
    student = teacher.student
    assert student.prototype_initialized.any()
    path = save_checkpoint(state, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(path)
    assert loaded["format"] == "oxnet-checkpoint" and loaded["classes"] == CLASSES
    assert loaded["history"] == state["history"]

    restored = build_model(preset="tiny", num_classes=3, image_size=64)
    restored.load_state_dict(loaded["student"])
    for (name, a), b in zip(student.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(restored.prototypes, student.prototypes)
    assert torch.equal(restored.prototype_initialized, student.prototype_initialized)
    for name, value in teacher.teacher.state_dict().items():
        assert torch.equal(loaded["teacher"][name], value), name

    new_optimizer = torch.optim.Adam(restored.parameters(), lr=0.5)
    new_optimizer.load_state_dict(loaded["optimizer"])
    assert new_optimizer.param_groups[0]["lr"] == 1e-3
    for p_old, p_new in zip(student.parameters(), restored.parameters()):
        old, new = optimizer.state[p_old], new_optimizer.state[p_new]
        assert torch.equal(old["exp_avg"], new["exp_avg"]) and torch.equal(old["exp_avg_sq"], new["exp_avg_sq"])


def test_load_model_rebuilds_student_and_teacher(tmp_path):
    state, teacher, _ = trained_state()
    path = save_checkpoint(state, tmp_path / "ckpt.pt")
    images = torch.rand(1, 1, 64, 64)
    for which, reference in (("student", teacher.student), ("teacher", teacher.teacher)):
        model = load_model(path, weights=which)
        assert not model.training
        ours, theirs = model(images)[0], reference.eval()(images)[0]
        torch.testing.assert_close(ours["image_probs"], theirs["image_probs"])
        torch.testing.assert_close(ours["boxes"], theirs["boxes"])
    with pytest.raises(ValueError, match="weights must be 'student' or 'teacher'"):
        load_model(path, weights="ema")


def test_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"classes": ["A"], "model_config": {}, "student": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = path.read_bytes()

    def torch_save_dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip archive")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torch_save_dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"classes": ["A"], "model_config": {}, "student": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "temporary file left behind"
    assert load_checkpoint(path)["epoch"] == 1


def test_truncated_or_foreign_files_give_clear_errors(tmp_path):
    state, _, _ = trained_state()
    good = save_checkpoint(state, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"checkpoint .*truncated.pt cannot be read \(truncated or corrupt\?\)"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt cannot be read"):
        load_model(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.pt is not an OXnet checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    mismatched = dict(state, model_config={**state["model_config"], "fpn_width": 64})
    path = save_checkpoint(mismatched, tmp_path / "mismatched.pt")
    with pytest.raises(ValueError, match="mismatched.pt: student weights do not fit its model_config"):
        load_model(path)


def test_pickled_code_is_refused(tmp_path):
    """Weights_only=True: a checkpoint holding a pickled module is not executed but rejected."""
    path = tmp_path / "module.pt"
    torch.save({"format": "oxnet-checkpoint", "model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError, match="module.pt cannot be read"):
        load_checkpoint(path)


def _free(monkeypatch, free_bytes: int) -> None:
    import shutil

    import oxnet.training.checkpoint as checkpoint

    real = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=free_bytes))


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    """A full disk is named before torch writes a byte; the old checkpoint stays intact."""
    from oxnet.training.checkpoint import NoSpaceLeft

    target = save_checkpoint({"student": {"w": torch.ones(3)}, "classes": ["a"], "model_config": {}}, tmp_path / "m.pt")
    before = target.read_bytes()
    _free(monkeypatch, 1 << 20)
    with pytest.raises(NoSpaceLeft, match=f"no space left on {tmp_path}: writing a checkpoint needs about 16 MiB, 1 MiB are free"):
        save_checkpoint({"student": {"w": torch.zeros(1000)}, "classes": ["a"], "model_config": {}}, target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_failed_write_on_a_full_disk_says_no_space_left(tmp_path, monkeypatch):
    """Torch's own message for a full disk is inline_container.cc's; the caller gets one clear sentence."""
    import oxnet.training.checkpoint as checkpoint
    from oxnet.training.checkpoint import NoSpaceLeft

    def full_disk(state, f):
        f.write(b"PK\x03\x04partial")
        _free(monkeypatch, 0)  # the disk fills while writing
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(NoSpaceLeft) as caught:
        save_checkpoint({"student": {}, "classes": [], "model_config": {}}, tmp_path / "m.pt")
    assert str(caught.value).startswith(f"no space left on {tmp_path} while writing m.pt")
    assert "inline_container" not in str(caught.value) and caught.value.errno == 28
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_verify_checkpoint_checks_the_checksum_and_finite_weights(tmp_path):
    from oxnet.training.checkpoint import file_sha256, verify_checkpoint

    path = save_checkpoint({"student": {"w": torch.ones(3)}, "classes": ["a"], "model_config": {}}, tmp_path / "m.pt")
    digest = file_sha256(path)
    assert verify_checkpoint(path, sha256=digest)["classes"] == ["a"]
    with pytest.raises(ValueError, match="has checksum .* not the 000000000000... recorded"):
        verify_checkpoint(path, sha256="0" * 64)
    save_checkpoint({"student": {"w": torch.tensor([1.0, float("inf")])}, "classes": ["a"], "model_config": {}}, path)
    with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) weights in 1 tensor\(s\), e.g. student.w"):
        verify_checkpoint(path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        verify_checkpoint(path, sha256=digest)
