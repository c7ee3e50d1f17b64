"""MAS: the importance equals a per-sample autograd loop (mean over samples of |∂‖f(x)‖²/∂θ|), for Linear layers
(the factorised path) and for conv/BatchNorm layers (the torch.func path), with each scenario's active outputs; and
MAS in a run holds the penalty at the anchor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src.continual.scenarios import ClassIncremental, DomainIncremental, TaskIncremental
from src.methods.mas import MAS, mas_importance
from tests.helpers import SYNTHETIC, build_loop


def per_sample_loop(model, batches, active_outputs, params):
    sums, n = {k: torch.zeros_like(p) for k, p in params.items()}, 0
    model.eval()
    for x, y, t in batches:
        for i in range(len(y)):
            out = active_outputs(model(x[i : i + 1]), (x[i : i + 1], y[i : i + 1], t[i : i + 1]))
            grads = torch.autograd.grad(out.square().sum(), list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    sums[name] += g.abs()
            n += 1
    return sums, n


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 6))


def convnet():
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 6))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("make", [mlp, convnet])
@pytest.mark.parametrize("scenario", [ClassIncremental(3, 2), TaskIncremental(3, 2), DomainIncremental(3, 2)])
def test_importance_equals_a_per_sample_loop(make, scenario):
    torch.manual_seed(0)
    model = make()
    if scenario.name == "domain":
        model[-1] = nn.Linear(model[-1].in_features, 2)
    params = dict(model.named_parameters())
    batches = [(torch.randn(5, 1, 4, 4), torch.randint(0, 2, (5,)), torch.randint(0, 3, (5,))) for _ in range(3)]

    def active_outputs(logits, batch):
        return scenario.eval_view(logits, batch[1], batch[2], trained_up_to=1)[0]

    sums, n = mas_importance(model, batches, active_outputs, params)
    ref, n_ref = per_sample_loop(model, batches, active_outputs, params)
    assert n == n_ref == 15
    for name in params:
        assert torch.allclose(sums[name], ref[name], rtol=1e-4, atol=1e-6), name
    # not the gradient of the batch's summed norm: samples' signs would cancel
    batch_grad = torch.autograd.grad(sum(active_outputs(model(x), (x, y, t)).square().sum() for x, y, t in batches),
                                     list(params.values()))
    assert any(not torch.allclose(g.abs(), ref[k], rtol=1e-3) for k, g in zip(params, batch_grad, strict=True))


def test_mas_in_a_run(tmp_path):
    loop = build_loop(tmp_path, *SYNTHETIC, "method=mas", "method.lambda=5", "dataset.tasks.n_tasks=2",
                      "trainer.max_steps=3", "save_checkpoints=false")
    results = loop.run()
    mas = loop.module.regularizer
    assert isinstance(mas, MAS) and results["status"] == "finished"
    assert set(mas.importance) == {n for n, p in loop.module.named_parameters() if p.requires_grad}
    assert all(float(v.min()) >= 0 for v in mas.importance.values())
    # after the last task the anchor is the current weights: zero penalty; moving a weight costs λ Ω δ²
    zero = torch.zeros(())
    assert float(mas.loss(loop.module, None, None, zero)["mas_penalty"]) == 0.0
    name = "head.weight"
    with torch.no_grad():
        dict(loop.module.named_parameters())[name].add_(0.1)
    expected = 5 * float((mas.importance[name] * 0.01).sum())
    assert float(mas.loss(loop.module, None, None, zero)["mas_penalty"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mas", "si"])
def test_ddp_ranks_hold_the_same_importance_and_mas_equals_one_process(tmp_path, method):
    """2 gloo processes: Ω and θ* are the same on both ranks after every task (MAS: sums and counts all-reduced; SI:
    built from the already all-reduced gradient), and MAS's last task end redone in one process gives the same Ω."""
    from tests.helpers import read_results, run_train
    from tests.test_ddp import PROTOCOL, assert_same

    run_dir = tmp_path / "run"
    run_train(run_dir, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"method={method}", *PROTOCOL,
              "+callbacks.rank_state._target_=tests.test_ddp.RankState", f"+callbacks.rank_state.folder={tmp_path}/ranks")
    assert read_results(run_dir)["status"] == "finished"
    dumps = sorted((tmp_path / "ranks").glob("rank0_*.pt"))
    for rank0 in dumps:
        a = torch.load(rank0, weights_only=False)["regularizer"]
        b = torch.load(rank0.with_name(rank0.name.replace("rank0", "rank1")), weights_only=False)["regularizer"]
        assert_same(a, b)
    assert torch.load(dumps[-1], weights_only=False)["regularizer"]["importance"]
    if method != "mas":
        return
    before = torch.load(run_dir / "checkpoints" / "task_1.ckpt", map_location="cpu", weights_only=False)
    after = torch.load(run_dir / "checkpoints" / "task_2.ckpt", map_location="cpu", weights_only=False)
    loop = build_loop(tmp_path / "one", "method=mas", *PROTOCOL)
    module, dm = loop.module, loop.dm
    module.trained_up_to = -1
    loop.evaluate("test")
    module.on_load_checkpoint(before)
    module.load_state_dict(after["state_dict"])
    module.current_task = 2
    dm.set_task(2)
    module.regularizer.on_task_end(2, module, dm)
    assert_same(module.regularizer.state_dict(), after["regularizer"], rtol=1e-5, atol=1e-8)
