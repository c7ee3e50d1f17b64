"""What SI and MAS share: a per-parameter importance Ω and one anchor θ*, and the penalty s · Σ_i Ω_i (θ_i − θ*_i)².

Both papers write the penalty without EWC's ½ (Zenke et al. 2017 eq. 4: c Σ Ω (θ − θ̃)²; Aljundi et al. 2018 eq. 3:
λ Σ Ω (θ − θ*)²), so its gradient is 2 s Ω ⊙ (θ − θ*). Ω is summed over the finished tasks and θ* is the parameters
at the end of the latest one. The parameters are every trainable parameter of the module, by name (state_dict
holds names and CPU tensors, so a checkpoint restores onto any device).
"""

from __future__ import annotations

import torch

from src.continual.validate import ConfigError
from src.methods.base import Regularizer
from src.methods.ewc import _QuadraticPenalty


def check_number(key: str, value, allowed: str = "a number >= 0", positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ConfigError(f"method.{key}={value!r} is invalid: {allowed}")
    return float(value)


class ImportancePenalty(Regularizer):
    #: the name of the penalty term in the logs (train/<name>)
    term = "penalty"

    def __init__(self, strength: float):
        self.strength = strength
        self.param_names: list[str] | None = None
        self.importance: dict[str, torch.Tensor] = {}  # Ω, summed over finished tasks
        self.anchor: dict[str, torch.Tensor] = {}  # θ* after the latest finished task
        self._params = None  # (module, its trainable parameters)
        self._cache = None  # (device, Ω list, θ* list) on the parameters' device

    def params(self, module) -> list[torch.nn.Parameter]:
        """The trainable parameters, in `param_names` order (fixed at the first call)."""
        if self._params is None or self._params[0] is not module:
            if self.param_names is None:
                self.param_names = [n for n, p in module.named_parameters() if p.requires_grad]
            named = dict(module.named_parameters())
            self._params = (module, [named[n] for n in self.param_names])
        return self._params[1]

    def _on_device(self, module):
        """(parameters, 2sΩ, θ*, scratch space) as lists on the parameters' device (made once per device)."""
        params = self.params(module)
        device = params[0].device
        if self._cache is None or self._cache[0] != device:
            anchor = [self.anchor[n].to(device) for n in self.param_names]
            self._cache = (device, [2 * self.strength * self.importance[n].to(device) for n in self.param_names],
                           anchor, [torch.empty_like(a) for a in anchor])
        return params, *self._cache[1:]

    def penalty_gradient(self, module, at: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """2 s Ω ⊙ (θ − θ*) at parameters `at` (None before the first task has ended: no penalty)."""
        if not self.importance:
            return None
        _, scaled, anchor, _ = self._on_device(module)
        return torch._foreach_mul(torch._foreach_sub(at, anchor), scaled)

    def loss(self, module, batch, logits, task_loss):
        if not self.importance:
            return {"loss": task_loss, self.term: torch.zeros((), device=task_loss.device)}
        params, scaled, anchor, scratch = self._on_device(module)
        # ½ Σ (2sΩ)(θ − θ*)²: EWC's multi-tensor quadratic, its gradient computed in the forward, no graph kept
        penalty = _QuadraticPenalty.apply(scaled, anchor, scratch, 0.0, *params)
        return {"loss": task_loss + penalty, self.term: penalty.detach()}

    def consolidate(self, module, new_importance: dict[str, torch.Tensor]) -> None:
        """Add a finished task's importance to Ω and move the anchor to the current parameters."""
        for name, p in zip(self.param_names, self.params(module), strict=True):
            value = new_importance[name].detach().to("cpu")
            self.importance[name] = self.importance[name] + value if name in self.importance else value
            self.anchor[name] = p.detach().to("cpu").clone()
        self._cache = None

    def summary(self) -> dict:
        if not self.importance:
            return {}
        flat = torch.cat([v.reshape(-1) for v in self.importance.values()])
        return {"importance_mean": float(flat.mean()), "importance_max": float(flat.max())}

    def state_dict(self) -> dict:
        return {"param_names": self.param_names, "importance": dict(self.importance), "anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.param_names = state["param_names"]
        self.importance, self.anchor = dict(state["importance"]), dict(state["anchor"])
        self._cache = self._params = None
