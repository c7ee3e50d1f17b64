"""Memory Aware Synapses (Aljundi et al., ECCV 2018): importance = how much the output moves when a parameter does,
measured without labels.

At the end of task k, on that task's training data (the paper's choice; `samples` limits it to the first ones):

    Ω_k,i = (1/N) Σ_n | ∂ ‖f(x_n)‖²₂ / ∂θ_i |

per sample, as the paper says (the absolute value of each sample's gradient, then the mean: the gradient of a
batch's summed norm would let samples cancel). f is the scenario's active outputs of the finished task
(`scenario.eval_view`, the logits before any softmax): task-incremental — that task's own head; class-incremental —
all classes seen so far; domain-incremental — the shared head. Computed in eval mode (BatchNorm running statistics,
no dropout) with `torch.func` per-sample gradients (one vmapped pass per batch, any backbone). Ω ← Ω + Ω_k and
θ* ← θ; the loss of later tasks is L_task + λ · Σ_i Ω_i (θ_i − θ*_i)² (`src/methods/importance.py`, the paper's
eq. 3, no ½).

Under DDP each rank computes the sums on its shard of the task (`datamodule.task_batches`) and the sums and sample
counts are all-reduced, as EWC's Fisher is (`src.methods.fisher._all_reduce`), so every rank holds the same Ω.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from src.continual.validate import ConfigError
from src.methods.fisher import _all_reduce, _eval_mode
from src.methods.importance import ImportancePenalty, check_number


def mas_importance(module, batches, active_outputs, params: dict[str, torch.nn.Parameter]):
    """(Σ_n |∂‖f(x_n)‖²/∂θ| per parameter, N) over `batches` of (x, label, task id); `active_outputs(logits, batch)`
    picks f's outputs from the module's logits.

    In eval mode sample n's output depends on sample n only, so one backward of Σ_n ‖f(x_n)‖² gives each sample's
    gradient at every layer output. For an `nn.Linear` on (batch, features) inputs the per-sample weight gradient is
    the outer product g_n a_nᵀ, and |g_n a_nᵀ| = |g_n| |a_n|ᵀ: the sum over samples is one matmul |G|ᵀ|A| (exact).
    Every other parameter gets its per-sample gradients from `torch.func` (vmap of grad) — same result, slower."""
    names = list(params)
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    by_id = {id(p): name for name, p in params.items()}
    linear = {}  # layer -> (weight name or None, bias name or None)
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            w, b = by_id.get(id(layer.weight)), by_id.get(id(layer.bias)) if layer.bias is not None else None
            if w or b:
                linear[layer] = (w, b)
    captured: dict = {}

    def save(layer, inputs, output):
        if inputs[0].dim() == 2 and output.requires_grad:
            captured[layer] = inputs[0].detach()
            output.register_hook(lambda g, layer=layer: captured.__setitem__(layer, (captured[layer], g.detach())))

    handles = [layer.register_forward_hook(save) for layer in linear]
    n = 0
    try:
        with _eval_mode(module):
            for x, y, t in batches:
                captured.clear()
                with torch.enable_grad():
                    outputs = active_outputs(module(x), (x, y, t))
                    trainable = [params[k] for k in names]
                    torch.autograd.grad(outputs.square().sum(), trainable, allow_unused=True)
                covered = set()
                for layer, value in captured.items():
                    if not isinstance(value, tuple):  # its input was not (batch, features): left to the fallback
                        continue
                    a, g = value
                    w, b = linear[layer]
                    if w:
                        sums[w] += g.abs().T @ a.abs()
                        covered.add(w)
                    if b:
                        sums[b] += g.abs().sum(0)
                        covered.add(b)
                rest = [k for k in names if k not in covered]
                if rest:
                    _per_sample_fallback(module, active_outputs, params, rest, (x, y, t), sums)
                n += len(y)
    finally:
        for h in handles:
            h.remove()
    return sums, n


def _per_sample_fallback(module, active_outputs, params, rest: list[str], batch, sums) -> None:
    values = tuple(params[k].detach() for k in rest)

    def squared_norm(values, x, y, t):
        logits = functional_call(module, dict(zip(rest, values, strict=True)), (x[None],))
        return active_outputs(logits, (x[None], y[None], t[None])).square().sum()

    with torch.no_grad():
        per_sample = vmap(grad(squared_norm), in_dims=(None, 0, 0, 0))(values, *batch)
    for name, g in zip(rest, per_sample, strict=True):
        sums[name] += g.abs().sum(0)


class MAS(ImportancePenalty):
    term = "mas_penalty"

    def __init__(self, batch_size: int = 500, samples: int | None = None, **kwargs):
        super().__init__(check_number("lambda", kwargs.pop("lambda", 1.0)))
        if kwargs:
            raise ConfigError(f"method: unknown key(s) {', '.join(sorted(kwargs))} for MAS")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"method.batch_size={batch_size!r} is invalid: an integer >= 1")
        if samples is not None and not (isinstance(samples, int) and samples >= 1):
            raise ConfigError(f"method.samples={samples!r} is invalid: null (all samples) or an integer >= 1")
        self.batch_size, self.samples = batch_size, samples

    def on_task_end(self, task, module, datamodule) -> None:
        trainable = self.params(module)
        params = dict(zip(self.param_names, trainable, strict=True))
        device = next(iter(params.values())).device

        def active_outputs(logits, batch):
            return module.scenario.eval_view(logits, batch[1], batch[2], trained_up_to=task)[0]

        batches = datamodule.task_batches(task, "train", batch_size=self.batch_size, device=device,
                                          max_samples=self.samples)
        sums, n = mas_importance(module, batches, active_outputs, params)
        n = _all_reduce(sums, n)
        self.consolidate(module, {name: s / max(n, 1) for name, s in sums.items()})
