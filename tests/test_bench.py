"""The train-step benchmark compares equal computations and reports the keys the README quotes."""

import pytest
import torch

from oxnet.experiments import bench
from oxnet.modeling.config import build_model


def test_loop_baseline_equals_vectorised_daa_gpa():
    model = build_model(preset="tiny", num_classes=4)
    inputs = bench.daa_gpa_inputs(model, batch=3, size=128, device=torch.device("cpu"))
    vec = bench.daa_gpa_vectorised(*inputs, num_classes=4)
    vec.backward()
    grads_vec = [t.grad.clone() for t in (*inputs[0], inputs[1])]
    for t in (*inputs[0], inputs[1]):
        t.grad = None
    loop = bench.daa_gpa_loop(*inputs, num_classes=4)
    loop.backward()
    torch.testing.assert_close(vec, loop, rtol=1e-5, atol=1e-6)
    for a, t in zip(grads_vec, (*inputs[0], inputs[1])):
        loop_grad = torch.zeros_like(a) if t.grad is None else t.grad  # a level no class chose
        torch.testing.assert_close(a, loop_grad, rtol=1e-4, atol=1e-7)


def test_train_step_benchmark_reports_ratios():
    result = bench.main(["--preset", "tiny", "--batch", "3", "--repeats", "1", "--warmup", "0", "--daa-batch", "2"])
    for key in ("ratio_retinanet_vs_torchvision", "ratio_oxnet_vs_torchvision", "daa_gpa_speedup"):
        assert result[key] > 0
    assert result["setup"]["oxnet_batch_mix"] == ["full", "weak", "unlabeled"]
    assert set(result["seconds"]) == {
        "torchvision_retinanet_step", "ours_retinanet_step", "oxnet_step", "daa_gpa_vectorised", "daa_gpa_loop"
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the test below covers it")
def test_amp_without_cuda_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--device", "cpu", "--amp"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_step_benchmark_under_amp_reports_peak_memory():
    result = bench.main(["--preset", "tiny", "--batch", "3", "--repeats", "1", "--warmup", "1", "--daa-batch", "2",
                         "--device", "cuda", "--amp"])
    assert result["setup"]["amp"] is True
    assert all(mb > 0 for mb in result["peak_memory_mb"].values())
    assert result["memory_ratio_oxnet_vs_torchvision"] > 0
