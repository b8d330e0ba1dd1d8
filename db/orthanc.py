"""A local Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for tests and the DICOMweb benchmark.

:func:`run_orthanc` writes a config (its own ports and storage folder, authentication on, remote access
off, so it listens for 127.0.0.1 only), starts ``Orthanc``, waits until ``/system`` answers and stops it
afterwards. :func:`make_cxr` writes a CR or DX DICOM file from a PNG (MONOCHROME1 or 2, 8 or 16 bit,
with a window), the kind of file an archive holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import requests
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

ORTHANC = "/usr/sbin/Orthanc"
PLUGINS = "/usr/share/orthanc/plugins"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def orthanc_missing() -> str | None:
    """Why a local Orthanc cannot run here (None when it can)."""
    if not Path(ORTHANC).is_file():
        return f"{ORTHANC} is missing (apt-get install -y orthanc orthanc-dicomweb)"
    if not any(Path(PLUGINS).glob("libOrthancDicomWeb*")):
        return f"the DICOMweb plugin is missing in {PLUGINS} (apt-get install -y orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc: its REST root, DICOMweb root, credentials and process."""

    url: str
    dicomweb: str
    user: str
    password: str
    config: Path
    process: subprocess.Popen | None = None

    def upload(self, path: str | Path) -> dict:
        """``POST /instances`` one DICOM file; returns Orthanc's answer."""
        answer = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), auth=(self.user, self.password), timeout=30)
        answer.raise_for_status()
        return answer.json()

    def delete_instance(self, sop_uid: str) -> None:
        """Remove the instance with this SOP Instance UID from the server."""
        auth = (self.user, self.password)
        found = requests.post(f"{self.url}/tools/lookup", data=sop_uid, auth=auth, timeout=30)
        found.raise_for_status()
        for match in found.json():
            if match["Type"] == "Instance":
                requests.delete(f"{self.url}/instances/{match['ID']}", auth=auth, timeout=30).raise_for_status()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s); its storage stays for :meth:`start`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def start(self, timeout: float = 30.0) -> None:
        """(Re)start the server with its config and wait until ``/system`` answers."""
        if self.process is not None and self.process.poll() is None:
            return
        log = open(self.config.parent / "orthanc.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.config.parent / 'orthanc.log'}")
            try:
                if requests.get(f"{self.url}/system", auth=(self.user, self.password), timeout=2).ok:
                    return
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s; see {self.config.parent / 'orthanc.log'}")


@contextlib.contextmanager
def run_orthanc(folder: str | Path, *, user: str = "oxnet", password: str | None = None,
                http_port: int | None = None, dicom_port: int | None = None) -> Iterator[Orthanc]:
    """Start a private Orthanc with DICOMweb under ``folder`` and stop it on exit."""
    reason = orthanc_missing()
    if reason:
        raise RuntimeError(reason)
    folder = Path(folder)
    (folder / "storage").mkdir(parents=True, exist_ok=True)
    password = password or os.urandom(12).hex()
    http_port = http_port or free_port()
    dicom_port = dicom_port or free_port()
    config = {
        "Name": "oxnet-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port, "DicomPort": dicom_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {user: password}, "Plugins": [PLUGINS],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpCompressionEnabled": False,
        "StorageCompression": False, "ConcurrentJobs": 1, "LogExportedResources": False,
    }
    path = folder / "orthanc.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the password
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    server = Orthanc(url=f"http://127.0.0.1:{http_port}", dicomweb=f"http://127.0.0.1:{http_port}/dicom-web",
                     user=user, password=password, config=path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder / "storage", ignore_errors=True)


def make_cxr(
    png: str | Path,
    path: str | Path,
    *,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    size: int = 128,
    patient_id: str = "P1",
    patient_name: str = "Doe^Jane",
    study_uid: str | None = None,
    series_uid: str | None = None,
    view: str = "PA",
    window: tuple[float, float] | None = None,
    study_date: str = "20260101",
) -> Dataset:
    """Write a chest X-ray DICOM file made from ``png`` (resized to ``size``) and return its dataset.

    16-bit files store 12 bits (0..4095); MONOCHROME1 stores the inverted values (bone dark in the
    stored data, bright once displayed). ``window`` (center, width) goes into the header when given.
    """
    with PILImage.open(png) as image:
        pixels = np.asarray(image.convert("L").resize((size, size)), dtype=np.float64) / 255.0
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    stored_bits = 8 if bits == 8 else 12
    values = np.rint(pixels * (2**stored_bits - 1)).astype(np.uint8 if bits == 8 else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CR_STORAGE if modality == "CR" else DX_STORAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, patient_name
    ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = "19700101", "F", "ACC123"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName = study_date, "120000", "1", "Ref^Doc"
    ds.SeriesNumber, ds.InstanceNumber, ds.ViewPosition = 1, 1, view
    ds.Manufacturer = "test"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored_bits, stored_bits - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = values.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return ds
