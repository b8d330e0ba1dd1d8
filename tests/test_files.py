"""The one atomic file write and the one machine description (oxnet.files, oxnet.machine)."""

import json
import os
import stat
import subprocess
import sys

import pytest

from oxnet.files import atomic_write, jsonable, write_json, write_text
from oxnet.machine import describe


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a.txt"
    write_text(path, "old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise RuntimeError("midway")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_private_files_are_owner_only_and_normal_ones_follow_the_umask(tmp_path):
    write_text(tmp_path / "secret", "x", private=True)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    with atomic_write(tmp_path / "b.bin", binary=True) as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) & 0o044  # group/others may read, as open() would


def test_the_mode_comes_from_the_umask_without_changing_it(tmp_path, monkeypatch):
    # the umask is process-wide: setting it, even for a moment, races with every other thread's open()
    old = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError("atomic_write changed the process umask")

        monkeypatch.setattr(os, "umask", no_umask)
        write_text(tmp_path / "shared.txt", "x")
        write_text(tmp_path / "own.txt", "y", private=True)
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "own.txt").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own.txt", "shared.txt"]


def test_machine_description_names_torch_only_when_loaded():
    code = ("import sys, json; sys.modules['torch'] = None; from oxnet.machine import describe; "
            "print(json.dumps(describe()))")
    light = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert {"platform", "processor", "cpus", "memory_gb", "python"} <= set(light) and "torch" not in light
    import torch

    full = describe("cpu")
    assert full["torch"] == torch.__version__ and full["device"] == "cpu" and full["threads"] >= 1


def test_jsonable_makes_strict_json_all_the_way_down():
    value = {1: (1.0, float("nan")), "b": [{"c": float("inf")}, "x"], "d": None}
    assert jsonable(value) == {"1": [1.0, None], "b": [{"c": None}, "x"], "d": None}
    json.dumps(jsonable(value), allow_nan=False)  # strict JSON: would raise on NaN
