"""Start ``streamlit run`` for a test, wait until it answers, and stop it, plus the Chromium settings:
the one harness of the real-browser and server tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

#: Debian's Chromium (never ``playwright install``) and the flags that keep it off the closed network.
CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]



def free_port(ports: range) -> int:
    """The first port of ``ports`` free on 127.0.0.1 (each test module has a range of its own)."""
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


@contextlib.contextmanager
def streamlit_server(
    main: str | Path,
    *,
    port: int,
    cwd: str | Path,
    env: Mapping[str, str],
    args: Sequence[str] = ("--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"),
    python: str | Path = sys.executable,
    log: Path | None = None,
    timeout_s: float = 60.0,
) -> Iterator[subprocess.Popen]:
    """``python -m streamlit run MAIN --server.headless true --server.port PORT *args`` in its own process
    group; yields once ``/_stcore/health`` answers 200; SIGTERMs the group afterwards. A server that exits
    or does not come up within ``timeout_s`` fails the test with its log (``log``: where its output goes)."""
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        [str(python), "-m", "streamlit", "run", str(main), "--server.headless", "true", "--server.port", str(port), *args],
        cwd=cwd, env=dict(env), start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).status == 200:
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not come up on port {port}:\n"
                                       + (log.read_text(errors="replace") if log is not None else "")) from None
                time.sleep(0.2)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
        if log is not None:
            out.close()
