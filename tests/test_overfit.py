"""A tiny OXnet overfits a handful of images: train mAP (IoU 0.40:0.75) above 0.9 within 200 steps."""

import pytest
import torch

from oxnet.evaluation.metrics import evaluate
from oxnet.modeling.config import build_model

pytestmark = pytest.mark.slow  # processes, whole training runs: deselect with -m 'not slow'

SIZE, N = 128, 3


def scene(seed):
    """Noise with a filled square (class 0) and a hollow square (class 1) at seed-dependent places."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, SIZE, SIZE, generator=g) * 0.2
    specs = [(0, 10, 12, 44), (1, 60, 70, 40)] if seed % 2 == 0 else [(1, 20, 60, 36), (0, 70, 15, 48)]
    boxes, labels = [], []
    for c, x, y, s in specs:
        img[0, y : y + s, x : x + s] = 0.9
        if c == 1:
            img[0, y + 6 : y + s - 6, x + 6 : x + s - 6] = 0.2
        boxes.append([x, y, x + s, y + s])
        labels.append(c)
    return img, torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels)


def test_tiny_model_overfits_a_handful_of_images():
    torch.manual_seed(0)
    data = [scene(i) for i in range(4)]
    x = torch.stack([d[0] for d in data])
    targets = [
        {"granularity": "full", "boxes": b, "labels": c, "image_labels": torch.zeros(N).index_fill_(0, c, 1.0)}
        for _, b, c in data
    ]
    gt = {
        "images": [{"id": i, "width": SIZE, "height": SIZE} for i in range(len(data))],
        "annotations": [
            {"id": 10 * i + k + 1, "image_id": i, "category_id": int(c) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            for i, (_, boxes, labels) in enumerate(data)
            for k, (b, c) in enumerate(zip(boxes.tolist(), labels.tolist()))
        ],
        "categories": [{"id": c + 1, "name": f"class{c}"} for c in range(N)],
    }
    model = build_model(preset="tiny", num_classes=N)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    best = 0.0
    for step in range(1, 201):
        model.train()
        loss = sum(model(x, targets).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0:
            model.eval()
            out = model(x)
            preds = [{"image_id": i, "boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"] + 1} for i, o in enumerate(out)]
            best = max(best, evaluate(gt, preds)["mAP"])
            if best > 0.9:
                break
    assert best > 0.9, f"train mAP only {best:.3f} after {step} steps"
