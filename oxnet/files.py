"""Files written whole or not at all, for every layer (no torch, no SQL).

A reader never sees half a file: :func:`atomic_write` writes a temporary file in the destination's
folder, flushes and fsyncs it, renames it over the destination (``os.replace``) and fsyncs the folder;
if anything fails midway the destination keeps its previous content and the temporary file is removed.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | Path, *, binary: bool = False, private: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file to write ``path`` through; it replaces ``path`` when the block ends cleanly.

    Args:
        path: the destination; its folder is created if needed.
        binary: open the temporary file in ``"wb"`` mode instead of UTF-8 text.
        private: create the file readable by its owner only (0600), e.g. for job files that name
            patients or carry a salt.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _create_temporary(path: Path, mode: int) -> tuple[int, str]:
    """A new, unique temporary file beside ``path``, created with ``mode`` less the umask by the kernel,
    as ``open()`` would (no process-wide umask change, so other threads are unaffected)."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode), tmp
        except FileExistsError:
            continue


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str, *, private: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    with atomic_write(path, private=private) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any, *, indent: int | None = 1, private: bool = False, **dumps: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    return write_text(path, json.dumps(data, indent=indent, **dumps), private=private)


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON can hold it: mappings with string keys, tuples as lists, and non-finite
    floats (NaN, inf: no JSON value) as None, all the way down."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
