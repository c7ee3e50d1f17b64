"""EWC: the penalty's value and gradient, separate vs online, the real task loop, checkpoints, and forgetting on
Fashion-MNIST."""

from __future__ import annotations

import copy
import csv
import os
import statistics
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from src.continual.validate import ConfigError
from src.methods.ewc import EWC
from src.methods.fisher import fisher_diagonal
from tests.helpers import FMNIST_SYSTEM_DIR, SYNTHETIC, build_loop, read_results, run_train

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2-thread OpenMP is many times slower on small CPU machines
SHORT = (*SYNTHETIC, "trainer.max_steps=5", "dataset.batch_size=32")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Parameter(torch.randn(5))


def random_like(module, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.named_parameters():
        t = torch.rand(p.shape, generator=g) if positive else torch.randn(p.shape, generator=g)
        out[name] = t
    return out


def ewc_with(module, terms, mode="separate", lam=3.0):
    """An EWC holding `terms` = [(fisher, anchor), ...], one per task, loaded as a checkpoint of the older format (one
    term per task) is: each term is added to the quadratic in turn, as `on_task_end` adds a finished task's."""
    ewc = EWC(lam=lam, mode=mode)
    ewc.load_state_dict({
        "mode": mode, "param_names": [n for n, _ in module.named_parameters()], "fisher_stats": [],
        "terms": [{"tasks": [k], "fisher": f, "anchor": a} for k, (f, a) in enumerate(terms)],
    })
    return ewc


def penalty_and_grads(ewc, module):
    module.zero_grad()
    terms = ewc.loss(module, None, None, torch.zeros(()))
    terms["loss"].backward()
    return terms["ewc_penalty"], {n: p.grad.clone() for n, p in module.named_parameters()}


# ---- the penalty ----------------------------------------------------------------------------------------------------
def test_penalty_is_zero_at_the_anchor_and_has_gradient_lambda_F_delta():
    module = Toy()
    fisher = random_like(module, 1, positive=True)
    anchor = {n: p.detach().clone() for n, p in module.named_parameters()}
    ewc = ewc_with(module, [(fisher, anchor)], lam=3.0)
    value, grads = penalty_and_grads(ewc, module)
    assert value.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())

    with torch.no_grad():
        for p, d in zip(module.parameters(), random_like(module, 2).values(), strict=True):
            p.add_(d)
    value, grads = penalty_and_grads(ewc, module)
    expected = sum(1.5 * (fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in module.named_parameters())
    assert value.item() > 0
    torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=0)
    for n, p in module.named_parameters():
        torch.testing.assert_close(grads[n], 3.0 * fisher[n] * (p.detach() - anchor[n]), rtol=1e-6, atol=1e-7)


def test_separate_mode_sums_the_tasks():
    module = Toy()
    terms = [(random_like(module, 10 + k, positive=True), random_like(module, 20 + k)) for k in range(3)]
    together = penalty_and_grads(ewc_with(module, terms), module)
    alone = [penalty_and_grads(ewc_with(module, [term]), module) for term in terms]
    torch.testing.assert_close(together[0], sum(v for v, _ in alone), rtol=1e-6, atol=0)
    for n in together[1]:
        torch.testing.assert_close(together[1][n], sum(g[n] for _, g in alone), rtol=1e-5, atol=1e-6)


def test_many_tasks_in_separate_mode_are_one_quadratic_of_constant_size():
    """30 tasks, Fishers with zeros (weights no task cares about) and with one task dominating some weights: the
    consolidated quadratic's value and gradient equal the sum of the 30 terms computed apart in float64, its state has
    the size of one task's, and it survives a checkpoint round trip exactly."""
    module = Toy()
    terms = []
    for k in range(30):
        fisher = random_like(module, 100 + k, positive=True)
        for f in fisher.values():
            f[f < 0.3] = 0.0  # zeros, some of them in every task: A = 0 there, and the centre is the latest anchor
            if k == 7:
                f.mul_(1e6)
        terms.append((fisher, random_like(module, 200 + k)))
    ewc = ewc_with(module, terms)
    one = ewc_with(module, terms[:1])
    with torch.no_grad():
        for p, d in zip(module.parameters(), random_like(module, 3).values(), strict=True):
            p.add_(d)
    value, grads = penalty_and_grads(ewc, module)
    params = {n: p.detach().double() for n, p in module.named_parameters()}
    expected = sum(1.5 * float((f[n].double() * (params[n] - a[n].double()) ** 2).sum()) for f, a in terms for n in params)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    for n in params:
        want = sum(3.0 * f[n].double() * (params[n] - a[n].double()) for f, a in terms)
        torch.testing.assert_close(grads[n].double(), want, rtol=1e-5, atol=1e-6)
    state = ewc.state_dict()
    assert ewc.tasks == list(range(30)) and "terms" not in state
    assert sum(t.numel() for d in ("precision", "centre") for t in state[d].values()) == sum(
        t.numel() for d in ("precision", "centre") for t in one.state_dict()[d].values())
    restored = EWC(lam=3.0)
    restored.load_state_dict(copy.deepcopy(state))
    assert penalty_and_grads(restored, module)[0].item() == value.item()


def test_online_mode_keeps_the_latest_anchor_and_decays_the_fisher():
    module = Toy()
    terms = [(random_like(module, 10 + k, positive=True), random_like(module, 20 + k)) for k in range(3)]
    ewc = EWC(lam=2.0, mode="online", gamma=0.5)
    ewc.param_names = [n for n, _ in module.named_parameters()]
    for k, (fisher, anchor) in enumerate(terms):
        ewc._add_task(k, fisher, anchor)
    running = {n: 0.25 * terms[0][0][n] + 0.5 * terms[1][0][n] + terms[2][0][n] for n in terms[0][0]}
    alone = penalty_and_grads(ewc_with(module, [(running, terms[2][1])], mode="online", lam=2.0), module)
    value, grads = penalty_and_grads(ewc, module)
    torch.testing.assert_close(value, alone[0], rtol=1e-6, atol=0)
    for n in grads:
        torch.testing.assert_close(grads[n], alone[1][n], rtol=1e-6, atol=1e-7)
    assert ewc.tasks == [0, 1, 2]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method.mode"):
        EWC(mode="both")
    with pytest.raises(ConfigError, match="method.lambda"):
        EWC(**{"lambda": -1})
    with pytest.raises(ConfigError, match="method.fisher="):
        EWC(fisher="batch")
    with pytest.raises(ConfigError, match="unknown key"):
        EWC(lamda=1)
    assert EWC(**{"lambda": 7}).lam == 7.0


# ---- on the real module, datamodule and scenarios ------------------------------------------------------------------
def own_fisher(module, dm, task, kind="exact"):
    def view(logits, batch):
        return module.scenario.eval_view(logits, batch[1], batch[2], trained_up_to=task)

    return fisher_diagonal(module, dm.task_batches(task, batch_size=64), kind, view)[0]


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_task_end_stores_fisher_and_anchor_online_decays_by_gamma(tmp_path, mode):
    loop = build_loop(tmp_path, *SHORT, "method=ewc", f"method.mode={mode}", "method.gamma=0.5")
    module, dm, ewc = loop.module, loop.dm, loop.module.regularizer
    f0 = own_fisher(module, dm, 0)
    anchor0 = {n: p.detach().clone() for n, p in module.named_parameters()}
    ewc.on_task_end(0, module, dm)
    with torch.no_grad():  # "train" task 1
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theta1 = {n: p.detach().clone() for n, p in module.named_parameters()}
    f1 = own_fisher(module, dm, 1)
    ewc.on_task_end(1, module, dm)

    assert ewc.tasks == [0, 1]
    for n in f0:
        if mode == "online":  # A = γ F_0 + F_1 at the latest anchor θ*_1
            torch.testing.assert_close(ewc.precision[n], 0.5 * f0[n] + f1[n], rtol=1e-6, atol=1e-9)
            assert torch.equal(ewc.centre[n], theta1[n])
        else:  # A = F_0 + F_1 at their weighted mean (θ*_1 where both are 0)
            torch.testing.assert_close(ewc.precision[n], f0[n] + f1[n], rtol=1e-6, atol=1e-9)
            both = f0[n] + f1[n]
            mean = torch.where(both > 0, (f0[n] * anchor0[n] + f1[n] * theta1[n]) / both.clamp_min(1e-30), theta1[n])
            torch.testing.assert_close(ewc.centre[n], mean, rtol=1e-5, atol=1e-7)
    # task-incremental: head rows of tasks 0 and 1 have Fisher, later heads none
    rows = ewc.precision["head.weight"].abs().sum(1)
    assert (rows[:4] > 0).all() and (rows[4:] == 0).all()
    assert [s["task"] for s in ewc.fisher_stats] == [0, 1]
    assert all(s["mean"] > 0 and s["max"] >= s["mean"] and 0 < s["top1pct_mass"] <= 1 for s in ewc.fisher_stats)


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_penalty_zero_in_task_0_positive_after_with_the_right_gradient(tmp_path, scenario):
    loop = build_loop(tmp_path, *SHORT, "method=ewc", "method.lambda=50", f"scenario={scenario}",
                      "dataset.tasks.n_tasks=2", "save_checkpoints=false")
    module, ewc = loop.module, loop.module.regularizer
    seen = []
    original_loss = ewc.loss

    def spy(module, batch, logits, task_loss):
        terms = original_loss(module, batch, logits, task_loss)
        seen.append((module.current_task, terms["ewc_penalty"].item()))
        return terms

    ewc.loss = spy
    per_task = []  # each finished task's (F_k, θ*_k), as they enter the quadratic
    original_add = ewc._add_task

    def record(task, fisher, anchor):
        per_task.append(({n: f.clone() for n, f in fisher.items()}, {n: a.clone() for n, a in anchor.items()}))
        original_add(task, fisher, anchor)

    ewc._add_task = record
    loop.run()
    assert len(per_task) == 2
    task0 = [v for t, v in seen if t == 0]
    task1 = [v for t, v in seen if t == 1]
    assert len(task0) == len(task1) == 5
    assert all(v == 0 for v in task0)
    assert task1[0] == 0  # the first step of task 1 starts exactly at the anchor
    assert all(v > 0 for v in task1[1:])  # and then it pulls back

    # now (after task 1's Fisher too): value and gradient against the definition, term by term
    x, y, t = next(loop.dm.task_batches(1, batch_size=16))
    module.zero_grad()
    logits = module(x)
    terms = ewc.loss(module, (x, y, t), logits, torch.zeros(()))
    terms["loss"].backward()
    params = dict(module.named_parameters())
    expected = 0.0
    for fisher, anchor in per_task:
        expected += sum(25.0 * (fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in params)
    torch.testing.assert_close(terms["ewc_penalty"], expected.detach(), rtol=1e-5, atol=0)
    for n, p in params.items():
        want = sum(50.0 * fisher[n] * (p.detach() - anchor[n]) for fisher, anchor in per_task)
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-7, msg=n)


def test_fisher_pass_leaves_batchnorm_running_stats_untouched(tmp_path):
    loop = build_loop(tmp_path, *SHORT, "method=ewc", "model=convnet", "model.channels=[4,8]")
    module = loop.module
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}
    assert before
    module.regularizer.on_task_end(0, module, loop.dm)
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert module.training and all(m.training for m in module.backbone.modules())


def test_checkpoint_mid_sequence_restores_identical_penalty(tmp_path):
    loop = build_loop(tmp_path, *SHORT, "method=ewc", "method.lambda=50", "dataset.tasks.n_tasks=3",
                      "checkpoint.keep_every_task=true")
    module = loop.module
    captured = {}
    original_checkpoint = loop._checkpoint

    def capture(task):
        original_checkpoint(task)
        if task == 1:
            captured["params"] = copy.deepcopy(module.state_dict())
            captured["penalty"] = module.regularizer.penalty(module).item()

    loop._checkpoint = capture
    loop.run()
    assert captured["penalty"] > 0  # after task 1: task 0's term is not at its anchor

    checkpoint = torch.load(loop.run_dir / "checkpoints" / "task_1.ckpt", weights_only=False)
    fresh = build_loop(tmp_path / "fresh", *SHORT, "method=ewc", "method.lambda=50", "dataset.tasks.n_tasks=3").module
    assert fresh.regularizer.penalty(fresh).item() == 0
    fresh.load_state_dict(checkpoint["state_dict"])
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.current_task == 1 and fresh.regularizer.tasks == [0, 1]
    assert fresh.regularizer.penalty(fresh).item() == captured["penalty"]
    module.load_state_dict(captured["params"])
    with torch.no_grad():  # same perturbation of both models: same penalty and gradient
        for a, b in zip(module.parameters(), fresh.parameters(), strict=True):
            step = 0.01 * torch.randn_like(a)
            a.add_(step)
            b.add_(step)
    # the original regularizer had task 2's term added since; restore it to the state at task 1 as well
    module.regularizer.load_state_dict(checkpoint["regularizer"])
    assert fresh.regularizer.penalty(fresh).item() == module.regularizer.penalty(module).item() > 0
    assert fresh.regularizer.fisher_stats == checkpoint["regularizer"]["fisher_stats"]


# ---- end to end through the real entry point ------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_train_with_ewc_end_to_end(tmp_path, scenario):
    run_train(tmp_path, *SHORT, "method=ewc", f"scenario={scenario}", "logger=csv", "trainer.log_every_n_steps=1",
              env=ONE_THREAD)
    results = read_results(tmp_path)
    assert results["status"] == "finished" and results["method"] == "ewc"
    assert results["steps_per_task"] == [5] * 5
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    penalties = [float(r["train/ewc_penalty"]) for r in rows if r.get("train/ewc_penalty")]
    assert len(penalties) == 25 and all(p == 0 for p in penalties[:6]) and max(penalties) > 0
    means = [float(r["ewc/fisher_mean"]) for r in rows if r.get("ewc/fisher_mean")]
    assert len(means) == 5 and all(m > 0 for m in means)


# ---- the claim: EWC forgets clearly less than finetune on real Split Fashion-MNIST ---------------------------------
@pytest.mark.slow
def test_ewc_forgets_clearly_less_than_finetune_on_fashion_mnist(tmp_path):
    if not FMNIST_SYSTEM_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (setup.sh installs it)")
    runs = [(method, seed) for seed in (0, 1, 2) for method in ("finetune", "ewc")]

    def train(run):
        method, seed = run
        run_dir = tmp_path / f"{method}_{seed}"
        run_train(run_dir, f"method={method}", f"seed={seed}", "scenario=task", "logger=none",
                  "save_checkpoints=false", env=ONE_THREAD)
        return read_results(run_dir)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(runs, pool.map(train, runs), strict=True))
    forgetting = {m: [results[(m, s)]["forgetting"] for s in (0, 1, 2)] for m in ("finetune", "ewc")}
    avg_acc = {m: [results[(m, s)]["avg_acc"] for s in (0, 1, 2)] for m in ("finetune", "ewc")}
    # measured (experiments/ewc/README.md): finetune 6.70 ± 6.63 % forgetting, EWC (λ = 1e4) 0.07 ± 0.08 %
    assert statistics.mean(forgetting["ewc"]) < 0.01
    assert statistics.mean(forgetting["ewc"]) < 0.25 * statistics.mean(forgetting["finetune"])
    assert all(e < f for e, f in zip(forgetting["ewc"], forgetting["finetune"], strict=True))
    assert statistics.mean(avg_acc["ewc"]) > statistics.mean(avg_acc["finetune"]) + 0.02
    assert min(avg_acc["ewc"]) > 0.97
