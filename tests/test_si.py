"""SI: the path integral ω on a quadratic loss with plain SGD (closed form), ω from the task loss alone while the
penalty is on (an explicit recursion), and the hook runs once per optimizer step in automatic and manual
optimisation (steps_per_batch=1 and 4 give the same SI state)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src.continual.validate import ConfigError
from src.methods.si import SI
from tests.helpers import SYNTHETIC, build_loop


class Quadratic(nn.Module):
    def __init__(self, theta0):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta0, dtype=torch.float64))

    def task_loss(self, a):
        return 0.5 * (a * self.theta**2).sum()


def train(si: SI, model: Quadratic, a, lr: float, steps: int) -> list[torch.Tensor]:
    """Plain SGD on ½ a θ² plus SI's penalty; returns the path θ_0 … θ_steps."""
    path = [model.theta.detach().clone()]
    for _ in range(steps):
        model.theta.grad = None
        task_loss = model.task_loss(a)
        si.loss(model, None, None, task_loss)["loss"].backward()
        with torch.no_grad():
            model.theta -= lr * model.theta.grad
        si.after_optimizer_step(model)
        path.append(model.theta.detach().clone())
    return path


def test_omega_on_a_quadratic_has_its_closed_form():
    """θ_{t+1} = r θ_t with r = 1 − ηa, g_t = a θ_t, Δθ_t = −ηa θ_t, so ω = Σ_t η a² θ_t² = η a² θ_0² (1 − r^{2T})/(1 − r²)."""
    a, lr, steps, xi = torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64), 0.1, 25, 0.01
    theta0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    model, si = Quadratic(theta0.tolist()), SI(c=1.0, xi=xi)
    si.on_task_start(0, model, None)
    train(si, model, a, lr, steps)
    r = 1 - lr * a
    omega = lr * a**2 * theta0**2 * (1 - r ** (2 * steps)) / (1 - r**2)
    assert torch.allclose(si.omega[0], omega, rtol=1e-10)
    delta = theta0 * (r**steps - 1)
    si.on_task_end(0, model, None)
    assert torch.allclose(si.importance["theta"].double(), omega / (delta**2 + xi), rtol=1e-6)
    assert torch.equal(si.anchor["theta"], model.theta.detach())


def test_omega_uses_the_task_loss_gradient_while_the_penalty_is_on():
    a, lr, c, xi = torch.tensor([2.0, 0.5], dtype=torch.float64), 0.05, 3.0, 0.1
    model, si = Quadratic([1.0, 1.0]), SI(c=c, xi=xi)
    si.on_task_start(0, model, None)
    train(si, model, a, lr, 10)
    si.on_task_end(0, model, None)
    big_omega, anchor = si.importance["theta"].double(), si.anchor["theta"].double()
    # task 1: a different quadratic, ½ b (θ − 2)² ... written as ½ a' θ² around a shifted optimum
    b = torch.tensor([1.0, 3.0], dtype=torch.float64)
    si.on_task_start(1, model, None)
    theta, omega = model.theta.detach().clone(), torch.zeros(2, dtype=torch.float64)
    path = train(si, model, b, lr, 15)
    for t in range(15):  # the reference: the task loss's gradient only, along the penalised path
        task_grad = b * path[t]
        total = task_grad + 2 * c * big_omega * (path[t] - anchor)
        assert torch.allclose(path[t + 1], path[t] - lr * total, rtol=1e-12)
        omega -= task_grad * (path[t + 1] - path[t])
    assert torch.allclose(si.omega[0], omega, rtol=1e-6, atol=1e-12)
    assert not torch.allclose(theta, model.theta.detach())


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="method.xi=0 is invalid"):
        SI(xi=0)
    with pytest.raises(ConfigError, match="method.c=-1 is invalid"):
        SI(c=-1)


def test_the_hook_runs_once_per_step_in_automatic_and_manual_optimisation(tmp_path):
    common = (*SYNTHETIC, "method=si", "method.c=10", "dataset.tasks.n_tasks=2", "trainer.max_steps=6",
              "dataset.batch_size=32", "deterministic=true", "save_checkpoints=false")
    states = []
    for k in (1, 4):
        loop = build_loop(tmp_path / f"k{k}", *common, f"steps_per_batch={k}")
        calls = []
        original = loop.module.regularizer.after_optimizer_step
        loop.module.regularizer.after_optimizer_step = lambda module, f=original, calls=calls: (calls.append(1), f(module))
        loop.run()
        assert len(calls) == 12  # 2 tasks × 6 steps
        states.append(loop.module.regularizer.state_dict())
    for name in states[0]["importance"]:
        assert torch.allclose(states[0]["importance"][name], states[1]["importance"][name], rtol=1e-5, atol=1e-9)
    assert any(float(v.abs().max()) > 0 for v in states[0]["importance"].values())


@pytest.mark.slow
def test_resume_mid_task_continues_the_path_integral(tmp_path):
    from tests.test_resume import CrashAtStep, crash_and_resume

    assert crash_and_resume(tmp_path, ["trainer.max_steps=7", "method=si", "method.c=10"], CrashAtStep(10)) == "training"
