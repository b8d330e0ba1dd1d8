"""OmniDataset (resize, flip, two views, determinism) and the collate contract."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from oxnet.data.datasets import OmniDataset, UnreadableImage, collate
from oxnet.data.records import Record
from oxnet.data.sampler import MixedBatchSampler
from oxnet.data.transforms import Photometric, load_image, resize_flip, to_original_pixels

NUM_CLASSES = 3


def _image(path, width=80, height=40):
    """A dark image with a bright block at columns 10-19, rows 5-14 (left half)."""
    array = np.full((height, width), 20, np.uint8)
    array[5:15, 10:20] = 250
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def records(tmp_path):
    return [
        Record(1, _image(tmp_path / "full.png"), "full", 80, 40, boxes=[[10, 5, 20, 15]], labels=[2]),
        Record(2, _image(tmp_path / "weak.png"), "weak", 80, 40, image_labels=[0, 1]),
        Record(3, _image(tmp_path / "unl.png"), "unlabeled", 80, 40),
        Record(4, _image(tmp_path / "neg.png"), "full", 80, 40, negative=True),
    ]


def test_eval_mode_resizes_without_cropping_and_scales_boxes(records):
    dataset = OmniDataset(records, num_classes=NUM_CLASSES, size=32, train=False)
    image, teacher, target = dataset[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert teacher is image  # no augmentation: one view
    # x scaled by 32/80, y by 32/40
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 4.0, 8.0, 12.0]]))
    assert target["orig_size"] == (40, 80)
    assert 0.0 <= image.min() and image.max() <= 1.0
    # the bright block is where the box says
    assert image[0, 5:11, 5:7].mean() > 0.9 and image[0, :, 16:].max() < 0.2


def test_flip_moves_boxes_and_both_views_share_it(records):
    photometric = Photometric(brightness=0.3, contrast=0.3)
    dataset = OmniDataset(records, num_classes=NUM_CLASSES, size=32, student=photometric, teacher=photometric)
    flipped = 0
    for epoch in range(8):
        dataset.set_epoch(epoch)
        image, teacher, target = dataset[0]
        assert not torch.equal(image, teacher)  # own photometry per view
        # the block's column in both views agrees with the box
        for view in (image, teacher):
            columns = view[0].mean(0)
            assert (columns.argmax() < 16) == (target["boxes"][0, 0] < 16)
        if target["boxes"][0, 0] > 16:
            torch.testing.assert_close(target["boxes"], torch.tensor([[24.0, 4.0, 28.0, 12.0]]))
            flipped += 1
    assert 0 < flipped < 8


def test_always_flip_equals_mirrored_eval(records):
    none = Photometric()
    train = OmniDataset(records, num_classes=NUM_CLASSES, size=32, flip_p=1.0, student=none, teacher=none)
    evaluation = OmniDataset(records, num_classes=NUM_CLASSES, size=32, train=False)
    torch.testing.assert_close(train[0][0], evaluation[0][0].flip(-1))
    torch.testing.assert_close(train[0][1], train[0][0])


def test_augmentation_is_deterministic_per_seed_epoch_and_index(records):
    a = OmniDataset(records, num_classes=NUM_CLASSES, size=32, seed=1)
    b = OmniDataset(records, num_classes=NUM_CLASSES, size=32, seed=1)
    torch.testing.assert_close(a[0][1], b[0][1])
    b.set_epoch(1)
    assert not torch.equal(a[0][1], b[0][1])
    assert not torch.equal(a[0][1], OmniDataset(records, num_classes=NUM_CLASSES, size=32, seed=2)[0][1])


def test_teacher_view_gets_cutout(records):
    cutout = Photometric(cutout=3, cutout_size=0.5)
    dataset = OmniDataset(records, num_classes=NUM_CLASSES, size=32, flip_p=0.0, student=Photometric(), teacher=cutout)
    changed = [not torch.equal(*dataset[i][:2]) for i in range(4)]
    assert any(changed)


def test_collate_gives_the_batch_contract(records):
    dataset = OmniDataset(records, num_classes=NUM_CLASSES, size=32)
    images, teacher_images, targets = collate([dataset[i] for i in range(4)])
    assert images.shape == teacher_images.shape == (4, 1, 32, 32)
    assert images.dtype == teacher_images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and 0 <= teacher_images.min() and teacher_images.max() <= 1
    assert [t["granularity"] for t in targets] == ["full", "weak", "unlabeled", "full"]
    for t in targets:
        assert set(t) == {"granularity", "boxes", "labels", "image_labels", "image_label_mask", "image_id", "orig_size"}
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1:] == (4,)
        assert t["labels"].dtype == torch.int64 and len(t["labels"]) == len(t["boxes"])
        assert t["image_labels"].dtype == torch.float32 and t["image_labels"].shape == (NUM_CLASSES,)
        assert t["orig_size"] == (40, 80)
    full, weak, unlabeled, negative = targets
    assert full["labels"].tolist() == [2] and full["image_labels"].tolist() == [0, 0, 1]
    assert weak["boxes"].shape == (0, 4) and weak["image_labels"].tolist() == [1, 1, 0]
    assert unlabeled["boxes"].shape == (0, 4) and unlabeled["image_labels"].tolist() == [0, 0, 0]
    assert negative["boxes"].shape == (0, 4) and negative["labels"].shape == (0,)
    assert [t["image_id"] for t in targets] == [1, 2, 3, 4]


def test_collate_rejects_mixed_sizes_and_empty(records):
    small = OmniDataset(records, num_classes=NUM_CLASSES, size=16)[0]
    large = OmniDataset(records, num_classes=NUM_CLASSES, size=32)[0]
    with pytest.raises(ValueError, match="one size"):
        collate([small, large])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_dataloader_with_mixed_batch_sampler(records):
    dataset = OmniDataset(records, num_classes=NUM_CLASSES, size=16)
    sampler = MixedBatchSampler(dataset.granularities, batch_size=3, num_batches=2)
    batches = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))
    assert len(batches) == 2
    for images, _, targets in batches:
        assert images.shape == (3, 1, 16, 16)
        assert sorted(t["granularity"] for t in targets) == ["full", "unlabeled", "weak"]


def test_load_time_errors_name_the_file(records, tmp_path):
    dataset = OmniDataset(records, num_classes=NUM_CLASSES, size=16)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(records[1].path)
    with pytest.raises(ValueError, match=r"weak.png \(image id 2\): image is 10x10, the record says 80x40"):
        dataset[1]
    records[2].path.write_bytes(b"garbage")
    with pytest.raises(UnreadableImage, match=r"unl.png \(image id 3\): not a PNG, JPEG or DICOM file") as caught:
        dataset[2]
    assert caught.value.image_id == 3 and caught.value.reason.startswith("not a PNG, JPEG or DICOM file")
    records[2].path.unlink()
    with pytest.raises(UnreadableImage, match=r"unl.png \(image id 3\): file not found"):
        dataset[2]


def test_unreadable_image_survives_a_dataloader_worker(records):
    """A worker re-raises the exception type with the traceback text only: the image id still comes back."""
    records[1].path.write_bytes(b"garbage")
    loader = DataLoader(OmniDataset(records[1:2], num_classes=NUM_CLASSES, size=16), batch_size=1,
                        collate_fn=collate, num_workers=1)
    with pytest.raises(UnreadableImage) as caught:
        next(iter(loader))
    assert caught.value.image_id == 2 and "not a PNG, JPEG or DICOM file" in caught.value.reason


def test_dataset_validation(records):
    with pytest.raises(ValueError, match="class index outside"):
        OmniDataset(records, num_classes=2)
    with pytest.raises(ValueError, match="duplicate image ids"):
        OmniDataset(records + records[:1], num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="cutout_size"):
        Photometric(cutout=1)


def test_label_mask_and_weak_images_with_no_known_class(tmp_path):
    records = [
        Record(1, _image(tmp_path / "a.png"), "weak", 80, 40, image_labels=[0], unknown_labels=[2]),
        Record(2, _image(tmp_path / "b.png"), "weak", 80, 40, unknown_labels=[0, 1, 2]),  # nothing known
        Record(3, _image(tmp_path / "c.png"), "full", 80, 40, boxes=[[10, 5, 20, 15]], labels=[2]),
    ]
    dataset = OmniDataset(records, num_classes=NUM_CLASSES, size=32, train=False)
    assert dataset.granularities == ["weak", "unlabeled", "full"]  # what MixedBatchSampler pools
    targets = [dataset[i][2] for i in range(3)]
    assert targets[0]["image_label_mask"].tolist() == [1.0, 1.0, 0.0]
    assert targets[1]["granularity"] == "unlabeled" and targets[1]["image_label_mask"].tolist() == [0.0] * 3
    assert targets[2]["image_label_mask"].tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="class index outside"):
        OmniDataset([Record(4, tmp_path / "a.png", "weak", 80, 40, unknown_labels=[5])], num_classes=NUM_CLASSES)


def test_class_sets_come_from_the_records_without_reading_images(tmp_path):
    missing = tmp_path / "not-there.png"  # class_sets must not open a file
    records = [
        Record(1, missing, "full", 80, 40, boxes=[[1, 1, 5, 5]] * 3, labels=[2, 0, 2], image_labels=[0, 1, 2]),
        Record(2, missing, "weak", 80, 40, image_labels=[0, 1], unknown_labels=[2]),
        Record(3, missing, "unlabeled", 80, 40),
        Record(4, missing, "full", 80, 40, negative=True),
        Record(5, missing, "weak", 80, 40, unknown_labels=[0, 1, 2]),  # nothing known: trained as unlabeled
    ]
    dataset = OmniDataset(records, num_classes=NUM_CLASSES)
    assert dataset.class_sets == [(0, 2), (0, 1), (), (), ()]  # full: the classes of its boxes


def test_dicom_trains_through_the_store_reader(tmp_path):
    """A 12-bit MONOCHROME1 DICOM with a window loads as the UI shows it: windowed, inverted, 16-bit."""
    from tests.test_db_import import write_dicom

    from oxnet.data.records import Record
    from oxnet.data.imaging import read_pixels

    pixels = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 2) % 4096
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12, window=(1500, 1000), photometric="MONOCHROME1")
    record = Record(image_id=1, path=path, width=48, height=40, granularity="unlabeled")
    student, _, _ = OmniDataset([record], num_classes=NUM_CLASSES, size=40, train=False)[0]
    loaded = load_image(path)
    assert loaded.shape == (1, 40, 48)
    assert torch.allclose(loaded[0], torch.from_numpy(read_pixels(path).astype(np.float32) / 65535))
    assert len(torch.unique(loaded)) > 256  # deeper than 8 bits
    assert loaded[0, 0, 0] == 1.0  # stored 0 is below the window: black, inverted to white
    assert student.shape == (1, 40, 40)


def test_to_original_pixels_undoes_the_resize_of_a_non_square_image():
    boxes = torch.tensor([[10.0, 20.0, 70.0, 44.0], [0.0, 0.0, 96.0, 80.0]])
    _, resized = resize_flip(torch.rand(1, 80, 96), boxes, 64, flip=False)
    assert not torch.allclose(resized, boxes)
    back = to_original_pixels(resized, (64, 64), (80, 96))
    assert back.dtype == torch.float32 and back.device.type == "cpu"
    torch.testing.assert_close(back, boxes)
