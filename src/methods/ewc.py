"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), separate or online (Schwarz et al., ICML 2018).

The loss while task t trains is

    L(θ) = L_task(θ) + (λ/2) · Σ_k Σ_i F_k,i · (θ_i − θ*_k,i)²

- θ*_k: the trainable parameters right after task k; F_k: the diagonal Fisher of task k at θ*_k, the **mean over
  samples of the squared per-sample gradient** of log p(y|x, θ*_k) (`src/methods/fisher.py`). F is a per-sample
  mean, so λ does not depend on the batch size or on how many samples estimate the Fisher; the ½ is there, so the
  penalty's gradient is exactly λ · Σ_k F_k ⊙ (θ − θ*_k). See `docs/ewc.md` for other libraries' λ scales.
- `mode: separate`: every finished task's (F_k, θ*_k) is summed, the formula above. `mode: online`: one running
  Fisher F ← γ·F + F_new and only the latest anchor θ* (Schwarz et al.); γ = 1 keeps every task's Fisher at full
  weight. `gamma` is unused in separate mode.
- `fisher`: which labels y the expectation is over: `exact` (all active classes, weighted by the model's own
  probabilities: the true Fisher, the default), `sample` (one label drawn from the model's prediction per input, with
  a generator seeded from `seed` and the task), `empirical` (the data's labels).
- The Fisher is estimated in `on_task_end` on the finished task's training data (its first `fisher_samples` samples,
  all if null), with the model in **eval mode** (BatchNorm running statistics, no dropout), for every trainable
  parameter. Under DDP every rank estimates on its shard and the sums are all-reduced.
- Outputs: the predictive distribution is the scenario's *active outputs* of the finished task
  (`scenario.eval_view`): task-incremental — that task's own head; class-incremental — all classes seen so far (the
  rows of classes not seen yet get zero Fisher, so the growing head needs no reshaping); domain-incremental — the
  shared head.
- Task-incremental heads: task k's Fisher is non-zero on head k's rows only, so each old head is **penalised** with
  its own task's Fisher; since the task-incremental cross-entropy never touches another task's head, the old heads
  stay at their anchors and their penalty stays zero, i.e. they are effectively frozen. The head being trained has
  zero Fisher from all earlier tasks and is free.

Implementation: Σ_k F_k (θ − θ*_k)² is a quadratic in θ, so the state is one quadratic in both modes: precision
A = Σ_k F_k, centre m = Σ_k F_k θ*_k / A (θ* of the latest task where A = 0) and a constant c, giving
Σ_i A_i (θ_i − m_i)² + c. A finished task updates it in place (in float64, exactly: A' = A + F, m' the A'-weighted mean
of m and θ*, c' = c + Σ A (m − m')² + F (θ* − m')²), so neither a step, a task's end, memory nor a checkpoint grows with
the number of tasks, in separate mode too. A step is a few multi-tensor (`torch._foreach_*`) passes and keeps no
autograd graph (the gradient λ·A ⊙ (θ − m) is computed in the forward pass and handed back in the backward).
A checkpoint written by an older version (one Fisher and anchor per task, `terms`) loads into the same quadratic.

State (the quadratic, the tasks it holds, Fisher statistics) is in `state_dict`, so every checkpoint carries it. `fisher_stats` is a
list with one dict per finished task: mean, max, the fraction of the Fisher's mass in its top 1% of weights, the
number of samples and the seconds the estimate took.
"""

from __future__ import annotations

import inspect
import math
import time

import torch

from src.continual.validate import ConfigError
from src.methods.base import Regularizer
from src.methods.fisher import KINDS, fisher_diagonal

MODES = ("separate", "online")
DEFAULT_LAMBDA = 1e4  # as conf/method/ewc.yaml: measured on Split Fashion-MNIST (experiments/ewc/README.md)


class EWC(Regularizer):
    def __init__(
        self,
        lam: float | None = None,
        mode: str = "separate",
        gamma: float = 1.0,
        fisher: str = "exact",
        fisher_samples: int | None = None,
        fisher_batch_size: int = 500,
        seed: int = 0,
        **kwargs,
    ):
        if "lambda" in kwargs:  # the config key; `lambda` is a Python keyword, so the argument is `lam`
            if lam is not None:
                raise ConfigError("method: give `lambda` or `lam`, not both")
            lam = kwargs.pop("lambda")
        if kwargs:
            from src.continual.overrides import did_you_mean

            key = sorted(kwargs)[0]
            known = ("lambda", *inspect.signature(EWC.__init__).parameters)
            hint = did_you_mean(key, [k for k in known if k not in ("self", "lam", "kwargs")], prefix="method.")
            raise ConfigError(f"method.{key}={kwargs[key]!r} is invalid: unknown key for EWC{hint}")
        lam = DEFAULT_LAMBDA if lam is None else lam
        _check(isinstance(lam, (int, float)) and lam >= 0, "method.lambda", lam, "a number >= 0")
        _check(mode in MODES, "method.mode", mode, f"one of {', '.join(MODES)}")
        _check(isinstance(gamma, (int, float)) and 0 <= gamma <= 1, "method.gamma", gamma, "a number in [0, 1]")
        _check(fisher in KINDS, "method.fisher", fisher, f"one of {', '.join(KINDS)}")
        _check(fisher_samples is None or (isinstance(fisher_samples, int) and fisher_samples >= 1),
               "method.fisher_samples", fisher_samples, "null (all samples) or an integer >= 1")
        _check(isinstance(fisher_batch_size, int) and fisher_batch_size >= 1, "method.fisher_batch_size",
               fisher_batch_size, "an integer >= 1")
        self.lam, self.mode, self.gamma = float(lam), mode, float(gamma)
        self.fisher_kind, self.fisher_samples, self.fisher_batch_size = fisher, fisher_samples, fisher_batch_size
        self.seed = seed
        self.param_names: list[str] | None = None
        # the penalty's quadratic Σ_i A_i (θ_i − m_i)² + c, per parameter name; None before the first task ends
        self.precision: dict[str, torch.Tensor] | None = None  # A
        self.centre: dict[str, torch.Tensor] | None = None  # m
        self.const = 0.0  # c
        self.tasks: list[int] = []  # the finished tasks the quadratic holds
        self.fisher_stats: list[dict] = []
        self._views = None  # ((device, λ), λ·A, m, scratch) as per-parameter lists on the parameters' device
        self._params_cache = None

    # ---- the penalty, every training step ------------------------------------------------------------------------
    def loss(self, module, batch, logits, task_loss):
        if self.precision is None:
            return {"loss": task_loss, "ewc_penalty": torch.zeros((), device=task_loss.device)}
        params = self._params(module)
        scaled_precision, centre, scratch, const = self._on_device(params[0].device)
        penalty = _QuadraticPenalty.apply(scaled_precision, centre, scratch, 0.5 * self.lam * const, *params)
        return {"loss": task_loss + penalty, "ewc_penalty": penalty.detach()}

    def penalty(self, module) -> torch.Tensor:
        """(λ/2) Σ_k Σ_i F_k,i (θ_i − θ*_k,i)² at the module's current parameters (0 before the first task ends)."""
        zero = torch.zeros(())
        return self.loss(module, None, None, zero)["ewc_penalty"] if self.precision is not None else zero

    def _params(self, module) -> list[torch.nn.Parameter]:
        if self._params_cache is None or self._params_cache[0] is not module:
            named = dict(module.named_parameters())
            missing = [n for n in self.param_names if n not in named]
            if missing:
                raise ValueError(f"EWC state names parameters the model does not have: {missing[:5]}")
            self._params_cache = (module, [named[n] for n in self.param_names])
        return self._params_cache[1]

    def _on_device(self, device):
        """(λ·A, m, scratch space for θ − m) as lists of per-parameter tensors on `device`, and c."""
        if self._views is None or self._views[0] != (device, self.lam):
            # contiguous whatever the parameter's memory format (channels_last): the penalty flattens them
            centre = [self.centre[n].to(device).contiguous() for n in self.param_names]
            scaled = [(self.lam * self.precision[n].to(device)).contiguous() for n in self.param_names]
            self._views = ((device, self.lam), scaled, centre, [torch.empty_like(m) for m in centre])
        return self._views[1], self._views[2], self._views[3], self.const

    # ---- the Fisher, at the end of every task ----------------------------------------------------------------------
    def on_task_end(self, task, module, datamodule):
        if self.param_names is None:
            self.param_names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(zip(self.param_names, self._params(module), strict=True))
        device = params[self.param_names[0]].device
        rank = getattr(module, "global_rank", 0)
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + task * 1009 + rank)

        def active_outputs(logits, batch):
            return module.scenario.eval_view(logits, batch[1], batch[2], trained_up_to=task)

        start = time.perf_counter()
        batches = datamodule.task_batches(task, "train", batch_size=self.fisher_batch_size, device=device,
                                          max_samples=self.fisher_samples)
        coverage: dict = {}  # which layers took the fast path, which the per-sample one
        fisher, n = fisher_diagonal(module, batches, self.fisher_kind, active_outputs, params, generator, coverage)
        seconds = time.perf_counter() - start
        anchor = {name: p.detach().clone() for name, p in params.items()}

        self._add_task(task, fisher, anchor)
        self.fisher_stats.append({"task": task, "kind": self.fisher_kind, "n_samples": n, "seconds": seconds,
                                  **fisher_statistics(fisher), "fast_path": coverage["fast"],
                                  "fallback": coverage["fallback"],
                                  **({"fallback_method": coverage["fallback_method"]} if coverage["fallback"] else {})})
        self._log_stats(module)

    def _add_task(self, task: int, fisher: dict, anchor: dict) -> None:
        """Adds the finished task's F (θ − θ*)² to the quadratic (separate), or decays and replaces it (online)."""
        if self.precision is None:  # the first task: A = F, m = θ*, c = 0 in both modes
            self.precision = {n: fisher[n].detach().clone() for n in self.param_names}
            self.centre = {n: anchor[n].detach().clone() for n in self.param_names}
            self.const = 0.0
        elif self.mode == "online":
            self.precision = {n: self.gamma * self.precision[n].to(fisher[n].device) + fisher[n] for n in self.param_names}
            self.centre = {n: anchor[n].detach().clone() for n in self.param_names}
        else:
            added = 0.0
            for n in self.param_names:
                a, m = self.precision[n].to(fisher[n].device).double(), self.centre[n].to(fisher[n].device).double()
                f, theta = fisher[n].double(), anchor[n].double()
                a_new = a + f
                m_new = torch.where(a_new > 0, (a * m + f * theta) / a_new.clamp_min(torch.finfo(torch.float64).tiny),
                                    theta)
                added += float((a * (m - m_new) ** 2).sum() + (f * (theta - m_new) ** 2).sum())
                self.precision[n], self.centre[n] = a_new.to(fisher[n].dtype), m_new.to(anchor[n].dtype)
            self.const += added
        self.tasks.append(task)
        self._views = None

    def _log_stats(self, module) -> None:
        stats = self.fisher_stats[-1]
        values = {f"ewc/fisher_{k}": float(v) for k, v in stats.items()
                  if k not in ("task", "kind") and isinstance(v, (int, float))}
        step = module.trainer.global_step if getattr(module, "_trainer", None) is not None else stats["task"]
        for logger in getattr(module, "loggers", []):
            logger.log_metrics(values, step=step)

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"fisher_stats": [dict(stats) for stats in self.fisher_stats]}

    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()} if d is not None else None  # noqa: E731
        return {"mode": self.mode, "param_names": self.param_names, "tasks": list(self.tasks),
                "precision": cpu(self.precision), "centre": cpu(self.centre), "const": self.const,
                "fisher_stats": [dict(s) for s in self.fisher_stats]}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state["mode"] != self.mode:
            raise ConfigError(f"method.mode={self.mode!r} but the checkpoint was trained with mode={state['mode']!r}")
        self.param_names = state["param_names"]
        self.fisher_stats = [dict(s) for s in state["fisher_stats"]]
        self._params_cache, self._views = None, None
        self.precision, self.centre, self.const, self.tasks = None, None, 0.0, []
        if "terms" in state:  # an older checkpoint: one (F_k, θ*_k) per task (separate) or the running one (online)
            for term in state["terms"]:
                self._add_task(term["tasks"][0], term["fisher"], term["anchor"])
                self.tasks[-1:] = list(term["tasks"])
            return
        if state["precision"] is not None:
            self.precision, self.centre = dict(state["precision"]), dict(state["centre"])
            self.const, self.tasks = float(state["const"]), list(state["tasks"])


class _QuadraticPenalty(torch.autograd.Function):
    """½·Σ_i (λA)_i (θ_i − m_i)² + offset, with λA and m given per parameter; backward: λA ⊙ (θ − m), no graph kept.

    Multi-tensor (`torch._foreach_*`) kernels: a few passes over the parameters per step, whatever their number. The
    gradient is computed in the forward pass and handed over once (a second backward through the same step raises)."""

    @staticmethod
    def forward(ctx, scaled_precision, centre, scratch, offset, *params):
        diff = scratch  # reused every step: a fresh 2 MB tensor costs more (allocation, page faults) than the math
        for p, m, d in zip(params, centre, diff, strict=True):
            torch.sub(p.detach(), m, out=d)
        weighted = torch._foreach_mul(diff, scaled_precision)  # the gradient, λA ⊙ (θ − m): fresh, autograd keeps it
        value = torch.stack([torch.dot(d.view(-1), w.view(-1)) for d, w in zip(diff, weighted, strict=True)]).sum()
        ctx.gradient = weighted
        return 0.5 * value + offset

    @staticmethod
    def backward(ctx, grad):
        gradient = ctx.gradient
        del ctx.gradient
        if grad.device.type != "cpu" or float(grad) != 1.0:  # scaled losses (mixed precision); 1 needs no pass
            gradient = torch._foreach_mul(gradient, grad)
        return (None, None, None, None, *gradient)


def fisher_statistics(fisher: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean, max, and the fraction of the total Fisher mass held by the top 1% of weights."""
    flat = torch.cat([f.detach().reshape(-1).double() for f in fisher.values()])
    total = float(flat.sum())
    k = max(1, math.ceil(0.01 * flat.numel()))
    top = float(flat.topk(k).values.sum())
    return {"mean": float(flat.mean()), "max": float(flat.max()), "top1pct_mass": top / total if total > 0 else 0.0}


def _check(condition: bool, key: str, value, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")
