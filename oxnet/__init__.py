"""OXnet: omni-supervised thoracic disease detection (RetinaNet + DAA + GPA + mean teacher/SFL).

Heavy parts (torch) load lazily, so `import oxnet.classes` stays cheap for the store and the UI.
"""

from importlib import import_module

_LAZY = {
    "build_model": "oxnet.modeling.config",
    "OXNet": "oxnet.modeling.detector",
    "MeanTeacher": "oxnet.modeling.teacher",
    "evaluate": "oxnet.evaluation.metrics",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'oxnet' has no attribute {name!r}")
