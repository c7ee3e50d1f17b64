"""The fast diagonal Fisher against its closed form, a slow explicit per-sample loop, and two processes (gloo)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.continual.scenarios import ClassIncremental, TaskIncremental
from src.methods.fisher import KINDS, fisher_diagonal
from src.models.convnet import ConvNet
from src.models.mlp import MLP


class Net(nn.Module):
    """backbone + one linear head, like ContinualModule."""

    def __init__(self, backbone, n_outputs):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.out_features, n_outputs)

    def forward(self, x):
        return self.head(self.backbone(x))


class OddLayers(nn.Module):
    """Layers no hook covers (LayerNorm, a raw parameter), an in-place ReLU and a grouped conv."""

    def __init__(self, input_shape):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, stride=2, groups=2, bias=False)
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.out_features = 4

    def forward(self, x):
        h = torch.relu_(self.conv(x))
        h = self.grouped(h).mean((2, 3))
        return self.norm(h) * self.scale


def make_batches(n=24, shape=(1, 8, 8), n_tasks=3, batch_size=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    labels = torch.randint(0, 2, (n,), generator=g)
    task_ids = torch.randint(0, n_tasks, (n,), generator=g)
    return [(x[i : i + batch_size], labels[i : i + batch_size], task_ids[i : i + batch_size])
            for i in range(0, n, batch_size)]


def randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that eval mode matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def make_model(name, shape=(1, 8, 8), n_outputs=6, seed=0):
    torch.manual_seed(seed)
    backbone = {"mlp": lambda: MLP(shape, hidden=(16, 12)),
                "conv": lambda: ConvNet(shape, channels=(4, 6), batch_norm=True),
                # a wide last layer on a 2×2 map: it takes the position-pairs path of the conv Fisher
                "wideconv": lambda: ConvNet(shape, channels=(16, 128), batch_norm=True),
                "odd": lambda: OddLayers(shape)}[name]()
    return randomise_batchnorm(Net(backbone, n_outputs).double())


def task_view(logits, batch):
    return TaskIncremental(3, 2).eval_view(logits, batch[1], batch[2], trained_up_to=2)


def class_view(logits, batch):  # two tasks seen: 4 of the 6 outputs are active
    return ClassIncremental(3, 2).eval_view(logits, batch[1], batch[2].clamp(max=1), trained_up_to=1)


def draw_labels(model, batches, output_fn, seed):
    """The labels `sample` draws: one per input from the model's prediction, in batch order, with a seeded generator."""
    g, drawn = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        model.eval()
        for batch in batches:
            outputs, _ = output_fn(model(batch[0]), batch)
            drawn.append(torch.multinomial(F.softmax(outputs, 1), 1, generator=g).squeeze(1))
    return drawn


def slow_fisher(model, batches, kind, output_fn, sampled=None):
    """The definition, one sample and one class at a time: mean_i E_y[(∂ log p(y|x_i) / ∂θ)²]."""
    model.eval()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    n = 0
    for b, batch in enumerate(batches):
        for i in range(len(batch[0])):
            one = tuple(t[i : i + 1] for t in batch)
            outputs, target = output_fn(model(one[0]), one)
            log_p = F.log_softmax(outputs, 1)[0]
            if kind == "exact":
                terms = [(log_p[c], log_p[c].exp().item()) for c in range(len(log_p))]
            else:
                label = sampled[b][i] if kind == "sample" else target[0]
                terms = [(log_p[label], 1.0)]
            for objective, weight in terms:
                grads = torch.autograd.grad(objective, list(params.values()), retain_graph=True, allow_unused=True)
                for name, g in zip(params, grads, strict=True):
                    if g is not None:
                        sums[name] += weight * g**2
            n += 1
    return {name: s / n for name, s in sums.items()}


def assert_same(fast, slow, tol=1e-6):
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=tol, atol=tol * 1e-2, msg=name)


# ---- closed form ----------------------------------------------------------------------------------------------------
def test_exact_fisher_of_linear_softmax_model_matches_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    x = torch.randn(50, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (50,))
    fisher, n = fisher_diagonal(model, [(x[:20], y[:20]), (x[20:], y[20:])], kind="exact")
    p = torch.softmax(model(x), 1).detach()
    v = p * (1 - p)  # F[W_cd] = mean p_c(1-p_c) x_d², F[b_c] = mean p_c(1-p_c)
    assert n == 50
    torch.testing.assert_close(fisher["weight"], (v.T @ x**2) / 50, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(fisher["bias"], v.mean(0), rtol=1e-6, atol=1e-12)

    empirical, _ = fisher_diagonal(model, [(x, y)], kind="empirical")
    r2 = (F.one_hot(y, 4) - p) ** 2  # the data's label: (1[y=c] - p_c)²
    torch.testing.assert_close(empirical["weight"], (r2.T @ x**2) / 50, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(empirical["bias"], r2.mean(0), rtol=1e-6, atol=1e-12)


# ---- fast == slow -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch,view", [("mlp", task_view), ("conv", task_view), ("conv", class_view),
                                       ("wideconv", class_view), ("odd", task_view)])
def test_fast_fisher_equals_per_sample_loop(arch, view, kind):
    model, batches = make_model(arch), make_batches()
    sampled = draw_labels(model, batches, view, seed=3) if kind == "sample" else None
    fast, n = fisher_diagonal(model, batches, kind, output_fn=view, generator=torch.Generator().manual_seed(3))
    assert n == 24
    slow = slow_fisher(model, batches, kind, view, sampled)
    assert_same(fast, slow)
    assert all(f.dtype == p.dtype for f, p in zip(fast.values(), model.parameters(), strict=True))
    assert sum(float(f.sum()) for f in fast.values()) > 0


def test_task_heads_get_fisher_only_from_their_own_task():
    model, batches = make_model("mlp"), make_batches()
    only_task_1 = [(x[t == 1], y[t == 1], t[t == 1]) for x, y, t in batches]
    fisher, _ = fisher_diagonal(model, only_task_1, "exact", output_fn=task_view)
    rows = fisher["head.weight"].abs().sum(1)
    assert (rows[2:4] > 0).all() and (rows[:2] == 0).all() and (rows[4:] == 0).all()


def test_squared_batch_gradient_is_not_what_we_compute():
    """The classic bug: (mean of gradients)² is much smaller than mean of squared per-sample gradients."""
    model, batches = make_model("mlp"), make_batches(n=40, batch_size=40)
    fast, _ = fisher_diagonal(model, batches, "empirical", output_fn=task_view)
    x, y, t = batches[0]
    model.zero_grad()
    outputs, targets = task_view(model(x), batches[0])
    F.cross_entropy(outputs, targets).backward()
    batch_squared = sum(float(p.grad.pow(2).sum()) for p in model.parameters())
    assert batch_squared < 0.5 * sum(float(f.sum()) for f in fast.values())


# ---- side effects ---------------------------------------------------------------------------------------------------
def test_fisher_pass_leaves_batchnorm_stats_modes_and_grads_untouched():
    model = make_model("conv")
    model.train()
    model.backbone.net[1].eval()  # a mixed-mode model: one frozen BatchNorm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    fisher_diagonal(model, make_batches(), "exact", output_fn=task_view)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running_mean/var, num_batches_tracked and weights
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def test_fisher_rejects_unknown_kind_and_empty_data():
    with pytest.raises(ValueError, match="fisher='batch'"):
        fisher_diagonal(nn.Linear(2, 2), [], "batch")
    with pytest.raises(ValueError, match="at least one sample"):
        fisher_diagonal(nn.Linear(2, 2), [], "exact")


# ---- DDP: 2 gloo processes == 1 process ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, arch, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, out = make_model(arch), {}
        for kind in ("exact", "empirical"):
            shard = [tuple(t[rank::world] for t in batch) for batch in make_batches(n=25)]  # as task_batches shards
            fisher, n = fisher_diagonal(model, shard, kind, output_fn=task_view)
            out[kind] = ({k: v.clone() for k, v in fisher.items()}, n)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_two_process_fisher_equals_one_process(arch):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), arch, results), nprocs=2, join=True)
        results = dict(results)
    model = make_model(arch)
    for kind in ("exact", "empirical"):
        single, n = fisher_diagonal(model, make_batches(n=25), kind, output_fn=task_view)
        for rank in (0, 1):
            fisher, n_ranks = results[rank][kind]
            assert n_ranks == n == 25
            assert_same(fisher, single)



# ---- the conv fast path and the parts of a batch ----------------------------------------------------------------------
class ConvVariety(nn.Module):
    """Convs with BatchNorm, padding, stride, dilation and groups, and a wide conv on a small map (position pairs)."""

    def __init__(self, input_shape):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(input_shape[0], 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(12, 64, 2, stride=2), nn.BatchNorm2d(64), nn.ReLU(),  # a 1×3 map: the position-pairs path
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = 64

    def forward(self, x):
        return self.net(x)


def test_unfold_equals_torch_unfold():
    from src.methods.fisher import _pad, _unfold

    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    for conv in (nn.Conv2d(4, 2, 3), nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(4, 2, (3, 2), stride=(2, 1),
                 padding=(1, 2), dilation=(1, 2)), nn.Conv2d(4, 2, 1, stride=2), nn.Conv2d(4, 4, 3, groups=2)):
        for a in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, 1:]):
            want = F.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
            assert torch.equal(_unfold(_pad(a, conv), conv), want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("view", [task_view, class_view])
@pytest.mark.parametrize("parts", [False, True])
def test_conv_fast_path_and_batch_parts_equal_per_sample_loop(kind, view, parts, monkeypatch):
    """The conv path (strided unfold, position pairs) on every variation it claims; with `parts` the batches are cut
    into parts of one sample, and `sample` must still draw its labels for the whole batch at once."""
    import src.methods.fisher as fisher_module

    if parts:
        monkeypatch.setattr(fisher_module, "_FIRST_PART", 3)
        monkeypatch.setattr(fisher_module, "_CPU_PART_BYTES", 1)
    shape = (2, 9, 9)
    torch.manual_seed(0)
    model = randomise_batchnorm(Net(ConvVariety(shape), 6).double())
    batches = make_batches(shape=shape)
    sampled = draw_labels(model, batches, view, seed=3) if kind == "sample" else None
    fast, n = fisher_diagonal(model, batches, kind, output_fn=view, generator=torch.Generator().manual_seed(3))
    assert n == 24
    assert_same(fast, slow_fisher(model, batches, kind, view, sampled))
