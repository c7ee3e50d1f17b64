"""The diagonal Fisher information from exact per-sample gradients, fast: no per-sample loop, no squared batch gradient.

For a classifier with predictive distribution p(y|x,θ) and N samples x_i, the diagonal Fisher is

    F = 1/N · Σ_i E_{y ~ q_i} [ (∂ log p(y|x_i,θ) / ∂θ)² ]

with three choices of the label distribution q_i (the names of van de Ven, "On the computation of the Fisher
Information in continual learning", ICLR 2025 blog track):

- ``exact``: q_i = p(·|x_i,θ), the model's own prediction, summed over all (active) classes — the true Fisher;
- ``sample``: one label drawn from p(·|x_i,θ) per input — an unbiased one-sample estimate of the same quantity;
- ``empirical``: q_i = the data's own label — the "empirical Fisher".

With z the active logits and J_i = ∂z_i/∂θ, ∂ log p(y|x_i)/∂θ = J_iᵀ(e_y − p_i), so every kind is a few backward
passes per batch from the logits: pass k backpropagates Σ_i V_k,i · z_i and yields the per-sample gradients J_iᵀ V_k,i.
``sample`` and ``empirical`` take one pass with V = e_y − p. ``exact`` needs E_y[(J_iᵀ(e_y − p_i))²] = diag(J_iᵀ H_i J_i)
with H = diag(p) − ppᵀ, which has rank C − 1 and a closed-form Cholesky factor H = Σ_k u_k u_kᵀ (Tanabe & Sagae 1992:
u_k = √(p_k s_{k+1}/s_k) e_k − √(p_k/(s_k s_{k+1})) · p_{>k}, s_k = Σ_{j≥k} p_j), so C − 1 passes, one for task-incremental
heads of 2 classes. Only the *sum over samples of squared per-sample gradients* is needed, and it comes cheaply from each
layer's input a_i and the gradient g_i at its output, both recorded by hooks:

- ``nn.Linear`` (2-D input): Σ_i (g_i ⊙ g_i)(a_i ⊙ a_i)ᵀ is one matmul, (g²)ᵀ(a²); the bias gets Σ_i g_i². For ``exact``
  the g² of all passes are summed first, so it is still one matmul per batch. No per-sample tensor exists.
- ``nn.Conv2d``: the per-sample weight gradient is g_i · unfold(a_i)ᵀ, a batched matmul over chunks of a few samples
  whose unfold (a copy of a strided view of the padded input; F.unfold is several times slower on a CPU) is built in
  the chunk's loop, while in cache; on small feature maps with many passes, position pairs (`_position_pairs_sum`);
  the bias is Σ_positions g_i.
- BatchNorm (eval mode, running statistics): the per-sample gradients are Σ_positions g_i ⊙ x̂_i (weight) and
  Σ_positions g_i (bias), with x̂ the input normalised by the running statistics.
- LayerNorm (any normalized_shape, e.g. a transformer's features): per sample Σ_positions g ⊙ x̂ (weight) and
  Σ_positions g (bias), x̂ recomputed from the recorded input.
- ``nn.Embedding``: a sample's gradient row for token v is the sum of g over the positions holding v; the rows of the
  distinct (sample, token) pairs are summed with one index_add, squared, and added into their tokens' rows.
- peft's LoRA layers need nothing of their own: their trainable parts are two ``nn.Linear`` (``lora_A``, ``lora_B``)
  and their frozen ``base_layer`` owns no trainable parameter. Attention (timm's and BERT's) is built of
  ``nn.Linear`` layers, so it is covered too.
- any other layer that owns trainable parameters (e.g. a ViT's ``cls_token`` and ``pos_embed``, owned by the model
  itself): ``torch.func`` ``vmap(grad)`` over samples, for those parameters only — the generic, slow fallback.
  `fisher_coverage` lists them (EWC's Fisher statistics report it).

On a CPU each batch is processed in parts whose largest layer output is a few MiB: huge activations are much slower
to compute (fresh memory, out of cache), and for ``exact`` and ``empirical`` only one part's graph is alive; ``sample``
still draws its labels for the whole batch at once, so the draws do not depend on the parts.

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

from src.models.speed import eager

KINDS = ("exact", "sample", "empirical")
# per-sample gradients are built in chunks of about this many numbers: about cache-sized on a CPU (8 MiB; measured on
# the reduced ResNet-18, 2 to 16 MiB are within 10%), few large kernel launches on an accelerator (128 MiB)
_CPU_CHUNK, _ACCELERATOR_CHUNK = 1 << 21, 1 << 25
# on a CPU a batch is processed in parts whose largest layer output takes about this many bytes (measured on a first
# part of _FIRST_PART samples)
_CPU_PART_BYTES, _FIRST_PART = 8 << 20, 16


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable,
    kind: str = "exact",
    output_fn: Callable | None = None,
    params: dict[str, nn.Parameter] | None = None,
    generator: torch.Generator | None = None,
    coverage: dict | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """The diagonal Fisher of `params` (default: every trainable parameter of `model`), averaged over all samples.

    `batches` yields tuples whose first item is the input; `output_fn(logits, batch) -> (outputs, targets)` picks the
    outputs that form the predictive distribution (e.g. a task's own head) and the targets among them (used by
    ``empirical``); by default the full logits and `batch[1]`. `generator` drives the draws of ``sample``.
    Returns ({name: Fisher}, number of samples), summed over DDP ranks when torch.distributed is initialised.
    A `coverage` dict is filled with how each parameter was computed (`fisher_coverage`'s format, as it happened:
    a layer found to run on a broadcast input, e.g. BERT's position embeddings, moves to the fallback).
    """
    if kind not in KINDS:
        raise ValueError(f"fisher={kind!r} is not one of {', '.join(KINDS)}")
    output_fn = output_fn or (lambda logits, batch: (logits, batch[1]))
    if params is None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    recorder = _Recorder(model, params)
    n = 0
    # eager(): the recording hooks are added now, after a `model.compile=true` backbone was compiled; Dynamo does not
    # guard on hooks, so a compiled forward would skip them and the Fisher would silently be zero (src/models/speed.py)
    with _eval_mode(model), torch.enable_grad(), eager(), recorder:
        for batch in batches:
            if kind == "sample":  # the labels are drawn for the whole batch at once: every part's forward first
                forwards = [recorder.forward(output_fn, part) for part in recorder.parts(batch)]
                drawn = next(_pass_weights(kind, torch.cat([f[1].detach() for f in forwards]), None, generator))
                for f, weights in zip(forwards, drawn.split([len(f[1]) for f in forwards]), strict=True):
                    recorder.finish(f, [weights], 1, output_fn)
                    n += len(f[1])
                continue
            for part in recorder.parts(batch):  # a sample's pass weights are its own: only one part's graph alive
                f = recorder.forward(output_fn, part)
                passes = f[1].shape[1] - 1 if kind == "exact" else 1
                recorder.finish(f, _pass_weights(kind, f[1].detach(), f[2], generator), passes, output_fn)
                n += len(f[1])
    if coverage is not None:
        coverage.clear()
        coverage.update(recorder.coverage())
    sums = recorder.sums
    n = _all_reduce(sums, n)
    if n == 0:
        raise ValueError("the Fisher needs at least one sample: the batches were empty")
    return {name: (sums[name] / n).to(p.dtype) for name, p in params.items()}, n


def _pass_weights(kind: str, logits: torch.Tensor, targets: torch.Tensor, generator):
    """The vectors V (batch × classes) that the backward passes start from at the logits (see the module docstring)."""
    p = F.softmax(logits.double(), dim=1)
    if kind == "exact":
        tail = p.flip(1).cumsum(1).flip(1)  # s_k = Σ_{j≥k} p_j
        tiny = torch.finfo(torch.float64).tiny
        for k in range(p.shape[1] - 1):
            s_k, s_next = tail[:, k].clamp_min(tiny), tail[:, k + 1].clamp_min(tiny)
            u = torch.zeros_like(p)
            u[:, k] = torch.sqrt(p[:, k] * s_next / s_k)
            u[:, k + 1 :] = -p[:, k + 1 :] * torch.sqrt(p[:, k] / (s_k * s_next)).unsqueeze(1)
            yield u.to(logits.dtype)
        return
    if kind == "sample":
        targets = torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    yield (F.one_hot(targets.long(), p.shape[1]) - p).to(logits.dtype)


# ---- which layers are covered, and how ------------------------------------------------------------------------------
def _fast_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return "conv2d"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module.track_running_stats:
        return "batchnorm"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return "embedding"
    return None


def fisher_coverage(model: nn.Module, params: dict[str, nn.Parameter] | None = None) -> dict:
    """How `fisher_diagonal` computes each layer's share: {"fast": {layer type: parameter count}, "fallback": the
    modules (and their parameter names) that take the generic per-sample path}. For the Fisher statistics."""
    if params is None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    wanted = {id(p) for p in params.values()}
    fast: dict[str, int] = {}
    fallback: list[str] = []
    for module_name, module in model.named_modules():
        own = [(local, p) for local, p in module.named_parameters(recurse=False) if id(p) in wanted]
        if not own:
            continue
        kind = _fast_kind(module)
        if kind is None:
            fallback += [f"{module_name}.{local}" if module_name else local for local, _ in own]
        else:
            fast[kind] = fast.get(kind, 0) + sum(p.numel() for _, p in own)
    return {"fast": fast, "fallback": fallback}


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
        self.clone_outputs = False  # set once an in-place op downstream of a recorded layer is seen
        self.part_size = None  # samples per part of a batch (CPU), set from the first forward
        self.batch_size = 0  # of the forward being recorded
        self.handles = []

    def __enter__(self):
        for module_name, (module, _, _) in self.layers.items():
            self.handles.append(module.register_forward_hook(self._hook(module_name)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles, self.records = [], {}

    def coverage(self) -> dict:
        fast: dict[str, int] = {}
        for module, kind, local_names in self.layers.values():
            fast[kind] = fast.get(kind, 0) + sum(getattr(module, local).numel() for local in local_names)
        out = {"fast": fast, "fallback": list(self.fallback_params)}
        if self.fallback_params:
            out["fallback_method"] = "per-sample loop" if getattr(self, "loop_fallback", False) else "torch.func vmap"
        return out

    def _demote(self, module_names) -> None:
        """Layers whose outputs are not per sample (a broadcast input, e.g. BERT's position embeddings of shape
        1 × L × D): their parameters take the per-sample fallback from now on."""
        for module_name in module_names:
            module, _, local_names = self.layers.pop(module_name)
            for local, name in local_names.items():
                self.fallback_params[name] = getattr(module, local)

    def _hook(self, module_name: str):
        def hook(module, inputs, output):
            if not self.recording or module_name not in self.layers:
                return None
            a, expanded = inputs[0].detach(), False
            if self.batch_size > 1 and output.dim() and output.shape[0] == 1 and a.dim() and a.shape[0] == 1:
                # one output for the whole batch, broadcast later (BERT's position embeddings, 1 × L × D): hand the
                # network a per-sample copy, so that its gradient is per sample
                a = a.expand(self.batch_size, *a.shape[1:])
                output, expanded = output.expand(self.batch_size, *output.shape[1:]).clone(), True
            self.records.setdefault(module_name, []).append((a, a._version, output, output._version))
            if expanded:
                return output
            # with `clone_outputs`, the rest of the network gets a copy, so that an in-place op downstream
            # (ReLU(inplace=True), `+=`) cannot change the tensor whose gradient we ask for
            return output.clone() if self.clone_outputs else None

        return hook

    def outputs_modified(self) -> bool:
        """Whether an in-place op changed a recorded layer output after the layer (then: clone, and redo)."""
        return any(rec[2]._version != rec[3] for recs in self.records.values() for rec in recs)

    def start_batch(self) -> None:
        self.records, self.recording, self.batch_sums = {}, True, {}
        self.linear_g2, self.conv_gg, self.conv_padded = {}, {}, {}  # per layer, shared by the passes of a batch
        self.passes = 1

    def parts(self, batch):
        """The batch in parts of a few MiB of activations per layer on a CPU, measured on a first small part: a
        batch's huge activations are slower to compute (fresh memory, out of cache) and all alive at once."""
        size = len(batch[0]) if type(batch) in (tuple, list) and len(batch) and torch.is_tensor(batch[0]) else 0
        if not size or batch[0].device.type != "cpu" or not all(
                torch.is_tensor(t) and t.dim() and len(t) == size for t in batch):
            yield batch
            return
        start = 0
        while start < size:
            step = self.part_size or _FIRST_PART
            yield type(batch)(t[start : start + step] for t in batch)
            start += step

    def forward(self, output_fn, batch):
        """Forward `batch` with recording hooks: (its records, outputs, targets, batch)."""
        self.start_batch()
        self.batch_size = size = len(batch[0])
        outputs, targets = output_fn(self.model(batch[0]), batch)
        shared = [name for name, recs in self.records.items()
                  if any(rec[2].dim() == 0 or rec[2].shape[0] != size for rec in recs)]
        if shared and size > 1:  # a layer that is not per sample: the fallback takes it, and the forward is redone
            self._demote(shared)
            self.start_batch()
            outputs, targets = output_fn(self.model(batch[0]), batch)
        if self.outputs_modified():  # an in-place op downstream: from now on hand the network copies
            self.clone_outputs = True
            self.start_batch()
            outputs, targets = output_fn(self.model(batch[0]), batch)
        self.recording = False
        if self.part_size is None and len(batch[0]):
            largest = max((rec[2].numel() * rec[2].element_size() for recs in self.records.values() for rec in recs),
                          default=0)
            self.part_size = max(1, _CPU_PART_BYTES * len(batch[0]) // max(1, largest))
        return self.records, outputs, targets, batch

    def finish(self, forward, pass_weights, passes: int, output_fn) -> None:
        """The backward passes of one `forward`, then its sums are added."""
        self.records, outputs, _, batch = forward
        self.passes = passes
        for weights in pass_weights:
            self.backward(outputs, weights)
            self.fallback(output_fn, batch, weights)
        self.end_batch()

    def backward(self, logits: torch.Tensor, weights: torch.Tensor) -> None:
        """One backward pass of Σ weights ⊙ logits to every recorded layer output; accumulates the squares."""
        self.recording = False
        names = list(self.records)
        for name in names:
            if len(self.records[name]) != 1:
                raise ValueError(f"layer {name} ran {len(self.records[name])} times in one forward pass; the fast "
                                 "Fisher needs each layer that owns parameters to run once (no weight sharing)")
        if not names:
            return
        outputs = [self.records[name][0][2] for name in names]
        grads = torch.autograd.grad(logits, outputs, grad_outputs=weights, retain_graph=True, allow_unused=True)
        for name, g in zip(names, grads, strict=True):
            if g is None:
                continue
            module, kind, local_names = self.layers[name]
            a, version, _, _ = self.records[name][0]
            if a._version != version:
                raise ValueError(f"the input of layer {name} was modified in place after the layer used it")
            getattr(self, f"_{kind}")(name, module, local_names, a, g.detach())

    def _add(self, name: str, value: torch.Tensor) -> None:
        """Accumulate within a batch in the parameters' precision; `end_batch` adds the batch to the float64 sums."""
        if name in self.batch_sums:
            self.batch_sums[name] += value
        else:
            self.batch_sums[name] = value

    def end_batch(self) -> None:
        for name, (a, g2) in self.linear_g2.items():
            module, _, local_names = self.layers[name]
            if "weight" in local_names:
                self._add(local_names["weight"], g2.T @ (a * a))
            if "bias" in local_names:
                self._add(local_names["bias"], g2.sum(0))
        for name, (a, gg) in self.conv_gg.items():
            module, _, local_names = self.layers[name]
            self._add(local_names["weight"], _position_pairs_sum(gg, _unfold(_pad(a, module), module)).view_as(module.weight))
        for name, value in self.batch_sums.items():
            self.sums[name] += value
        self.start_batch()
        self.recording = False

    # ---- per layer type: add Σ_i (per-sample gradient)² to the sums ----
    def _linear(self, name, module, local_names, a, g):
        if a.dim() == 2:  # factorised: keep Σ_passes g² per sample, one matmul at the end of the batch
            g2 = self.linear_g2.get(name, (a, 0))[1]
            self.linear_g2[name] = (a, g2 + g * g)
            return
        a, g = a.flatten(1, -2), g.flatten(1, -2)  # (B, positions, features): a per-sample sum over positions
        for s in _chunks(len(a), g.shape[-1] * a.shape[-1], a.device):
            if "weight" in local_names:
                per_sample = torch.einsum("bpo,bpi->boi", g[s], a[s])
                self._add(local_names["weight"], per_sample.square().sum(0))
        if "bias" in local_names:
            self._add(local_names["bias"], g.sum(1).square().sum(0))

    def _conv2d(self, name, module, local_names, a, g):
        if "weight" in local_names:
            groups, batch, weight = module.groups, len(a), module.weight
            positions, out_channels = g.shape[2] * g.shape[3], g.shape[1]
            fan_in = weight[0].numel() * groups  # Cin·k, the rows of the unfolded input
            pairs = positions * (positions + 1) // 2
            if groups == 1 and 4 * pairs * (fan_in + out_channels) < self.passes * out_channels * fan_in:
                # small feature map: sum the passes' position-pair products, one matmul per batch (measured rule)
                g_flat = g.reshape(batch, out_channels, positions)
                if name in self.conv_gg:  # all position pairs, in place (cheaper than gathering the pairs l ≤ l')
                    self.conv_gg[name][1].addcmul_(g_flat.unsqueeze(3), g_flat.unsqueeze(2))
                else:
                    self.conv_gg[name] = (a, g_flat.unsqueeze(3) * g_flat.unsqueeze(2))  # (B, Cout, L, L)
            else:
                g_flat = g.reshape(batch, groups, -1, positions)  # (B, G, Cout/G, L)
                if name not in self.conv_padded:  # padded once for all passes
                    self.conv_padded[name] = _pad(a, module)
                padded = self.conv_padded[name]
                # unfold a few samples at a time, while in cache: a whole batch's unfold is 9× its input (memory)
                for s in _chunks(batch, fan_in * positions + weight.numel(), a.device):
                    cols = _unfold(padded[s], module).view(-1, groups, fan_in // groups, positions)
                    per_sample = torch.matmul(cols, g_flat[s].transpose(-1, -2))  # (b, G, Cin/G·k, Cout/G)
                    square = per_sample.square_().sum(0).transpose(-1, -2)
                    self._add(local_names["weight"], square.reshape(weight.shape))
        if "bias" in local_names:
            self._add(local_names["bias"], g.flatten(2).sum(2).square().sum(0))

    def _batchnorm(self, name, module, local_names, a, g):
        # per sample: ∂β = Σ_positions g, ∂γ = Σ_positions g ⊙ (a − μ)/σ = (Σ g ⊙ a − μ ∂β)/σ (running μ, σ)
        g_sum = g.flatten(2).sum(2) if a.dim() > 2 else g
        if "weight" in local_names:
            ga = torch.linalg.vecdot(g.flatten(2), a.flatten(2)) if a.dim() > 2 else g * a
            per_sample = (ga - module.running_mean * g_sum) * torch.rsqrt(module.running_var + module.eps)
            self._add(local_names["weight"], per_sample.square().sum(0))
        if "bias" in local_names:
            self._add(local_names["bias"], g_sum.square().sum(0))

    def _layernorm(self, name, module, local_names, a, g):
        # per sample: ∂β = Σ_positions g, ∂γ = Σ_positions g ⊙ x̂, x̂ = (a − mean)/√(var + ε) over normalized_shape
        dims = tuple(range(a.dim() - len(module.normalized_shape), a.dim()))
        var, mean = torch.var_mean(a, dim=dims, keepdim=True, correction=0)
        positions = tuple(range(1, a.dim() - len(module.normalized_shape)))  # the dimensions between batch and features
        if "weight" in local_names:
            per_sample = g * ((a - mean) * torch.rsqrt(var + module.eps))
            per_sample = per_sample.sum(positions) if positions else per_sample
            self._add(local_names["weight"], per_sample.square().sum(0))
        if "bias" in local_names:
            g_sum = g.sum(positions) if positions else g
            self._add(local_names["bias"], g_sum.square().sum(0))

    def _embedding(self, name, module, local_names, ids, g):
        # per sample, row v of the gradient is Σ over the positions holding token v of g: add g into one row per
        # distinct (sample, token) pair, square, add those rows into their tokens' rows
        if "weight" not in local_names:
            return
        batch = ids.shape[0]
        ids = ids.reshape(batch, -1).long()
        g = g.reshape(batch, ids.shape[1], -1)
        keys = ids + module.num_embeddings * torch.arange(batch, device=ids.device).unsqueeze(1)
        pairs, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
        per_pair = torch.zeros(len(pairs), g.shape[-1], dtype=g.dtype, device=g.device)
        per_pair.index_add_(0, inverse, g.reshape(-1, g.shape[-1]))
        square = torch.zeros_like(module.weight, dtype=g.dtype)
        square.index_add_(0, pairs % module.num_embeddings, per_pair.square_())
        if module.padding_idx is not None:  # the padding row never receives a gradient
            square[module.padding_idx] = 0
        self._add(local_names["weight"], square)

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
            return (outputs[0] * sample[-1]).sum()

        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        values = tuple(detached[name] for name in names)
        try:
            with torch.no_grad():  # torch.func.grad still differentiates inside; no graph to the other parameters
                per_sample = vmap(grad(objective), in_dims=(None,) + (0,) * (len(batch) + 1))(values, *batch, weights)
        except RuntimeError:  # vmap cannot trace data-dependent Python (e.g. transformers' mask checks): one by one
            self.loop_fallback = True
            params = [self.fallback_params[name] for name in names]
            per_sample = [torch.zeros((len(weights), *p.shape), dtype=p.dtype, device=p.device) for p in params]
            for i in range(len(weights)):
                one = tuple(t[i : i + 1] for t in batch)
                outputs, _ = output_fn(self.model(one[0]), one)
                grads = torch.autograd.grad((outputs[0] * weights[i]).sum(), params, allow_unused=True)
                for store, g in zip(per_sample, grads, strict=True):
                    if g is not None:
                        store[i] = g
        for name, g in zip(names, per_sample, strict=True):
            self._add(name, g.square().sum(0))


def _pairs(positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The position pairs l ≤ l' of a feature map with `positions` positions."""
    first, second = torch.triu_indices(positions, positions, device=device)
    return first, second


def _position_pairs_sum(gg: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Σ_i (per-sample conv weight gradient)², from Σ_passes g_il g_il' (gg: B × Cout × L × L) and the unfolded input.

    A per-sample gradient is Σ_l g_il u_ilᵀ over positions l, so its square is Σ_{l,l'} (g_il g_il')(u_il u_il')ᵀ: over
    samples and pairs l ≤ l' (the others twice) one matmul (Cout × B·pairs) @ (B·pairs × Cin·k), and the passes of the
    `exact` kind add up in gg before it, as for a Linear layer (which is the case of one position).
    """
    positions, out_channels, fan_in = cols.shape[-1], gg.shape[1], cols.shape[1]
    first, second = _pairs(positions, cols.device)
    gg = gg[:, :, first, second].transpose(1, 2) * torch.where(first == second, 1.0, 2.0).to(gg.dtype).view(1, -1, 1)
    cols_t = cols.transpose(1, 2)  # (B, L, Cin·k)
    total = 0
    for s in _chunks(len(gg), len(first) * (out_channels + fan_in), gg.device):
        uu = cols_t[s][:, first] * cols_t[s][:, second]  # (b, pairs, Cin·k)
        total = total + gg[s].reshape(-1, out_channels).T @ uu.reshape(-1, fan_in)
    return total


def _pad(a: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    (ph, pw) = conv.padding
    return F.pad(a, (pw, pw, ph, ph)) if ph or pw else a


def _unfold(padded: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """F.unfold for `conv` of its `_pad`ded input (B × Cin·k × L), as a copy of a strided view: F.unfold is several
    times slower on a CPU."""
    (sh, sw), (dh, dw), (kh, kw) = conv.stride, conv.dilation, conv.kernel_size
    b, c, h, w = padded.shape
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    sb, sc, sy, sx = padded.stride()
    view = padded.as_strided((b, c, kh, kw, out_h, out_w), (sb, sc, dh * sy, dw * sx, sh * sy, sw * sx))
    return view.reshape(b, c * kh * kw, out_h * out_w)


def _chunks(batch: int, per_sample_elements: int, device: torch.device):
    budget = _CPU_CHUNK if device.type == "cpu" else _ACCELERATOR_CHUNK
    step = max(1, budget // max(1, per_sample_elements))
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
