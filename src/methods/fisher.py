"""The diagonal Fisher information from exact per-sample gradients, fast: no per-sample loop, no squared batch gradient.

For a classifier with predictive distribution p(y|x,θ) and N samples x_i, the diagonal Fisher is

    F = 1/N · Σ_i E_{y ~ q_i} [ (∂ log p(y|x_i,θ) / ∂θ)² ]

with three choices of the label distribution q_i (the names of van de Ven, "On the computation of the Fisher
Information in continual learning", ICLR 2025 blog track):

- ``exact``: q_i = p(·|x_i,θ), the model's own prediction, summed over all (active) classes — the true Fisher;
- ``sample``: one label drawn from p(·|x_i,θ) per input — an unbiased one-sample estimate of the same quantity;
- ``empirical``: q_i = the data's own label — the "empirical Fisher".

Every kind is a handful of backward passes per batch: pass k backpropagates Σ_i Σ_c V_ic · log p_ic for a weight matrix V
(one-hot labels for ``sample``/``empirical``; √p_ic on class c only, for each active class c, for ``exact``), so that the
per-sample gradient of pass k is √(weight) times the gradient of one log-probability and its square carries the weight.
Only the *sum over samples of squared per-sample gradients* is needed, and it comes cheaply from each layer's input a_i
and the gradient g_i at its output, both recorded by hooks:

- ``nn.Linear`` (2-D input): Σ_i (g_i ⊙ g_i)(a_i ⊙ a_i)ᵀ is one matmul, (g²)ᵀ(a²); the bias gets Σ_i g_i². For ``exact``
  the g² of all passes are summed first, so it is still one matmul per batch. No per-sample tensor exists.
- ``nn.Conv2d``: the per-sample weight gradient is g_i · unfold(a_i)ᵀ, a batched matmul over chunks of samples;
  the bias is Σ_positions g_i.
- BatchNorm (eval mode, running statistics): the per-sample gradients are Σ_positions g_i ⊙ x̂_i (weight) and
  Σ_positions g_i (bias), with x̂ the input normalised by the running statistics.
- any other layer that owns trainable parameters: ``torch.func`` ``vmap(grad)`` over samples, for those parameters
  only — the generic, slow fallback.

Per-sample gradients are only separable like this when samples do not interact, so the model runs in eval mode
(BatchNorm uses its running statistics, dropout is off) and is put back in its previous modes afterwards; running
statistics are not touched. Under DDP (``torch.distributed`` initialised) every rank sums over its shard and the sums
and the sample count are all-reduced, so the result equals the single-process estimate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

KINDS = ("exact", "sample", "empirical")
_CHUNK_ELEMENTS = 1 << 24  # per-sample conv gradients are built in chunks of at most this many numbers (64 MiB)


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable,
    kind: str = "exact",
    output_fn: Callable | None = None,
    params: dict[str, nn.Parameter] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """The diagonal Fisher of `params` (default: every trainable parameter of `model`), averaged over all samples.

    `batches` yields tuples whose first item is the input; `output_fn(logits, batch) -> (outputs, targets)` picks the
    outputs that form the predictive distribution (e.g. a task's own head) and the targets among them (used by
    ``empirical``); by default the full logits and `batch[1]`. `generator` drives the draws of ``sample``.
    Returns ({name: Fisher}, number of samples), summed over DDP ranks when torch.distributed is initialised.
    """
    if kind not in KINDS:
        raise ValueError(f"fisher={kind!r} is not one of {', '.join(KINDS)}")
    output_fn = output_fn or (lambda logits, batch: (logits, batch[1]))
    if params is None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    recorder = _Recorder(model, params)
    n = 0
    with _eval_mode(model), torch.enable_grad(), recorder:
        for batch in batches:
            recorder.start_batch()
            outputs, targets = output_fn(model(batch[0]), batch)
            log_probs = F.log_softmax(outputs, dim=1)
            for weights in _pass_weights(kind, log_probs.detach(), targets, generator):
                recorder.backward(log_probs, weights)
                recorder.fallback(output_fn, batch, weights)
            recorder.end_batch()
            n += len(outputs)
    sums = recorder.sums
    n = _all_reduce(sums, n)
    if n == 0:
        raise ValueError("the Fisher needs at least one sample: the batches were empty")
    return {name: (sums[name] / n).to(p.dtype) for name, p in params.items()}, n


def _pass_weights(kind: str, log_probs: torch.Tensor, targets: torch.Tensor, generator):
    """The weight matrices V (batch × classes) of the backward passes: pass k backpropagates Σ V ⊙ log p."""
    if kind == "exact":
        root_p = log_probs.mul(0.5).exp()
        for c in range(log_probs.shape[1]):
            weights = torch.zeros_like(log_probs)
            weights[:, c] = root_p[:, c]
            yield weights
        return
    if kind == "sample":
        targets = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
    yield F.one_hot(targets.long(), log_probs.shape[1]).to(log_probs.dtype)


# ---- which layers are covered, and how ------------------------------------------------------------------------------
def _fast_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return "conv2d"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module.track_running_stats:
        return "batchnorm"
    return None


class _Recorder:
    """Hooks on the layers that own `params`: records (input, output) in the forward pass, accumulates Σ_i (∂_i)²."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]):
        self.model = model
        owner = {}
        for module_name, module in model.named_modules():
            for local, p in module.named_parameters(recurse=False):
                owner[id(p)] = (module_name, module, local)
        self.layers: dict[str, tuple[nn.Module, str, dict[str, str]]] = {}  # module name -> (module, kind, local→name)
        self.fallback_params: dict[str, nn.Parameter] = {}
        for name, p in params.items():
            if id(p) not in owner:
                raise ValueError(f"parameter {name} does not belong to the model")
            module_name, module, local = owner[id(p)]
            kind = _fast_kind(module)
            if kind is None:
                self.fallback_params[name] = p
            else:
                self.layers.setdefault(module_name, (module, kind, {}))[2][local] = name
        self.sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
        self.records: dict[str, list] = {}
        self.recording = False
        self.handles = []

    def __enter__(self):
        for module_name, (module, _, _) in self.layers.items():
            self.handles.append(module.register_forward_hook(self._hook(module_name)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles, self.records = [], {}

    def _hook(self, module_name: str):
        def hook(module, inputs, output):
            if not self.recording:
                return None
            self.records.setdefault(module_name, []).append((inputs[0].detach(), inputs[0]._version, output))
            # the rest of the network gets a copy, so that an in-place op downstream (ReLU(inplace=True), `+=`)
            # cannot change the tensor whose gradient we ask for
            return output.clone()

        return hook

    def start_batch(self) -> None:
        self.records, self.recording, self.linear_g2 = {}, True, {}

    def backward(self, log_probs: torch.Tensor, weights: torch.Tensor) -> None:
        """One backward pass of Σ weights ⊙ log_probs to every recorded layer output; accumulates the squares."""
        self.recording = False
        names = list(self.records)
        for name in names:
            if len(self.records[name]) != 1:
                raise ValueError(f"layer {name} ran {len(self.records[name])} times in one forward pass; the fast "
                                 "Fisher needs each layer that owns parameters to run once (no weight sharing)")
        if not names:
            return
        outputs = [self.records[name][0][2] for name in names]
        grads = torch.autograd.grad(log_probs, outputs, grad_outputs=weights, retain_graph=True, allow_unused=True)
        for name, g in zip(names, grads, strict=True):
            if g is None:
                continue
            module, kind, local_names = self.layers[name]
            a, version, _ = self.records[name][0]
            if a._version != version:
                raise ValueError(f"the input of layer {name} was modified in place after the layer used it")
            getattr(self, f"_{kind}")(name, module, local_names, a, g.detach())

    def end_batch(self) -> None:
        for name, (a, g2) in self.linear_g2.items():
            module, _, local_names = self.layers[name]
            if "weight" in local_names:
                self.sums[local_names["weight"]] += (g2.T @ (a * a)).to(torch.float64)
            if "bias" in local_names:
                self.sums[local_names["bias"]] += g2.sum(0).to(torch.float64)
        self.records, self.linear_g2, self.recording = {}, {}, False

    # ---- per layer type: add Σ_i (per-sample gradient)² to the sums ----
    def _linear(self, name, module, local_names, a, g):
        if a.dim() == 2:  # factorised: keep Σ_passes g² per sample, one matmul at the end of the batch
            g2 = self.linear_g2.get(name, (a, 0))[1]
            self.linear_g2[name] = (a, g2 + g * g)
            return
        a, g = a.flatten(1, -2), g.flatten(1, -2)  # (B, positions, features): a per-sample sum over positions
        for s in _chunks(len(a), g.shape[-1] * a.shape[-1]):
            if "weight" in local_names:
                per_sample = torch.einsum("bpo,bpi->boi", g[s], a[s])
                self.sums[local_names["weight"]] += per_sample.square().sum(0).to(torch.float64)
        if "bias" in local_names:
            self.sums[local_names["bias"]] += g.sum(1).square().sum(0).to(torch.float64)

    def _conv2d(self, name, module, local_names, a, g):
        if "weight" in local_names:
            groups, batch = module.groups, len(a)
            weight = module.weight
            cols = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, Cin·k, L)
            cols = cols.view(batch, groups, -1, cols.shape[-1])
            g_flat = g.reshape(batch, groups, -1, cols.shape[-1])  # (B, G, Cout/G, L)
            for s in _chunks(batch, weight.numel()):
                per_sample = torch.matmul(g_flat[s], cols[s].transpose(-1, -2))  # (b, G, Cout/G, Cin/G·k)
                self.sums[local_names["weight"]] += per_sample.square().sum(0).reshape(weight.shape).to(torch.float64)
        if "bias" in local_names:
            self.sums[local_names["bias"]] += g.flatten(2).sum(2).square().sum(0).to(torch.float64)

    def _batchnorm(self, name, module, local_names, a, g):
        shape = (1, -1) + (1,) * (a.dim() - 2)
        if "weight" in local_names:
            x_hat = (a - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
            per_sample = (g * x_hat).flatten(2).sum(2) if a.dim() > 2 else g * x_hat
            self.sums[local_names["weight"]] += per_sample.square().sum(0).to(torch.float64)
        if "bias" in local_names:
            per_sample = g.flatten(2).sum(2) if a.dim() > 2 else g
            self.sums[local_names["bias"]] += per_sample.square().sum(0).to(torch.float64)

    # ---- the generic fallback ----
    def fallback(self, output_fn, batch, weights) -> None:
        """Per-sample gradients of the parameters no hook covers, with torch.func (one vmapped pass per call)."""
        if not self.fallback_params:
            return
        from torch.func import functional_call, grad, vmap

        self.recording = False
        names = list(self.fallback_params)
        detached = {name: self.fallback_params[name].detach() for name in names}

        def objective(values, *sample):
            one = tuple(t.unsqueeze(0) for t in sample[:-1])
            logits = functional_call(self.model, dict(zip(names, values, strict=True)), (one[0],))
            outputs, _ = output_fn(logits, one)
            return (F.log_softmax(outputs, dim=1)[0] * sample[-1]).sum()

        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        values = tuple(detached[name] for name in names)
        with torch.no_grad():  # torch.func.grad still differentiates inside; no graph to the other parameters
            per_sample = vmap(grad(objective), in_dims=(None,) + (0,) * (len(batch) + 1))(values, *batch, weights)
        for name, g in zip(names, per_sample, strict=True):
            self.sums[name] += g.square().sum(0).to(torch.float64)


def _chunks(batch: int, per_sample_elements: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample_elements))
    return [slice(i, i + step) for i in range(0, batch, step)]


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration; afterwards every submodule gets back its own previous mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _all_reduce(sums: dict[str, torch.Tensor], n: int) -> int:
    """Sum the per-rank sums and sample counts over DDP ranks (in place); returns the total count."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    tensors = list(sums.values())
    device = tensors[0].device if tensors else torch.device("cpu")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors] + [torch.tensor([float(n)], dtype=torch.float64,
                                                                                  device=device)])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return int(round(flat[-1].item()))
