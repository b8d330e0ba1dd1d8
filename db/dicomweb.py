"""Images from a DICOM archive over DICOMweb, and results back to it as DICOM Structured Reports.

Import (:func:`import_dicomweb`): QIDO-RS finds the studies (``--since``: StudyDate from that day),
their series of the wanted modalities (CR, DX) and their instances; WADO-RS retrieves each instance
once, as stored (no transcoding), into ``<data dir>/dicomweb/<StudyUID>/<SOPInstanceUID>.dcm`` (folder
mode 0700, files 0600). The cached file is read, hashed and decoded like any imported DICOM file and
written through the shared import path (:mod:`db.importers`): the image row keeps size, bit depth,
photometric interpretation, view and the pseudonymised patient id; :class:`db.models.DicomInstance`
keeps the Study/Series/SOP Instance UIDs, SOP class, modality, transfer syntax and the header's window.
No names, birth dates, accession numbers or other identifying text enter the store. Instances already
in the store are not fetched again; a cached file from an import that did not finish is reused.

Credentials come from the environment (``OXNET_DICOMWEB_USER`` / ``OXNET_DICOMWEB_PASSWORD``) or from a
netrc file readable by its owner only (``OXNET_DICOMWEB_NETRC``, default ``~/.netrc``), never from the
command line; a URL with ``user:password@`` in it is refused. Reports and errors show the URL without
credentials.

Export (:func:`export_sr`): per DICOM image, one TID 1500 measurement report (``highdicom``): every box a
planar ROI (a closed SCOORD polyline in the image's pixel coordinates) referencing the source instance,
the image-level findings as qualitative evaluations (present / absent). A model version's detections go
in a report whose observer is the device "OXnet workbench" and whose every group carries the algorithm
identification (name, package version, model version id); box scores and image-level probabilities are
measurements. :func:`store_sr` sends them back with STOW-RS.
"""

from __future__ import annotations

import netrc
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from dataclasses import dataclass, field
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pydicom
import pydicom.errors
import requests
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from db.imaging import DICOM_DECODERS_HINT, MAX_PIXELS, is_dicom
from db.importers.write import ImportItem, ImportReport, Progress, each, parse_split, probed_item, report_summary, write_items
from db.models import Annotator, Box, DicomInstance, Image, ImageLabel, LabelClass, ModelVersion, Prediction, Project
from db.projects import DEFAULT_PROJECT, get_project
from oxnet.classes import NO_FINDING
from oxnet.files import atomic_write

if TYPE_CHECKING:  # dicomweb-client and highdicom take seconds to import: only the commands that use them do
    from dicomweb_client.api import DICOMwebClient

USER_ENV = "OXNET_DICOMWEB_USER"
PASSWORD_ENV = "OXNET_DICOMWEB_PASSWORD"
NETRC_ENV = "OXNET_DICOMWEB_NETRC"
#: Modalities imported unless told otherwise (computed and digital radiography).
DEFAULT_MODALITIES = ("CR", "DX")
#: Name of the cache folder inside the store's data folder.
CACHE_DIR_NAME = "dicomweb"
#: Seconds to wait for the archive to answer one request.
TIMEOUT_S = 30.0
#: Extra tries of a request the archive answered "busy" (or did not answer at all).
RETRIES = 2
#: The name DICOM readers see as the author of model output.
ALGORITHM_NAME = "OXnet workbench"
#: Private coding scheme of the workbench's finding classes (class name = code meaning).
CODING_SCHEME = "99OXNET"


class ArchiveError(RuntimeError):
    """The archive cannot be used at all (down, refused the credentials, answered with an error)."""


def safe_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for reports and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def credentials(url: str, environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) for ``url``: from ``OXNET_DICOMWEB_USER``/``_PASSWORD``, else the netrc file.

    Raises:
        ValueError: credentials written into the URL, only one of the two variables set, or a netrc
            file that others can read (it must be ``chmod 600``) or that cannot be parsed.
    """
    environ = os.environ if environ is None else environ
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValueError(f"{safe_url(url)}: do not put credentials in the URL (they would show in process lists "
                         f"and logs); set {USER_ENV} and {PASSWORD_ENV} or use a netrc file ({NETRC_ENV})")
    user, password = environ.get(USER_ENV), environ.get(PASSWORD_ENV)
    if user or password:
        if not (user and password):
            raise ValueError(f"set both {USER_ENV} and {PASSWORD_ENV} (only one is set)")
        return user, password
    path = Path(environ[NETRC_ENV]).expanduser() if environ.get(NETRC_ENV) else Path.home() / ".netrc"
    if not path.is_file():
        if environ.get(NETRC_ENV):
            raise ValueError(f"{path}: netrc file ({NETRC_ENV}) not found")
        return None
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path}: the credentials file is readable by others (mode {stat.filemode(mode)}); run chmod 600 {path}")
    try:
        entry = netrc.netrc(path).authenticators(parts.hostname or "")
    except (netrc.NetrcParseError, OSError) as e:
        raise ValueError(f"{path}: cannot read the netrc file ({e.msg if hasattr(e, 'msg') else e})") from None
    return None if entry is None else (entry[0], entry[2])


def connect(url: str, *, auth: tuple[str, str] | None = None, timeout: float = TIMEOUT_S) -> DICOMwebClient:
    """A DICOMweb client for ``url`` (the service root, e.g. ``http://127.0.0.1:8042/dicom-web``).

    ``auth`` defaults to :func:`credentials`; HTTP basic authentication.
    """
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = auth if auth is not None else credentials(url)
    session.trust_env = False  # no proxy from the environment: patient data goes to the archive only
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout)
    # a busy archive (429, 503, 504) gets 2 more tries after 0.5 s and 1 s; one that is down fails in ~2 s
    client.set_http_retry_params(max_attempts=RETRIES + 1, wait_exponential_multiplier=250)
    return client


def _archive_call(url: str, what: str, call: Callable[[], Any]) -> Any:
    """Run one DICOMweb request; map transport and HTTP failures to :class:`ArchiveError`."""
    try:
        return call()
    except requests.exceptions.HTTPError as e:
        code = e.response.status_code if e.response is not None else None
        if code in (401, 403):
            raise ArchiveError(f"{safe_url(url)} refused the credentials (HTTP {code}) while {what}: set "
                               f"{USER_ENV} and {PASSWORD_ENV}, or a netrc file ({NETRC_ENV})") from None
        raise ArchiveError(f"{safe_url(url)} answered HTTP {code} while {what}") from None
    except requests.exceptions.Timeout:
        raise ArchiveError(f"{safe_url(url)} did not answer within the time limit while {what}") from None
    except requests.exceptions.ConnectionError:
        raise ArchiveError(f"cannot reach the archive at {safe_url(url)} while {what} (is it running?)") from None
    except requests.exceptions.RequestException as e:
        raise ArchiveError(f"{safe_url(url)}: {type(e).__name__} while {what}") from None


def _value(item: Mapping[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute (None when absent)."""
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


@dataclass(frozen=True)
class _Found:
    study: str
    series: str
    sop: str
    modality: str


def _find(client: DICOMwebClient, url: str, studies: Sequence[str], modalities: Sequence[str],
          since: date | None, report: ImportReport) -> list[_Found]:
    """The instances to import; studies named in ``studies`` without a wanted series are errors."""
    wanted = {m.upper() for m in modalities}
    if studies:
        study_uids = list(dict.fromkeys(studies))
        for uid in study_uids:
            found = _archive_call(url, f"searching study {uid}",
                                  partial(client.search_for_studies, search_filters={"StudyInstanceUID": uid}))
            if not found:
                raise ValueError(f"study {uid}: not in the archive at {safe_url(url)}")
    else:
        filters = {"StudyDate": f"{since:%Y%m%d}-"} if since else {}
        found = _archive_call(url, "searching studies", lambda: client.search_for_studies(search_filters=filters, get_remaining=True))
        study_uids = [_value(s, "0020000D") for s in found]
    instances: list[_Found] = []
    for study in study_uids:
        series = _archive_call(url, f"searching the series of study {study}",
                               partial(client.search_for_series, study, get_remaining=True))
        kept = [(_value(s, "0020000E"), str(_value(s, "00080060") or "").upper()) for s in series]
        images = [(uid, modality) for uid, modality in kept if modality in wanted]
        if not images:
            reason = f"no {'/'.join(sorted(wanted))} image series (series: {sorted({m or '?' for _, m in kept}) or 'none'})"
            if studies:
                report.errors.append((f"study {study}", reason))
            else:
                report.skipped.append((f"study {study}", reason))
            continue
        for series_uid, modality in images:
            found = _archive_call(url, f"searching the instances of series {series_uid}",
                                  partial(client.search_for_instances, study, series_uid, get_remaining=True))
            instances += [_Found(study, series_uid, _value(i, "00080018"), modality) for i in found]
    return instances


def _save(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file atomically (temp file + rename), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_write(path, binary=True, private=True) as f:
        ds.save_as(f, enforce_file_format=True)


def _check_decoder(ds: Dataset) -> None:
    """ValueError naming the transfer syntax when no installed package can decode the pixel data."""
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        raise ValueError(f"pixel data is compressed ({syntax.name}, {syntax}) and pydicom has no decoder for it; "
                         "have the archive send it uncompressed or in a JPEG syntax") from None
    if not available:
        raise ValueError(f"pixel data is compressed ({syntax.name}) and no installed decoder handles it; "
                         f"install one with: {DICOM_DECODERS_HINT}")


def _window(ds: Dataset) -> tuple[float | None, float | None]:
    values = []
    for keyword in ("WindowCenter", "WindowWidth"):
        value = ds.get(keyword)
        if isinstance(value, pydicom.multival.MultiValue):
            value = value[0] if value else None
        values.append(None if value is None or value == "" else float(value))
    return values[0], values[1]


def import_dicomweb(
    session: Session,
    url: str,
    *,
    cache_dir: str | Path,
    studies: Sequence[str] = (),
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    since: date | str | None = None,
    project: str = DEFAULT_PROJECT,
    annotator: str = "import:dicomweb",
    split: str | None = None,
    patient_salt: str | None = None,
    max_pixels: int = MAX_PIXELS,
    progress: Progress | None = None,
    client: DICOMwebClient | None = None,
) -> ImportReport:
    """Import the CR/DX instances of a DICOMweb archive as unlabeled images (see the module docstring).

    Args:
        url: the DICOMweb service root.
        cache_dir: where retrieved files are kept (``<data dir>/dicomweb``).
        studies: only these Study Instance UIDs (each must exist and hold an image series).
        modalities: series modalities to import.
        since: only studies with a StudyDate on or after this day (``YYYY-MM-DD``).
        client: a ready client (default: :func:`connect` with :func:`credentials`).

    Returns:
        The report: imported ``<StudyUID>/<SOPInstanceUID>`` items, skipped ones (already in the
        store) and errors. When the archive cannot be used (down, HTTP 401, an error answer) the
        report holds that one error and nothing is written.
    """
    report = ImportReport()
    where = safe_url(url)
    try:
        split_ = parse_split(split, "split")
        if isinstance(since, str):
            try:
                since = date.fromisoformat(since)
            except ValueError:
                raise ValueError(f"since: expected a date YYYY-MM-DD, got {since!r}") from None
        client = client or connect(url)
        found = _find(client, url, studies, modalities, since, report)
    except (ArchiveError, ValueError) as e:
        report.errors.append((where, str(e)))
        return report
    if report.errors:
        return report

    cache = Path(cache_dir).expanduser().resolve()
    project_id = get_project_id(session, project)
    known = dict(session.execute(
        select(DicomInstance.sop_uid, Image.id).join(Image, Image.id == DicomInstance.image_id).where(Image.project_id == project_id)
    ).all())
    items: list[ImportItem] = []
    meta: dict[str, dict[str, Any]] = {}
    for instance in each(found, progress):
        name = f"{instance.study}/{instance.sop}"
        if instance.sop in known:
            report.skipped.append((name, f"already in the store (image {known[instance.sop]})"))
            continue
        path = cache / instance.study / f"{instance.sop}.dcm"
        try:
            if not path.is_file():
                ds = _archive_call(url, f"retrieving {name}", partial(
                    client.retrieve_instance, instance.study, instance.series, instance.sop, media_types=(("application/dicom", "*"),)))
                _save(ds, path)
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except (pydicom.errors.InvalidDicomError, EOFError) as e:
                raise ValueError(f"the archive sent no readable DICOM file ({e})") from None
            _check_decoder(header)
            item = probed_item(name, path, source="dicomweb", split=split_, patient_salt=patient_salt, max_pixels=max_pixels)
            if str(header.get("SOPInstanceUID", "")) != instance.sop:
                raise ValueError(f"the archive sent instance {header.get('SOPInstanceUID')!r} for {instance.sop}")
        except ArchiveError as e:
            report.errors.append((where, str(e)))
            report.imported.clear()
            return report  # the archive went away: nothing of this import is written
        except OSError as e:
            report.errors.append((name, f"cannot write the cache file {path} ({e.strerror or e})"))
            continue
        except ValueError as e:
            path.unlink(missing_ok=True)  # not in the store: the cache keeps only what was imported
            report.errors.append((name, str(e).removeprefix(f"{path}: ")))
            continue
        items.append(item)
        center, width = _window(header)
        meta[str(path)] = {
            "study_uid": instance.study, "series_uid": instance.series, "sop_uid": instance.sop,
            "sop_class_uid": str(header.get("SOPClassUID", "")), "modality": instance.modality,
            "transfer_syntax": str(header.file_meta.get("TransferSyntaxUID", "")) or None,
            "window_center": center, "window_width": width, "archive": where,
        }
    write_items(session, project, None, items, annotator, report)
    project_id = get_project_id(session, project)
    paths = list(meta)
    for chunk in (paths[i : i + 10_000] for i in range(0, len(paths), 10_000)):  # under SQLite's variable limit
        rows = session.execute(select(Image.id, Image.path).where(Image.project_id == project_id, Image.path.in_(chunk))).all()
        have = set(session.scalars(select(DicomInstance.image_id).where(DicomInstance.image_id.in_([r[0] for r in rows]))))
        new = [{"image_id": image_id, **meta[path]} for image_id, path in rows if image_id not in have]
        if new:
            session.execute(cast(Table, DicomInstance.__table__).insert(), new)
    return report


def get_project_id(session: Session, project: str) -> int | None:
    """The id of ``project`` (None when it does not exist yet)."""
    return session.scalar(select(Project.id).where(Project.name == project))


# --- export as DICOM SR ---------------------------------------------------------------------------


@dataclass
class SRReport:
    """What an SR export did: files written, images skipped (with the reason), instances stored."""

    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)

    def summary(self, limit: int = 20) -> str:
        head = f"wrote {len(self.written)} SR files, stored {len(self.stored)}, skipped {len(self.skipped)}, errors {len(self.errors)}"
        return report_summary(head, self.skipped, self.errors, limit)

    def as_dict(self) -> dict[str, Any]:
        return {"written": self.written, "stored": self.stored, "skipped": [list(s) for s in self.skipped],
                "errors": [list(e) for e in self.errors]}


def _package_version() -> str:
    try:
        return version("oxnet-workbench")
    except PackageNotFoundError:
        return "unknown"


def finding_code(name: str):
    """The coded concept of a finding class in the workbench's private coding scheme."""
    import highdicom as hd

    return hd.sr.CodedConcept(value=name.replace(" ", "_")[:16], scheme_designator=CODING_SCHEME, meaning=name[:64])


def _person_name(name: str) -> str:
    """A login name as a DICOM person name (one component: family name only, so a trailing caret)."""
    name = name.replace("\\", " ")[:63]
    return name if "^" in name else f"{name}^"


def _rectangle(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    """A closed polyline around the box: 5 (column, row) points, the first repeated last."""
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float32)


def _build_sr(
    source: Dataset,
    *,
    boxes: Sequence[tuple[str, float, float, float, float, float | None]],
    findings: Mapping[str, bool],
    no_finding: bool,
    observer: str | None,
    model: ModelVersion | None,
    probabilities: Mapping[str, float],
    uid_parts: Sequence[str],
    with_patient_ids: bool,
    pseudonym: str | None,
) -> Dataset:
    import highdicom as hd

    ucum_one = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    score_name = hd.sr.CodedConcept(value="score", scheme_designator=CODING_SCHEME, meaning="Detection score")
    probability_name = hd.sr.CodedConcept(value="probability", scheme_designator=CODING_SCHEME, meaning="Image-level probability")
    algorithm = None
    if model is not None:
        algorithm = hd.sr.AlgorithmIdentification(
            name=ALGORITHM_NAME, version=_package_version(),
            parameters=[f"model version {model.id}", f"round {model.round}"],
        )
        device = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(entropy_srcs=[ALGORITHM_NAME, str(model.id)]), name=ALGORITHM_NAME,
                model_name=f"model version {model.id}", manufacturer_name=ALGORITHM_NAME,
            ),
        )
        context = hd.sr.ObservationContext(observer_device_context=device)
    else:
        person = hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=_person_name(observer or "Unknown")),
        )
        context = hd.sr.ObservationContext(observer_person_context=person)
    groups: list[Any] = []
    for n, (name, x1, y1, x2, y2, score) in enumerate(boxes, 1):
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=_rectangle(x1, y1, x2, y2),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source),
        )
        measurements = None
        if score is not None:
            measurements = [hd.sr.Measurement(name=score_name, value=float(score), unit=ucum_one, algorithm_id=algorithm)]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[*uid_parts, "box", str(n)]), identifier=f"box {n}"),
            referenced_region=region, finding_type=finding_code(name), algorithm_id=algorithm, measurements=measurements,
        ))
    evaluations = [hd.sr.QualitativeEvaluation(name=finding_code(name), value=codes.SCT.Present if present else codes.SCT.Absent)
                   for name, present in findings.items()]
    if no_finding:
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=finding_code(NO_FINDING)))
    for class_name, p in sorted(probabilities.items()):
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[*uid_parts, "prob", class_name]),
                                                         identifier=f"image-level {class_name}"[:64]),
            finding_type=finding_code(class_name), algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=probability_name, value=float(p), unit=ucum_one, algorithm_id=algorithm)],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        ))
    if evaluations:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[*uid_parts, "findings"]),
                                                         identifier="image-level findings"),
            finding_type=codes.DCM.Finding, algorithm_id=algorithm, qualitative_evaluations=evaluations,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        ))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups,
    )
    title = f"OXnet model version {model.id}" if model is not None else "OXnet annotations"
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source], content=report,
        series_instance_uid=generate_uid(entropy_srcs=[str(source.StudyInstanceUID), title]),
        series_number=9000 + (model.id if model is not None else 0) % 900, series_description=title,
        sop_instance_uid=generate_uid(entropy_srcs=list(uid_parts)), instance_number=1,
        manufacturer=ALGORITHM_NAME, is_complete=True,
    )
    if not with_patient_ids:
        for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
            if keyword in sr:
                setattr(sr, keyword, "")
        sr.PatientID = pseudonym or ""
    return sr


def export_sr(
    session: Session,
    out_dir: str | Path,
    *,
    project: str = DEFAULT_PROJECT,
    model_version: int | None = None,
    image_ids: Iterable[int] | None = None,
    with_patient_ids: bool = False,
) -> tuple[SRReport, list[Dataset]]:
    """Write one DICOM SR per DICOM image that has annotations (or, with ``model_version``, detections).

    Without ``model_version``: the radiologists' boxes and image-level findings. With it: that model
    version's stored predictions (boxes with scores, image-level probabilities), marked as model output.
    Files are ``<out_dir>/<image id>-annotations.dcm`` or ``<image id>-model<N>.dcm``; UIDs are derived
    from the image, its annotation version and the model version, so exporting the same state again
    gives the same instances. The source's patient name, birth date, sex and accession number are left
    out and the patient id is the store's (pseudonym) unless ``with_patient_ids``; storing back into the
    archive needs them (the report must join the source study's patient).

    Returns:
        The report and the SR datasets written.
    """
    report = SRReport()
    project_ = get_project(session, project)
    model = None
    if model_version is not None:
        model = session.get(ModelVersion, model_version)
        if model is None or model.project_id != project_.id:
            raise ValueError(f"model version {model_version}: not a model version of project {project!r}")
    class_names = dict(session.execute(select(LabelClass.id, LabelClass.name).where(LabelClass.project_id == project_.id)).all())
    query = select(Image).where(Image.project_id == project_.id)
    if image_ids is not None:
        query = query.where(Image.id.in_(list(image_ids)))
    images = list(session.scalars(query.order_by(Image.id)))
    ids = [i.id for i in images]
    boxes: dict[int, list[tuple]] = defaultdict(list)
    labels: dict[int, dict[str, bool]] = defaultdict(dict)
    observers: dict[int, set[str]] = defaultdict(set)
    predictions: dict[int, Prediction] = {}
    if model is None:
        for box, who in session.execute(select(Box, Annotator.name).join(Annotator, Annotator.id == Box.annotator_id)
                                        .where(Box.image_id.in_(ids)).order_by(Box.id)):
            boxes[box.image_id].append((class_names[box.class_id], box.x1, box.y1, box.x2, box.y2, None))
            observers[box.image_id].add(who)
        for label, who in session.execute(select(ImageLabel, Annotator.name).join(Annotator, Annotator.id == ImageLabel.annotator_id)
                                          .where(ImageLabel.image_id.in_(ids))):
            labels[label.image_id][class_names[label.class_id]] = label.present
            observers[label.image_id].add(who)
    else:
        for prediction in session.scalars(select(Prediction).where(Prediction.model_version_id == model.id, Prediction.image_id.in_(ids))):
            predictions[prediction.image_id] = prediction
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    written: list[Dataset] = []
    for image in images:
        name = f"image {image.id}"
        if model is None:
            content = bool(boxes[image.id] or labels[image.id] or image.no_finding)
        else:
            content = image.id in predictions
        if not content:
            continue
        try:
            with open(image.path, "rb") as f:
                head = f.read(132)
            if not is_dicom(Path(image.path), head):
                report.skipped.append((name, "not a DICOM image (an SR must reference a DICOM instance)"))
                continue
            source = pydicom.dcmread(image.path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as e:
            report.errors.append((name, f"{image.path}: cannot read the source DICOM file ({e})"))
            continue
        if model is None:
            readers = sorted(observers[image.id])
            kwargs: dict[str, Any] = {"boxes": boxes[image.id], "findings": labels[image.id], "no_finding": image.no_finding,
                      "observer": readers[0] if len(readers) == 1 else ("Multiple readers" if readers else None),
                      "probabilities": {}, "uid_parts": [str(source.SOPInstanceUID), "annotations", str(image.version)]}
            file_name = f"{image.id}-annotations.dcm"
        else:
            p = predictions[image.id]
            kwargs = {"boxes": [(b["class"], *b["bbox"], b.get("score")) for b in p.boxes], "findings": {},
                      "no_finding": False, "observer": None, "probabilities": dict(p.image_probs or {}),
                      "uid_parts": [str(source.SOPInstanceUID), "model", str(model.id)]}
            file_name = f"{image.id}-model{model.id}.dcm"
        # the store's patient id is a pseudonym only when the import had a salt; the source's own id stays out
        pseudonym = image.patient_id if image.patient_id != str(source.get("PatientID", "")) else ""
        try:
            sr = _build_sr(source, model=model, with_patient_ids=with_patient_ids, pseudonym=pseudonym, **kwargs)
        except (ValueError, TypeError, AttributeError) as e:
            report.errors.append((name, f"cannot build the SR ({e})"))
            continue
        path = out / file_name
        try:
            _save(sr, path)
        except OSError as e:
            report.errors.append((name, f"cannot write {path} ({e.strerror or e})"))
            continue
        report.written.append(str(path))
        written.append(sr)
    return report, written


def store_sr(url: str, datasets: Sequence[Dataset], report: SRReport, *, client: DICOMwebClient | None = None) -> SRReport:
    """Send ``datasets`` to the archive at ``url`` with STOW-RS; failures become report errors."""
    if not datasets:
        return report
    try:
        client = client or connect(url)
        _archive_call(url, f"storing {len(datasets)} SR instances", lambda: client.store_instances(list(datasets)))
    except (ArchiveError, ValueError) as e:
        report.errors.append((safe_url(url), str(e)))
        return report
    report.stored += [str(ds.SOPInstanceUID) for ds in datasets]
    return report
