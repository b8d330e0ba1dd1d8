"""Imports: folder (PNG/JPEG/DICOM), COCO, NIH, VinDr; bad input per item; idempotency; one transaction."""

import importlib.util
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLossless, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import func, select

import db.importers.write
from db.export import export_coco
from db.importers import check_files, import_coco, import_folder, import_nih, import_vindr, pseudonymize
from db.lifecycle import granularity_mismatches, image_state, replay_audit
from db.models import Base, Box, FileStatus, Granularity, Image

NIH_CXR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nih-cxr"


def write_dicom(path, pixels, *, photometric="MONOCHROME2", bits_stored=None, window=None, syntax=ExplicitVRLittleEndian,
                pixel_data=True, patient_id="PID123"):
    """A small DICOM file with identifying text that the store must not keep."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientBirthDate, ds.InstitutionName = "Doe^Jane", "19700101", "St Elsewhere Hospital"
    ds.PatientID, ds.ViewPosition, ds.Modality = patient_id, "PA", "DX"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits_stored or bits, (bits_stored or bits) - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data:
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3corrupt"]) if syntax.is_compressed else pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def png_bomb(path, size=30_000):
    """A real decompression bomb: a 1-bit PNG of size x size zeros, a few kB on disk."""
    row = b"\x00" + b"\x00" * (size // 8)
    compressor, chunks = zlib.compressobj(9), []
    for _ in range(size):
        chunks.append(compressor.compress(row))
    chunks.append(compressor.flush())

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(chunks)) + chunk(b"IEND", b""))
    return path


def png(path, size=(40, 32), value=0):
    PILImage.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    return path


def count(Session, model=Image):
    with Session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_folder_import_good_and_bad_files(db_sessionmaker, tmp_path):
    folder = tmp_path / "xrays"
    (folder / "sub").mkdir(parents=True)
    png(folder / "a.png")
    PILImage.fromarray(np.arange(48 * 40, dtype=np.uint8).reshape(40, 48)).save(folder / "sub" / "b.jpg")
    write_dicom(folder / "c.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), bits_stored=12, window=(2048, 4096))
    truncated = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(png(tmp_path / "big.png", (300, 300), 7).read_bytes()[:200])
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    (folder / "notes.txt").write_text("not an image")
    write_dicom(folder / "report.dcm", np.zeros((4, 4), np.uint8), pixel_data=False)
    write_dicom(folder / "lossless.dcm", np.zeros((8, 8), np.uint16), syntax=JPEGLossless)
    png_bomb(folder / "bomb.png")
    assert truncated

    with db_sessionmaker.begin() as s:
        report = import_folder(s, folder)
    errors = dict((Path(k).name, v) for k, v in report.errors)
    assert sorted(Path(p).name for p in report.imported) == ["a.png", "b.jpg", "c.dcm"]
    assert "corrupt or truncated PNG" in errors["truncated.png"]
    assert "not a PNG, JPEG or DICOM" in errors["garbage.png"] and "not a PNG, JPEG or DICOM" in errors["notes.txt"]
    assert "without pixel data" in errors["report.dcm"]
    assert "decompression bomb" in errors["bomb.png"]
    if importlib.util.find_spec("pylibjpeg") is None:  # no decoder: the message names what to install
        assert "pip install pylibjpeg pylibjpeg-libjpeg" in errors["lossless.dcm"]
    else:  # a decoder is installed (the [dicom] extra) and refuses the corrupt stream
        assert "cannot decode DICOM pixel data" in errors["lossless.dcm"]
    with db_sessionmaker() as s:
        images = {Path(i.path).name: i for i in s.scalars(select(Image))}
    assert set(images) == {"a.png", "b.jpg", "c.dcm"}
    dicom = images["c.dcm"]
    assert (dicom.width, dicom.height, dicom.bit_depth, dicom.photometric, dicom.view, dicom.patient_id) == (64, 64, 12, "MONOCHROME2", "PA", "PID123")
    assert all(i.granularity is Granularity.UNLABELED and len(i.sha256) == 64 for i in images.values())


def test_folder_import_is_idempotent_by_path_and_content(db_sessionmaker, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    png(folder / "a.png", value=1)
    png(folder / "b.png", value=2)
    with db_sessionmaker.begin() as s:
        assert len(import_folder(s, folder).imported) == 2
    (folder / "copy_of_a.png").write_bytes((folder / "a.png").read_bytes())
    with db_sessionmaker.begin() as s:
        report = import_folder(s, folder)
    assert report.imported == [] and report.errors == []
    reasons = dict((Path(k).name, v) for k, v in report.skipped)
    assert "already in the store" in reasons["a.png"] and "same content as" in reasons["copy_of_a.png"]
    assert count(db_sessionmaker) == 2


def test_dicom_identifying_text_is_not_stored_and_ids_can_be_pseudonymised(db_sessionmaker, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_dicom(folder / "x.dcm", np.zeros((16, 16), np.uint8))
    with db_sessionmaker.begin() as s:
        import_folder(s, folder, patient_salt="s3cret")
    with db_sessionmaker() as s:
        patient = s.scalars(select(Image.patient_id)).one()
    assert patient == pseudonymize("PID123", "s3cret") and patient != "PID123" and len(patient) == 16
    with db_sessionmaker() as s:  # every value of every table, on either backend
        dump = "\n".join(repr(tuple(row)) for table in Base.metadata.sorted_tables for row in s.execute(select(table)))
    assert "x.dcm" in dump  # the dump does hold the rows
    for text in ("Doe^Jane", "Doe", "19700101", "St Elsewhere", "PID123"):
        assert text not in dump


def _coco(tmp_path, images, annotations, categories=("Mass", "Nodule")):
    return {"images": images, "annotations": annotations, "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)]}


def test_coco_bad_items_are_reported_and_not_half_imported(db_sessionmaker, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for name in ("ok.png", "outside_box.png", "inverted.png", "unknown.png"):
        png(root / name, (40, 32), hash(name) % 200)
    png(tmp_path / "secret.png")
    images = [
        {"id": 1, "file_name": "ok.png", "width": 40, "height": 32},
        {"id": 2, "file_name": "outside_box.png", "width": 40, "height": 32},
        {"id": 3, "file_name": "inverted.png", "width": 40, "height": 32},
        {"id": 4, "file_name": "unknown.png", "width": 40, "height": 32},
        {"id": 5, "file_name": "../secret.png", "width": 40, "height": 32},
        {"id": 6, "file_name": str(tmp_path / "secret.png"), "width": 40, "height": 32},
        {"id": 7, "file_name": "missing.png", "width": 40, "height": 32},
        {"id": 8, "file_name": "ok.png", "width": 50, "height": 32, "granularity": "sideways"},
    ]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 2, 10, 10]},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [35, 2, 10, 10]},
        {"id": 4, "image_id": 3, "category_id": 1, "bbox": [20, 2, -5, 10]},
        {"id": 5, "image_id": 4, "category_id": 9, "bbox": [1, 2, 3, 3]},
        {"id": 6, "image_id": 99, "category_id": 1, "bbox": [1, 2, 3, 3]},
    ]
    with db_sessionmaker.begin() as s:
        report = import_coco(s, _coco(tmp_path, images, annotations), images=root)
    assert len(report.imported) == 1 and "ok.png" in report.imported[0]
    errors = " | ".join(f"{k}: {v}" for k, v in report.errors)
    for expected in ("outside the 40x32 image", "inverted", "unknown category_id 9", "contains '..'",
                     "outside the import root", "cannot read file", "no image with id 99"):
        assert expected in errors
    assert len(report.errors) == 8
    assert count(db_sessionmaker) == 1
    assert count(db_sessionmaker, Box) == 1  # image 2's good box was not imported without its bad one


def test_coco_file_level_errors(db_sessionmaker, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with db_sessionmaker.begin() as s:
        report = import_coco(s, bad)
        assert report.imported == [] and "cannot import" in report.errors[0][1]
        assert "not a COCO file" in import_coco(s, {"foo": 1}, images=tmp_path).errors[0][1]


def test_coco_duplicate_image_ids_are_refused_and_nothing_is_imported(db_sessionmaker, tmp_path):
    """Two images with one id would both get that id's boxes: the file is refused."""
    root = tmp_path / "root"
    root.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        png(root / name, value=hash(name) % 200)
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 32},
              {"id": 2, "file_name": "b.png", "width": 40, "height": 32},
              {"id": 1, "file_name": "c.png", "width": 40, "height": 32}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(_coco(tmp_path, images, annotations)))
    with db_sessionmaker.begin() as s:
        report = import_coco(s, path, images=root)
    assert report.imported == [] and len(report.errors) == 1
    where, reason = report.errors[0]
    assert where == str(path) and "duplicate image ids (id 1 at images[0, 2])" in reason and "nothing was imported" in reason
    assert count(db_sessionmaker) == 0 and count(db_sessionmaker, Box) == 0


def test_coco_duplicate_file_name_is_an_error_with_its_reason(db_sessionmaker, tmp_path):
    """A file_name listed twice used to be skipped as "already in the store (image -1)" with exit 0."""
    root = tmp_path / "root"
    root.mkdir()
    png(root / "a.png", value=3)
    png(root / "b.png", value=4)
    (root / "a_copy.png").write_bytes((root / "a.png").read_bytes())
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 32},
              {"id": 2, "file_name": "a.png", "width": 40, "height": 32, "image_labels": ["Mass"]},
              {"id": 3, "file_name": "b.png", "width": 40, "height": 32},
              {"id": 4, "file_name": "a_copy.png", "width": 40, "height": 32}]
    with db_sessionmaker.begin() as s:
        report = import_coco(s, _coco(tmp_path, images, []), images=root)
    assert len(report.imported) == 2
    [(where, reason)] = report.errors
    assert "image 2 (a.png)" in where and "the same file as <COCO dict> image 1 (a.png) earlier in this import" in reason
    [(copy, why)] = report.skipped
    assert "a_copy.png" in copy and why == "same content as <COCO dict> image 1 (a.png) earlier in this import"
    assert "image -1" not in " ".join(r for _, r in report.errors + report.skipped)
    assert count(db_sessionmaker) == 2


def test_failed_batch_leaves_store_unchanged(db_sessionmaker, tmp_path, monkeypatch):
    root = tmp_path / "r"
    root.mkdir()
    images = [{"id": i, "file_name": png(root / f"{i}.png", value=i).name, "width": 40, "height": 32} for i in range(3)]
    calls = []

    def failing_make_state(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return db.lifecycle.make_state(*args)

    monkeypatch.setattr(db.importers.write, "make_state", failing_make_state)
    with pytest.raises(RuntimeError, match="disk full"), db_sessionmaker.begin() as s:
        import_coco(s, _coco(tmp_path, images, []), images=root)
    assert count(db_sessionmaker) == 0


def _nih_csv(path, rows, columns=("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                   "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                                   "OriginalImagePixelSpacing[x", "y]")):
    lines = [",".join(columns)] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_nih_import(db_sessionmaker, tmp_path):
    entry = _nih_csv(tmp_path / "Data_Entry_2017.csv", [
        ["00000001_000.png", "Cardiomegaly|Emphysema", "0", "1", "58", "M", "PA", "2682", "2749", "0.143", "0.143"],
        ["00000001_001.png", "No Finding", "1", "1", "58", "M", "PA", "2894", "2729", "0.143", "0.143"],
        ["00000002_000.png", "Infiltration|Mass", "0", "2", "81", "F", "AP", "2500", "2048", "0.168", "0.168"],
        ["00000003_000.png", "Edema", "0", "3", "40", "F", "AP", "2500", "2048", "0.168", "0.168"],
        ["00000004_000.png", "Nodule", "0", "4", "40", "F", "AP", "2500", "2048", "0.168", "0.168"],
    ])
    bbox = tmp_path / "BBox_List_2017.csv"
    bbox.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                    "00000002_000.png,Infiltrate,10,20,100,200\n"
                    "00000002_000.png,Mass,300.5,400,50,60\n"
                    "00000004_000.png,Tumour,1,1,5,5\n"
                    "00000009_000.png,Mass,1,1,5,5\n")
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    png(tmp_path / "images_001" / "images" / "00000002_000.png")
    with db_sessionmaker.begin() as s:
        report = import_nih(s, entry, images=[tmp_path / "images_001"], bbox_list=bbox, patient_salt=None)
    assert len(report.imported) == 4
    assert dict(report.errors) == {"00000004_000.png": "unknown class 'Tumour' (known: ['Atelectasis', 'Cardiomegaly', "
                                   "'Effusion', 'Infiltration', 'Mass', 'Nodule', 'Pneumonia', 'Pneumothorax'])",
                                   "00000009_000.png": "in BBox_List but not in Data_Entry"}
    with db_sessionmaker() as s:
        images = {Path(i.path).name: i for i in s.scalars(select(Image))}
        boxed = images["00000002_000.png"]
        assert boxed.path == str(tmp_path / "images_001" / "images" / "00000002_000.png")  # found in a sub-folder
        state = image_state(boxed)
        assert boxed.granularity is Granularity.FULL and boxed.file_status is FileStatus.UNCHECKED
        assert [b[:5] for b in state["boxes"]] == [["Infiltration", 10.0, 20.0, 110.0, 220.0], ["Mass", 300.5, 400.0, 350.5, 460.0]]
        assert images["00000001_001.png"].no_finding and images["00000001_001.png"].granularity is Granularity.WEAK
        assert image_state(images["00000001_000.png"])["labels"]["Cardiomegaly"] is True
        assert not any(image_state(images["00000003_000.png"])["labels"].values())  # Edema is not a box class
        assert images["00000001_000.png"].patient_id == "1" and images["00000002_000.png"].view == "AP"
        assert granularity_mismatches(s) == [] and replay_audit(s, boxed.id) == state
    with db_sessionmaker.begin() as s:
        checked = check_files(s)
    assert len(checked.imported) == 0 and len(checked.errors) == 4  # 512 px file is not NIH's 1024, others missing
    with db_sessionmaker() as s:
        statuses = {Path(i.path).name: i.file_status for i in s.scalars(select(Image))}
        assert statuses["00000002_000.png"] is FileStatus.CORRUPT and statuses["00000001_000.png"] is FileStatus.MISSING
        assert export_coco(s)["images"] == []  # bad files are left out of exports


def test_nih_csv_with_missing_columns_imports_nothing(db_sessionmaker, tmp_path):
    entry = _nih_csv(tmp_path / "Data_Entry_2017.csv", [["00000001_000.png", "Mass"]], columns=("Image Index", "Finding Labels"))
    with db_sessionmaker.begin() as s:
        report = import_nih(s, entry, images=tmp_path)
    assert report.imported == [] and "missing columns ['Patient ID', 'View Position']" in report.errors[0][1]
    assert count(db_sessionmaker) == 0


def test_vindr_import_keeps_readers_and_negatives(db_sessionmaker, tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    write_dicom(folder / "img1.dicom", np.zeros((100, 120), np.uint16), bits_stored=14, photometric="MONOCHROME1")
    write_dicom(folder / "img2.dicom", np.zeros((50, 50), np.uint8), patient_id="P2")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
        "img1,Aortic enlargement,0,R8,10,10,50,40\n"
        "img1,Aortic enlargement,0,R9,12,11,52,42\n"
        "img1,No finding,14,R10,,,,\n"
        "img2,No finding,14,R1,,,,\n"
        "img2,No finding,14,R2,,,,\n"
        "img3,Nodule/Mass,8,R1,1,1,5,5\n"
        "img4,Nodule/Mass,8,R1,1,1,5,5\n"
    )
    write_dicom(folder / "img4.dicom", np.zeros((50, 50), np.uint8))
    csv_path.write_text(csv_path.read_text().replace("img4,Nodule/Mass,8,R1,1,1,5,5", "img4,Nodule/Mass,8,R1,40,40,60,60"))
    with db_sessionmaker.begin() as s:
        report = import_vindr(s, csv_path, images=folder)
    assert sorted(report.imported) == ["img1", "img2"]
    errors = dict(report.errors)
    assert "no image file img3" in errors["img3"] and "outside the 50x50 image" in errors["img4"]
    with db_sessionmaker() as s:
        images = {Path(i.path).stem: i for i in s.scalars(select(Image))}
        one, two = images["img1"], images["img2"]
        assert one.granularity is Granularity.FULL and one.photometric == "MONOCHROME1" and one.bit_depth == 14
        assert sorted(b[5] for b in image_state(one)["boxes"]) == ["vindr:R8", "vindr:R9"]
        assert image_state(one)["labels"]["Aortic enlargement"] is True and image_state(one)["labels"]["ILD"] is False
        assert two.granularity is Granularity.WEAK and two.no_finding


@pytest.mark.skipif(not NIH_CXR.is_dir(), reason="../shared/data/nih-cxr is not available")
def test_nih_cxr_coco_files_round_trip(db_sessionmaker):
    annotations, images = NIH_CXR / "annotations", NIH_CXR / "images"
    for name in ("boxes.json", "image_labels.json", "unlabeled.json"):
        with db_sessionmaker.begin() as s:
            report = import_coco(s, annotations / name, images=images, verify=False)
            assert report.errors == [] and report.skipped == []
    with db_sessionmaker.begin() as s:
        assert import_coco(s, annotations / "unlabeled.json", images=images, verify=False).imported == []  # idempotent

    def by_file(coco):
        names = {c["id"]: c["name"] for c in coco["categories"]}
        files = {i["id"]: i["file_name"] for i in coco["images"]}
        boxes = {}
        for a in coco["annotations"]:
            boxes.setdefault(files[a["image_id"]], []).append((names[a["category_id"]], *a["bbox"]))
        return {i["file_name"]: (i, sorted(boxes.get(i["file_name"], []))) for i in coco["images"]}

    with db_sessionmaker() as s:
        assert granularity_mismatches(s) == []
        for name, granularity in (("boxes.json", "full"), ("image_labels.json", "weak"), ("unlabeled.json", "unlabeled")):
            source = by_file(json.loads((annotations / name).read_text()))
            exported = by_file(export_coco(s, granularity=granularity, images_root=images, include_patient_ids=True))
            assert exported.keys() == source.keys()
            for file_name, (image, boxes) in source.items():
                out_image, out_boxes = exported[file_name]
                assert out_boxes == boxes
                assert (out_image["width"], out_image["height"], out_image["patient_id"]) == (image["width"], image["height"], str(image["patient_id"]))
                assert out_image["granularity"] == granularity
                expected_labels = image.get("image_labels", sorted({b[0] for b in boxes}))
                assert out_image["image_labels"] == expected_labels


def test_a_10000_by_10000_radiograph_imports_and_the_limit_is_16k_squared(db_sessionmaker, tmp_path):
    """Pillow's own 89.5 Mpx bomb limit no longer fires first; MAX_PIXELS (16k x 16k) does."""
    from oxnet.data.imaging import MAX_PIXELS, probe_image

    folder = tmp_path / "big"
    folder.mkdir()
    png_bomb(folder / "large.png", size=10_000)  # 100 Mpx, a few kB on disk
    with db_sessionmaker.begin() as s:
        report = import_folder(s, folder)
    assert not report.errors, report.errors
    with db_sessionmaker() as s:
        assert s.scalars(select(Image.width)).all() == [10_000]
    assert MAX_PIXELS == 16384 * 16384
    with pytest.raises(ValueError, match="exceeds the limit of 268,435,456"):
        probe_image(png_bomb(tmp_path / "huge.png", size=16_400), verify=False)
    assert PILImage.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's process-wide setting is left as it was
