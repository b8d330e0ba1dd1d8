"""Benchmark: import throughput over DICOMweb from a local Orthanc (``python scripts/bench.py dicomweb``).

Starts a private Orthanc (:func:`db.orthanc.run_orthanc`), uploads ``--instances`` CR/DX files made from
the NIH PNGs (or a synthetic image when they are absent), then times :func:`db.dicomweb.import_dicomweb`
into a fresh SQLite store: QIDO searches, WADO retrieval, cache writes, hashing and decoding, and the
store transaction. A second import (nothing new, nothing fetched) is timed too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from db.dicomweb import connect, import_dicomweb
from db.engine import init_db, make_sessionmaker
from db.orthanc import make_cxr, run_orthanc
from oxnet.machine import describe

NIH_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "nih-cxr" / "images"


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="oxnet-bench dicomweb", description=__doc__)
    parser.add_argument("--instances", type=int, default=40, help="instances in the archive (default: %(default)s)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--bits", type=int, choices=[8, 16], default=16, help="bits allocated (default: %(default)s)")
    parser.add_argument("--per-study", type=int, default=2, help="instances per study (default: %(default)s)")
    parser.add_argument("--images", type=Path, default=NIH_IMAGES, help="PNG folder to make the instances from")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pngs = sorted(args.images.glob("*.png"))
        if not pngs:
            synthetic = folder / "synthetic.png"
            PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (args.size, args.size), dtype=np.uint8)).save(synthetic)
            pngs = [synthetic]
        with run_orthanc(folder / "orthanc") as server:
            study = None
            total_bytes = 0
            for n in range(args.instances):
                if n % args.per_study == 0:
                    study = None
                path = folder / "upload.dcm"
                ds = make_cxr(pngs[n % len(pngs)], path, modality="CR" if n % 2 else "DX",
                              photometric="MONOCHROME1" if n % 3 == 0 else "MONOCHROME2", bits=args.bits, size=args.size,
                              patient_id=f"P{n // args.per_study}", study_uid=study)
                study = str(ds.StudyInstanceUID)
                total_bytes += path.stat().st_size
                server.upload(path)
            client = connect(server.dicomweb, auth=(server.user, server.password))
            Session = make_sessionmaker(init_db(f"sqlite:///{folder / 'bench.db'}"))
            start = time.perf_counter()
            with Session.begin() as session:
                report = import_dicomweb(session, server.dicomweb, cache_dir=folder / "cache", client=client)
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            with Session.begin() as session:
                again = import_dicomweb(session, server.dicomweb, cache_dir=folder / "cache", client=client)
            again_s = time.perf_counter() - start
    if report.errors or len(report.imported) != args.instances:
        raise RuntimeError(f"the benchmark import did not import every instance:\n{report.summary()}")
    return {
        "benchmark": "dicomweb import from a local Orthanc (QIDO + WADO-RS + cache + hash/decode + store)",
        "instances": args.instances, "image": f"{args.size}x{args.size}, {args.bits}-bit", "megabytes": round(total_bytes / 1e6, 1),
        "import_s": round(first_s, 3), "instances_per_s": round(args.instances / first_s, 2),
        "megabytes_per_s": round(total_bytes / 1e6 / first_s, 1),
        "reimport_s": round(again_s, 3), "reimport_skipped": len(again.skipped),
        "machine": describe(),
        "note": "Orthanc and the importer share the machine's CPUs; the archive sends files as stored (no transcoding)",
    }
