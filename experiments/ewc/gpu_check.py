"""GPU checks of the EWC code, for a machine with CUDA: the Fisher on the GPU equals the CPU's (float64, every test model
and view), `sample` draws with a CUDA generator, the penalty and its gradient on the GPU equal the CPU's, and the Fisher
against a training epoch for the MLP and the conv net on the GPU (numbers in RESULTS.md).

    PYTHONPATH=. python experiments/ewc/gpu_check.py
"""

import time

import torch
import torch.nn.functional as F

from src.methods.fisher import fisher_diagonal
from src.models.convnet import ConvNet
from src.models.mlp import MLP
from tests.test_ewc import Toy, ewc_with, penalty_and_grads, random_like
from tests.test_fisher import class_view, make_batches, make_model, task_view


def same_fisher_on_gpu() -> None:
    worst = 0.0
    for arch in ("mlp", "conv", "wideconv", "odd"):
        for view in (task_view, class_view):
            model, batches = make_model(arch), make_batches()
            on_gpu = [tuple(t.cuda() for t in batch) for batch in batches]
            for kind in ("exact", "empirical"):
                cpu, _ = fisher_diagonal(model, batches, kind, view)
                gpu, n = fisher_diagonal(model.cuda(), on_gpu, kind, view)
                model.cpu()
                diff = max(((cpu[k] - gpu[k].cpu()).abs().max() / cpu[k].abs().max().clamp_min(1e-30)).item()
                           for k in cpu)
                worst = max(worst, diff)
                print(f"{arch:9s} {view.__name__:10s} {kind:9s} n={n} max rel diff GPU vs CPU {diff:.2e}")
            generator = torch.Generator(device="cuda").manual_seed(0)
            sampled, _ = fisher_diagonal(model.cuda(), on_gpu, "sample", view, generator=generator)
            model.cpu()
            assert all(torch.isfinite(v).all() for v in sampled.values())
    print("worst", worst)
    assert worst < 1e-9


def same_penalty_on_gpu() -> None:
    module = Toy()
    fisher, anchor = random_like(module, 1, positive=True), random_like(module, 2)
    value_cpu, grads_cpu = penalty_and_grads(ewc_with(module, [(fisher, anchor)]), module)
    module.cuda()
    value_gpu, grads_gpu = penalty_and_grads(ewc_with(module, [(fisher, anchor)]), module)
    print("penalty cpu", value_cpu.item(), "gpu", value_gpu.item(), "device", value_gpu.device)
    assert torch.allclose(value_cpu, value_gpu.cpu(), rtol=1e-5)
    assert all(torch.allclose(grads_cpu[k], grads_gpu[k].cpu(), rtol=1e-5, atol=1e-6) for k in grads_cpu)


def two_outputs(logits, batch):  # a task-incremental head
    return logits[:, :2], batch[1]


def ten_outputs(logits, batch):  # the class-incremental head after the last task
    return logits, batch[1]


def timed(fn) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def fisher_against_epoch_on_gpu() -> None:
    for name, backbone in (("mlp", MLP((1, 28, 28))), ("conv", ConvNet((1, 28, 28)))):
        torch.manual_seed(0)
        net = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.out_features, 10)).cuda()
        x = torch.randn(12000, 1, 28, 28, device="cuda")
        y = torch.randint(0, 2, (12000,), device="cuda")
        optimizer = torch.optim.Adam(net.parameters())

        def epoch(net=net, x=x, y=y, optimizer=optimizer):
            net.train()
            for i in range(0, 12000, 128):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(net(x[i : i + 128])[:, :2], y[i : i + 128]).backward()
                optimizer.step()

        batches = [(x[i : i + 500], y[i : i + 500]) for i in range(0, 12000, 500)]
        e = timed(epoch)
        rows = {
            "empirical": timed(lambda net=net, b=batches: fisher_diagonal(net, b, "empirical", two_outputs)),
            "exact2": timed(lambda net=net, b=batches: fisher_diagonal(net, b, "exact", two_outputs)),
            "exact10": timed(lambda net=net, b=batches: fisher_diagonal(net, b, "exact", ten_outputs)),
        }
        print(f"GPU {name}: epoch {e:.3f} s; " + "; ".join(f"{k} {v:.3f} s ({v / e:.2f} epochs)" for k, v in rows.items()))


if __name__ == "__main__":
    print("torch", torch.__version__, torch.cuda.get_device_name(0))
    same_fisher_on_gpu()
    same_penalty_on_gpu()
    fisher_against_epoch_on_gpu()
    print("GPU CHECKS OK")
