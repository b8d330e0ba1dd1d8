"""Data: import (folder, COCO, NIH, VinDr, a DICOMweb archive) and export as background jobs with progress, upload a few images."""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import streamlit as st

from app.jobs import list_jobs, start_job
from app.store import sessions, store_url
from app.widgets import show_job
from db.demo import data_dir
from db.imaging import probe_image
from db.importers import import_folder

#: More files than this go through a folder import (a background job), not the upload box.
MAX_UPLOAD_FILES = 20
UPLOAD_TYPES = ["png", "jpg", "jpeg", "dcm", "dicom"]
ASSIGN = "keep the file's splits, assign the rest by patient (80/10/10)"
KEEP = "keep the file's splits, assign none"


def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not p or not Path(p).expanduser().exists()]


def _launch(command: str, args: list[str], paths: list[str]) -> None:
    missing = _missing(paths)
    if missing:
        st.error("Not found on the server: " + ", ".join(f"`{p or '(empty)'}`" for p in missing))
        return
    start_job(command, args, url=url)
    st.toast("Started; progress below.")


st.title("Data")
url = store_url()
tab_import, tab_upload, tab_export = st.tabs(["Import", "Upload images", "Export"])

with tab_import:
    st.caption("Images are referenced where they are (paths on the server), never copied. Each import is one "
               "transaction: if it stops half-way nothing of it is stored; bad items are listed with the reason.")
    kind = st.radio("Source", ["folder", "COCO", "NIH", "VinDr", "DICOMweb archive"], horizontal=True, key="data_kind")
    split = st.selectbox("Split", [ASSIGN, KEEP, "train", "val", "test"], key="data_split",
                         help="the trainer learns from train and reports on the fully labelled val split")
    salt = st.text_input("Pseudonymise patient ids with this salt (optional)", type="password", key="data_salt")
    extra = {ASSIGN: ["--assign-splits"], KEEP: []}.get(split, ["--split", split]) + (["--pseudonymize-salt", salt] if salt else [])
    with st.form("data_import_form"):
        if kind == "folder":
            folder = st.text_input("Folder (every PNG, JPEG and DICOM under it, unlabeled)")
            args, paths = ["folder", folder, *extra], [folder]
        elif kind == "COCO":
            file = st.text_input("COCO JSON file (boxes, image_labels, granularity)")
            images = st.text_input("Image folder the file names are relative to (default: the JSON's folder)")
            args, paths = ["coco", file, *(["--images", images] if images else []), *extra], [file] + ([images] if images else [])
        elif kind == "NIH":
            entries = st.text_input("Data_Entry_2017*.csv (several: separate with ;)")
            folders = st.text_input("Image folders (images_001 ...; separate with ;)")
            bbox = st.text_input("BBox_List_2017.csv (optional)")
            entry_list = [p.strip() for p in entries.split(";") if p.strip()] or [""]
            folder_list = [p.strip() for p in folders.split(";") if p.strip()] or [""]
            args = ["nih", *entry_list, "--images", *folder_list, *(["--bbox", bbox] if bbox else []), *extra]
            paths = entry_list + folder_list + ([bbox] if bbox else [])
        elif kind == "DICOMweb archive":
            st.caption("Searches with QIDO-RS and retrieves each new instance once with WADO-RS into "
                       f"`{data_dir(url) / 'dicomweb'}`. Credentials: the server's OXNET_DICOMWEB_USER and "
                       "OXNET_DICOMWEB_PASSWORD, or its netrc file (OXNET_DICOMWEB_NETRC, mode 600).")
            archive = st.text_input("DICOMweb URL", placeholder="http://127.0.0.1:8042/dicom-web")
            studies = st.text_input("Study Instance UIDs (optional; separate with ;)")
            c1, c2 = st.columns(2)
            modality = c1.text_input("Modalities", value="CR,DX")
            since = c2.date_input("Studies since (optional)", value=None)
            study_list = [u.strip() for u in studies.split(";") if u.strip()]
            args = ["dicomweb", archive.strip(), *(["--study", *study_list] if study_list else []), "--modality", modality,
                    *(["--since", since.isoformat()] if since else []), *extra]
            paths = []
        else:
            csv = st.text_input("VinDr-CXR train.csv")
            images = st.text_input("Folder with <image_id>.dicom files")
            args, paths = ["vindr", csv, "--images", images, *extra], [csv, images]
        if st.form_submit_button("Start import", type="primary"):
            if kind == "DICOMweb archive" and not args[1].startswith(("http://", "https://")):
                st.error("Give the archive's DICOMweb URL (http:// or https://).")
            else:
                _launch("import", args, paths)

with tab_upload:
    st.caption(f"For a handful of files (at most {MAX_UPLOAD_FILES}); they are copied into `{data_dir(url) / 'uploads'}` "
               "and imported unlabeled. Larger sets: import their folder.")
    files = st.file_uploader("Images", type=UPLOAD_TYPES, accept_multiple_files=True, key="data_upload")
    if files and st.button("Import uploaded files", key="data_upload_go", type="primary"):
        if len(files) > MAX_UPLOAD_FILES:
            st.error(f"{len(files)} files: at most {MAX_UPLOAD_FILES} here. Put them in a folder and use Import.")
        else:
            rejected = []
            target = data_dir(url) / "uploads" / time.strftime("%Y%m%d-%H%M%S")
            with tempfile.TemporaryDirectory() as tmp:
                accepted = []
                for f in files:
                    path = Path(tmp) / Path(f.name).name
                    path.write_bytes(f.getvalue())
                    try:
                        probe_image(path, verify=True)
                        accepted.append(path)
                    except ValueError as e:
                        rejected.append((f.name, str(e).removeprefix(f"{path}: ")))
                if accepted:
                    target.mkdir(parents=True, exist_ok=True)
                    for path in accepted:
                        shutil.move(path, target / path.name)
            for name, reason in rejected:
                st.error(f"`{name}` is not an image we can read ({reason}); it was not imported.")
            if accepted:
                with sessions().begin() as session:
                    report = import_folder(session, target)
                st.success(f"Imported {len(report.imported)}, skipped {len(report.skipped)} (already in the store).")
                if report.errors:
                    st.error(report.summary())

with tab_export:
    st.caption("A COCO JSON with boxes of full images and image-level labels of all. Patient ids are left out "
               "unless you ask for them.")
    with st.form("data_export_form"):
        c1, c2 = st.columns(2)
        granularity = c1.selectbox("Granularity", ["all", "full", "weak", "unlabeled"])
        export_split = c2.selectbox("Split", ["all", "train", "val", "test"])
        root = st.text_input("Write file names relative to this folder (optional)")
        with_ids = st.checkbox("Include patient ids (identifying)")
        if st.form_submit_button("Export"):
            out = data_dir(url) / "exports" / f"{time.strftime('%Y%m%d-%H%M%S')}-{granularity}-{export_split}.json"
            args = [str(out), "--granularity", granularity, *([] if export_split == "all" else ["--split", export_split]),
                    *(["--images-root", root] if root else []), *(["--with-patient-ids"] if with_ids else [])]
            _launch("export", args, [root] if root else [])

st.subheader("Jobs")


@st.fragment(run_every=timedelta(seconds=1))
def _jobs() -> None:
    jobs = list_jobs(url, limit=8)
    if not jobs:
        st.caption("No jobs yet.")
    for job in jobs:
        title = f"{job['command']} {' '.join(job.get('args', [])[:2])}".strip()
        show_job(job, title)
        result = job.get("result") or {}
        if job["status"] == "done" and result.get("errors"):
            with st.expander(f"{len(result['errors'])} items not imported"):
                st.dataframe([{"item": i, "reason": r} for i, r in result["errors"]], width="stretch")
        out = result.get("out")
        if job["status"] == "done" and out and Path(out).is_file():
            st.download_button("Download " + Path(out).name, Path(out).read_bytes, file_name=Path(out).name,
                               mime="application/json", key=f"data_download_{job['id']}")


_jobs()
