"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017): importance from each parameter's contribution to the
drop of the loss along the training trajectory.

While task k trains, after every optimizer step (`Regularizer.after_optimizer_step`)

    ω_i ← ω_i − g_i · Δθ_i,        Δθ = θ after the step − θ before it,

with g the gradient of the **task loss alone** at θ before the step — the reference code's `unreg_grads`
(github.com/ganguli-lab/pathint: `loss_accum ← prev − unreg_grads · delta`); the paper's ω is the path integral of
the task loss's gradient. The module hands over the gradient of the total loss, so the penalty's own gradient,
2c·Ω ⊙ (θ − θ*) at θ before the step, is subtracted exactly (it is a closed form; no second backward). At the end
of task k, with Δ_k = θ at its end − θ at its start,

    Ω ← Ω + ω / (Δ_k² + ξ),   θ* ← θ,   ω ← 0,

and while later tasks train the loss is L_task + c · Σ_i Ω_i (θ_i − θ*_i)² (`src/methods/importance.py`; the
paper's form, no ½). Ω is not clipped: a parameter whose steps went against its gradient (ω < 0, rare) gets a
negative importance, as in the paper and the reference code.

Δθ is what the optimizer did (Adam, momentum, clipping all included), g is `p.grad` as the optimizer saw it. Under
DDP that gradient is already the all-reduced mean over ranks and every rank takes the same step, so ω, Ω and θ* are
identical on every rank with no communication of their own. State (ω, θ at the task start and at the last step, Ω,
θ*) is in `state_dict`: a run resumed in the middle of a task continues the same path integral.
"""

from __future__ import annotations

import torch

from src.methods.importance import ImportancePenalty, check_number


class SI(ImportancePenalty):
    term = "si_penalty"

    def __init__(self, c: float = 1000.0, xi: float = 0.1):
        super().__init__(check_number("c", c))
        self.xi = check_number("xi", xi, "a number > 0", positive=True)
        self.omega: list[torch.Tensor] | None = None  # ω of the task being trained
        self.previous: list[torch.Tensor] | None = None  # θ before the next step
        self.start: list[torch.Tensor] | None = None  # θ at the start of the task being trained

    def on_task_start(self, task, module, datamodule) -> None:
        params = [p.detach() for p in self.params(module)]
        self.start = [p.clone() for p in params]
        self.previous = [p.clone() for p in params]
        self.omega = [torch.zeros_like(p) for p in params]

    def after_optimizer_step(self, module) -> None:
        params = [p.detach() for p in self.params(module)]
        if self.previous[0].device != params[0].device:  # restored from a checkpoint (CPU)
            self.start, self.previous, self.omega = ([t.to(params[0].device) for t in ts]
                                                     for ts in (self.start, self.previous, self.omega))
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params(module)]
        penalty = self.penalty_gradient(module, self.previous)
        task_grads = torch._foreach_sub(grads, penalty) if penalty is not None else grads
        delta = torch._foreach_sub(params, self.previous)
        torch._foreach_addcmul_(self.omega, task_grads, delta, value=-1.0)
        torch._foreach_copy_(self.previous, params)

    def on_task_end(self, task, module, datamodule) -> None:
        params = [p.detach() for p in self.params(module)]
        new = {}
        for name, p, start, omega in zip(self.param_names, params, self.start, self.omega, strict=True):
            new[name] = omega / ((p - start).square() + self.xi)
        self.consolidate(module, new)
        self.omega = self.previous = self.start = None

    def state_dict(self) -> dict:
        cpu = lambda ts: None if ts is None else [t.detach().cpu().clone() for t in ts]  # noqa: E731
        return {**super().state_dict(), "omega": cpu(self.omega), "previous": cpu(self.previous),
                "start": cpu(self.start)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state:
            self.omega, self.previous, self.start = state["omega"], state["previous"], state["start"]
