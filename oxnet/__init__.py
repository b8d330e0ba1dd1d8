"""OXnet: omni-supervised thoracic disease detection (RetinaNet + DAA + GPA + mean teacher/SFL)."""
