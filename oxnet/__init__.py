"""OXnet: omni-supervised thoracic disease detection (RetinaNet + DAA + GPA + mean teacher/SFL).

Heavy parts (torch) load lazily, so `import oxnet.classes` stays cheap for the store and the UI.
"""

from oxnet.lazy import lazy_getattr

_LAZY = {
    "build_model": "oxnet.modeling.config",
    "OXNet": "oxnet.modeling.detector",
    "MeanTeacher": "oxnet.modeling.teacher",
    "evaluate": "oxnet.evaluation.metrics",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
