"""Start and stop the background trainer (``python -m app.trainer``, :mod:`app.trainer`) from the Overview page.

The trainer is its own process in its own session (never inside a Streamlit script run), started as a
module so it works from an installed package as from a checkout. Without a chosen preset it gets ``paper``
when a CUDA GPU is present, else ``cpu`` (:func:`default_preset` asks the NVIDIA driver itself), so this
module, imported by the Overview page, never loads torch. Starting it records ``{"pid",
"command", "started_at"}`` in ``<data dir>/trainer.pid`` (:func:`db.demo.data_dir`); stopping sends
SIGTERM to the trainer's process group: the pid named at the end of the store's lock owner
(``TrainerState.lock_owner``, e.g. ``host:1234``) when that process runs the trainer, else the recorded
pid. The trainer itself keeps its single-instance lock and heartbeat in the store.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import psutil

from app.jobs import absolute_url, process_alive, spawn, write_private
from db.accounts import authorize
from db.demo import data_dir
from db.engine import DB_URL_ENV
from oxnet.vocabulary import AUTO_PRESET, TRAINER_PRESET_NAMES
from db.models import Role

#: How the trainer is started (its options follow); the last item is what identifies its processes.
TRAINER_COMMAND = [sys.executable, "-m", "app.trainer"]


def cuda_present() -> bool:
    """Whether a CUDA GPU is usable, asked of the NVIDIA driver API (libcuda: ``cuInit``, ``cuDeviceGetCount``,
    which honour ``CUDA_VISIBLE_DEVICES``) as ``torch.cuda.is_available()`` does, without importing torch."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def default_preset() -> str:
    """``"paper"`` when a CUDA GPU is present, else ``"cpu"`` (torch-free: :func:`cuda_present`)."""
    return "paper" if cuda_present() else "cpu"


def pid_file(url: str | None = None) -> Path:
    return data_dir(url) / "trainer.pid"


def start_trainer(
    url: str | None = None, preset: str | None = None, weights: str | None = None, *, actor: str | None = None
) -> int:
    """Launch the trainer (``python -m app.trainer --preset <preset> [--weights <weights>]``) on the
    store at ``url``; returns its pid. ``preset``: None is :func:`default_preset`. ``weights``: the first
    round's backbone start (random, imagenet or a local state_dict file); None: the preset's. ``actor``:
    the logged-in user, who must be an admin (:class:`db.roles.PermissionDenied` otherwise; audited);
    None: a system actor."""
    if preset is not None and preset not in (*TRAINER_PRESET_NAMES, AUTO_PRESET):
        raise ValueError(f"preset must be one of {[*TRAINER_PRESET_NAMES, AUTO_PRESET]}, got {preset!r}")
    url = absolute_url(url)
    authorize(url, actor, Role.ADMIN, action="start the trainer", event="trainer_start", details={"preset": preset})
    command = [*TRAINER_COMMAND, "--preset", preset or default_preset()]
    if weights:
        command += ["--weights", weights]
    log = data_dir(url) / "trainer.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        process = spawn(command, env={**os.environ, DB_URL_ENV: url}, stdout=out)  # kept and reaped: no zombie
    record = {"pid": process.pid, "command": command, "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
    write_private(pid_file(url), json.dumps(record))
    return process.pid


def _is_trainer(pid: int) -> bool:
    """Process ``pid`` runs and runs the trainer (where its command line can be read)."""
    if not process_alive(pid):
        return False
    try:
        return TRAINER_COMMAND[-1] in psutil.Process(pid).cmdline()
    except psutil.AccessDenied:
        return True  # cannot read it: trust the pid
    except psutil.Error:
        return False


def trainer_pid(lock_owner: str | None, url: str | None = None) -> int | None:
    """The pid of the running trainer: from the lock owner's trailing number, else the pid file (None: none runs)."""
    candidates = []
    match = re.search(r"(\d+)$", lock_owner or "")
    if match:
        candidates.append(int(match.group(1)))
    try:
        candidates.append(int(json.loads(pid_file(url).read_text(encoding="utf-8"))["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return next((pid for pid in candidates if _is_trainer(pid)), None)


def stop_trainer(lock_owner: str | None, url: str | None = None, *, actor: str | None = None) -> int | None:
    """SIGTERM the running trainer's process group; returns its pid, or None when no trainer runs here.
    ``actor``: as :func:`start_trainer` (checked and audited before anything is signalled)."""
    authorize(url, actor, Role.ADMIN, action="stop the trainer", event="trainer_kill", details={})
    pid = trainer_pid(lock_owner, url)
    if pid is None:
        return None
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    return pid
