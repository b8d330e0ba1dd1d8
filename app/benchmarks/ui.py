"""The ``ui`` benchmark: server time of every page with a large store (``python scripts/bench.py ui``).

Builds a temporary SQLite store with ``--images`` image rows (default 100,000; the demo's mix of splits
and granularities, three model versions, a suggestion of each action for every not-full training
image, a sweep) whose paths are links to a few real synthetic 512 px PNGs. Then runs every page with
``streamlit.testing.v1.AppTest`` (the script run on the server, no browser): once untimed to import
modules and open the engine, then per page with the query caches cleared (``cold``, what a user waits
for after a change) and again (``warm``, served from ``st.cache_data``). ``max_page_s`` is the slowest
cold page.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import streamlit as st
from PIL import Image as PILImage
from streamlit.testing.v1 import AppTest

from app.auth import TOKEN_KEY
from db.accounts import create_user, new_password, open_session
from db.demo import fill_scale_store
from db.engine import DB_URL_ENV, init_db, make_sessionmaker
from db.models import SuggestedAction
from db.queue import queue
from oxnet.data.synthetic import generate
from oxnet.machine import describe

MAIN = Path(__file__).resolve().parents[1] / "main.py"
PAGES = ("overview", "queue", "annotate", "metrics", "data")
ANNOTATOR = "bench"


def _build(folder: Path, n: int) -> str:
    """A store of ``n`` images under ``folder``; returns its URL."""
    sources = []
    for k, sample in enumerate(generate(4, 512, seed=0)):
        path = folder / f"source_{k}.png"
        PILImage.fromarray(sample.image).save(path)
        sources.append(path)
    links = folder / "images"
    links.mkdir()
    paths = []
    for i in range(n):
        path = links / f"img_{i:06d}.png"
        os.symlink(sources[i % len(sources)], path)
        paths.append(path)
    url = f"sqlite:///{folder / 'bench.db'}"
    with make_sessionmaker(init_db(url)).begin() as session:
        fill_scale_store(session, n, paths)
        create_user(session, ANNOTATOR, "annotator", password=new_password(), must_change_password=False)
    return url


def _run_page(page: str, image_id: int) -> float:
    at = AppTest.from_file(str(MAIN), default_timeout=120)
    with make_sessionmaker(init_db()).begin() as session:  # logged in, as after the login form
        at.session_state[TOKEN_KEY], _ = open_session(session, ANNOTATOR)
    at.session_state["annotate_image_id"] = image_id
    at.session_state["annotate_action"] = SuggestedAction.DRAW_BOXES.value
    at.switch_page(f"views/{page}.py")
    start = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(f"page {page} failed: {at.exception[0].value}")
    return seconds


def main(argv: Sequence[str] = ()) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="oxnet-bench ui", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="image rows in the store (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="cold and warm runs per page; the median is reported")
    args = parser.parse_args(list(argv))
    with tempfile.TemporaryDirectory(prefix="oxnet-ui-bench-") as tmp:
        start = time.perf_counter()
        url = _build(Path(tmp), args.images)
        build_s = time.perf_counter() - start
        os.environ[DB_URL_ENV] = url
        os.environ["OXNET_DEMO"] = "0"
        with make_sessionmaker(init_db(url))() as session:
            image_id = queue(session, SuggestedAction.DRAW_BOXES, annotator=ANNOTATOR, limit=1)[0].image_id
        for page in PAGES:  # imports, engine, first connection
            _run_page(page, image_id)
        cold: dict[str, float] = {}
        warm: dict[str, float] = {}
        for page in PAGES:
            cold_runs, warm_runs = [], []
            for _ in range(args.repeat):
                st.cache_data.clear()
                cold_runs.append(_run_page(page, image_id))
                warm_runs.append(_run_page(page, image_id))
            cold[page] = round(sorted(cold_runs)[len(cold_runs) // 2], 4)
            warm[page] = round(sorted(warm_runs)[len(warm_runs) // 2], 4)
    return {
        "benchmark": "ui",
        "images": args.images,
        "page_s_cold": cold,
        "page_s_warm": warm,
        "max_page_s": max(cold.values()),
        "build_store_s": round(build_s, 2),
"machine": describe(),
        "notes": "AppTest script-run time per page (server side, no browser), median of --repeat runs; cold = "
                 "st.cache_data cleared before the run, warm = right after",
    }
