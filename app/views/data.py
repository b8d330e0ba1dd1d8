"""Data: import (folder, COCO, NIH, VinDr, a DICOMweb archive) and upload as background jobs with progress and report, export.

Every import, an upload included, is a background job (``app.jobs``); the page only starts it and
shows its progress and report. Finished jobs (and their downloads) are drawn outside the part of the
page that refreshes every second, so a download link stays valid however long the page is open.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import streamlit as st

from app.jobs import list_jobs, start_job
from app.store import annotator, may, sessions, store_url
from app.widgets import show_job
from db.service import SALT_ENV, data_dir, unreadable
from oxnet.vocabulary import GRANULARITIES

#: More files than this go through a folder import, not the upload box.
MAX_UPLOAD_FILES = 20
UPLOAD_TYPES = ["png", "jpg", "jpeg", "dcm", "dicom"]
ASSIGN = "keep the file's splits, assign the rest by patient (80/10/10)"
KEEP = "keep the file's splits, assign none"
#: ``st.session_state`` key: ids of the jobs this page has seen running (a change reruns the whole page).
SEEN_RUNNING_KEY = "data_seen_running"


def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not p or not Path(p).expanduser().exists()]


def _launch(command: str, args: list[str], paths: list[str], secrets: dict[str, str] | None = None) -> None:
    missing = _missing(paths)
    if missing:
        st.error("Not found on the server: " + ", ".join(f"`{p or '(empty)'}`" for p in missing))
        return
    start_job(command, args, url=url, secrets=secrets, actor=annotator())
    st.toast("Started; progress below.")


def _split_and_salt() -> None:
    """The split and salt of new images, for imports and uploads alike."""
    st.selectbox("Split of new images (imports and uploads)", [ASSIGN, KEEP, "train", "val", "test"], key="data_split",
                 help="the trainer learns from train and reports on the fully labelled val split")
    if st.session_state["data_split"] == KEEP:
        st.warning("Images without a split are never trained on, scored or queued. Assign them later with "
                   "`python -m db split` (by patient), or choose another option.")
    elif st.session_state["data_split"] == ASSIGN:
        st.caption("New images without a split in the file are put in train/val/test by patient (80/10/10): "
                   "images of one patient stay in one split.")
    st.text_input("Pseudonymise patient ids with this salt (optional)", type="password", key="data_salt",
                  help="passed to the import job in its environment, never on a command line or in a file; "
                       f"when empty, the server's ${SALT_ENV} applies if it is set")


def _split_args() -> list[str]:
    choice = st.session_state["data_split"]
    return {ASSIGN: ["--assign-splits"], KEEP: []}.get(choice, ["--split", choice])


def _secrets() -> dict[str, str] | None:
    salt = st.session_state.get("data_salt", "")
    return {SALT_ENV: salt} if salt else None


st.title("Data")
url = store_url()
if not may("admin"):  # app/main.py lists this page for admins only; start_job checks the role again
    st.error("Only an admin imports and exports data.")
    st.stop()
tab_import, tab_upload, tab_export = st.tabs(["Import", "Upload images", "Export"])

with tab_import:
    st.caption("Images are referenced where they are (paths on the server), never copied. Each import is one "
               "transaction: if it stops half-way nothing of it is stored; bad items are listed with the reason.")
    _split_and_salt()
    kind = st.radio("Source", ["folder", "COCO", "NIH", "VinDr", "DICOMweb archive"], horizontal=True, key="data_kind")
    extra = _split_args()
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
                _launch("import", args, paths, _secrets())

with tab_upload:
    st.caption(f"For a handful of files (at most {MAX_UPLOAD_FILES}); they are copied into `{data_dir(url) / 'uploads'}` "
               "and imported unlabeled by the same background import job as a folder, with its report below. "
               "Larger sets: import their folder.")
    st.caption(f"Split of the uploaded images: **{st.session_state['data_split']}** (choose it on the Import tab).")
    files = st.file_uploader("Images", type=UPLOAD_TYPES, accept_multiple_files=True, key="data_upload")
    if files and st.button("Import uploaded files", key="data_upload_go", type="primary"):
        if len(files) > MAX_UPLOAD_FILES:
            st.error(f"{len(files)} files: at most {MAX_UPLOAD_FILES} here. Put them in a folder and use Import.")
        else:
            target = data_dir(url) / "uploads" / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1_000_000:06d}"
            target.mkdir(parents=True, exist_ok=True)
            names: set[str] = set()
            for f in files:
                name = Path(f.name).name or "upload"
                while name in names:  # two uploads of one name: keep both
                    name = f"{len(names)}-{name}"
                names.add(name)
                (target / name).write_bytes(f.getvalue())
            _launch("import", ["folder", str(target), *_split_args()], [str(target)], _secrets())

with tab_export:
    st.caption("A COCO JSON with boxes of full images and image-level labels of all. Patient ids are left out "
               "unless you ask for them.")
    with st.form("data_export_form"):
        c1, c2 = st.columns(2)
        granularity = c1.selectbox("Granularity", ["all", *GRANULARITIES])
        export_split = c2.selectbox("Split", ["all", "train", "val", "test"])
        root = st.text_input("Write file names relative to this folder (optional)")
        with_ids = st.checkbox("Include patient ids and real file names (identifying)",
                               help="without: no patient_id, and file names image-<id>.<ext> (NIH file names encode the patient)")
        with_map = st.checkbox("Also write a separate table: neutral file name -> real path (identifying)")
        if st.form_submit_button("Export"):
            stem = data_dir(url) / "exports" / f"{time.strftime('%Y%m%d-%H%M%S')}-{granularity}-{export_split}"
            args = [f"{stem}.json", "--granularity", granularity, *([] if export_split == "all" else ["--split", export_split]),
                    *(["--images-root", root] if root else []), *(["--include-patient-ids"] if with_ids else []),
                    *(["--file-map", f"{stem}-files.csv"] if with_map and not with_ids else [])]
            _launch("export", args, [root] if root else [])

st.subheader("Jobs")


def _title(job: dict) -> str:
    """``export <file>``, ``import folder <folder>``: the command and the last part of its first paths."""
    args = []
    for arg in job.get("args", [])[:2]:
        if arg.startswith("--"):
            break
        args.append(arg)
    return " ".join([job["command"], *(Path(a).name or a for a in args)])


@st.fragment(run_every=timedelta(seconds=1))
def _running() -> None:
    """The running jobs, refreshed every second; when one of them ends, the whole page reruns once to
    show it with its report and download below (drawn outside this fragment, so they stay valid)."""
    seen = st.session_state.setdefault(SEEN_RUNNING_KEY, set())
    running = [job for job in list_jobs(url, limit=50) if job["status"] == "running"]
    ids = {job["id"] for job in running}
    if seen - ids:
        st.session_state[SEEN_RUNNING_KEY] = ids
        st.rerun(scope="app")
    st.session_state[SEEN_RUNNING_KEY] = seen | ids
    for job in running:
        show_job(job, _title(job))


_running()
finished = [job for job in list_jobs(url, limit=8) if job["status"] != "running"]
if not finished and not st.session_state.get(SEEN_RUNNING_KEY):
    st.caption("No jobs yet.")
for job in finished:
    show_job(job, _title(job))
    result = job.get("result") or {}
    if job["status"] == "done" and result.get("errors"):
        with st.expander(f"{len(result['errors'])} items not imported"):
            st.dataframe([{"item": i, "reason": r} for i, r in result["errors"]], width="stretch")
    for field, mime in (("out", "application/json"), ("file_map", "text/csv")):
        path = Path(result[field]) if result.get(field) else None
        if job["status"] == "done" and path is not None and path.is_file():
            st.download_button(f"Download {path.name}", path.read_bytes(), file_name=path.name, mime=mime,
                               on_click="ignore", key=f"data_download_{field}_{job['id']}")


_bad = unreadable(sessions())
if _bad:
    st.subheader("Files that cannot be read")
    st.caption("Left out of training and exports until fixed; `python -m db check --recheck` reads them again.")
    st.dataframe(_bad, width="stretch", hide_index=True, key="data_unreadable")
