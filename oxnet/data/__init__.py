"""Data for OXnet: records of three granularities, two-view datasets, a mixing batch sampler and
synthetic chest X-rays.

Names load lazily, so ``import oxnet.data.synthetic`` (numpy and Pillow only) does not import torch.
"""

from oxnet.lazy import lazy_getattr

_LAZY = {
    "Record": "oxnet.data.records",
    "Records": "oxnet.data.records",
    "records_from_coco": "oxnet.data.records",
    "load_image": "oxnet.data.transforms",
    "Photometric": "oxnet.data.transforms",
    "STUDENT_AUGMENT": "oxnet.data.transforms",
    "TEACHER_AUGMENT": "oxnet.data.transforms",
    "OmniDataset": "oxnet.data.datasets",
    "UnreadableImage": "oxnet.data.datasets",
    "collate": "oxnet.data.datasets",
    "MixedBatchSampler": "oxnet.data.sampler",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
