"""Two CPU processes (gloo) through the real entry point: the run completes, its evaluation of the trained weights
equals a single process's exactly, what crosses task boundaries is the same on both ranks and equals what one
process computes, and only rank 0 writes files.

The evaluation data are cut so that shards and batches are uneven (63 test samples per task, batches of 31): a
padding sampler would count a sample twice and change the accuracies."""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers import ROOT, SYNTHETIC, build_loop, read_results, run_train

PROTOCOL = (
    *SYNTHETIC, "+dataset.source.n_test=21", "+dataset.source.n_classes=9", "dataset.tasks.n_tasks=3",
    "dataset.tasks.classes_per_task=3", "dataset.eval_batch_size=31", "scenario=class", "trainer.max_steps=2",
    "optimizer.lr=3e-4", "logger=none", "checkpoint.keep_every_task=true",
)
METHODS = [m for m in ("ewc", "lwf") if (ROOT / "conf" / "method" / f"{m}.yaml").is_file()]


class RankState(L.Callback):
    """Test-only callback (`+callbacks.rank_state._target_=tests.test_ddp.RankState`): after every evaluation, each
    rank saves what it holds across tasks: the regularizer's state, the accuracies it computed, the weights."""

    def __init__(self, folder: str):
        self.folder, self.count = Path(folder), 0

    def on_test_end(self, trainer, pl_module):
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"regularizer": pl_module.regularizer.state_dict(), "last_eval": list(pl_module.last_eval),
                 "trained_up_to": pl_module.trained_up_to, "weights": pl_module.state_dict(),
                 "seed": os.environ.get("PL_GLOBAL_SEED"), "pid": os.getpid()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}_{self.count:02d}.pt")
        self.count += 1


def _tensors(tree, path=""):
    """(path, value) leaves of a nested state, modules as their state dicts."""
    if isinstance(tree, torch.nn.Module):
        tree = tree.state_dict()
    if isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from _tensors(tree[key], f"{path}.{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{path}[{i}]")
    else:
        yield path, tree


PER_PROCESS = ("seconds", "pid")  # wall-clock measurements and process ids differ between processes by nature


def assert_same(a, b, rtol: float = 0.0, atol: float = 0.0):
    left, right = list(_tensors(a)), list(_tensors(b))
    assert [p for p, _ in left] == [p for p, _ in right]
    for (path, x), (_, y) in zip(left, right, strict=True):
        if path.rsplit(".", 1)[-1] in PER_PROCESS:
            continue
        if isinstance(x, torch.Tensor):
            same = torch.equal(x, y) if rtol == atol == 0 else torch.allclose(x, y, rtol=rtol, atol=atol)
            assert same, f"{path}: max difference {(x.double() - y.double()).abs().max()}"
        elif isinstance(x, float) and (rtol or atol):
            assert math.isclose(x, y, rel_tol=rtol, abs_tol=atol), (path, x, y)
        else:
            assert x == y, path


@pytest.fixture(scope="module", params=METHODS)
def ddp_run(request, tmp_path_factory):
    method = request.param
    folder = tmp_path_factory.mktemp(f"ddp_{method}")
    run_dir = folder / "run"
    run_train(run_dir, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"method={method}", *PROTOCOL,
              "+callbacks.rank_state._target_=tests.test_ddp.RankState", f"+callbacks.rank_state.folder={folder}/ranks")
    return method, run_dir, folder


def test_ddp_run_completes_with_two_processes(ddp_run):
    method, run_dir, folder = ddp_run
    results = read_results(run_dir)
    assert results["status"] == "finished" and results["method"] == method
    assert results["config"]["trainer"]["strategy"] == "ddp" and results["config"]["trainer"]["devices"] == 2
    assert len(results["acc_matrix"]) == 3 and results["steps_per_task"] == [2, 2, 2]
    assert sorted(p.name[:5] for p in (folder / "ranks").glob("*.pt")) == ["rank0"] * 7 + ["rank1"] * 7
    # the test is only worth something if the accuracies are not all 0 or 1
    assert any(0 < a < 1 for a in results["acc_matrix"][-1])
    # rank 0 wrote the files; rank 1 wrote nothing but its (empty) log, and no temporary files are left over
    names = {p.name for p in run_dir.iterdir()}
    assert {"results.json", "config.yaml", "acc_matrix.png", "avg_acc.png", "train.log", "checkpoints"} <= names
    assert not [n for n in names if n.endswith(".tmp")] and not list(run_dir.glob("checkpoints/.*"))


def test_every_rank_holds_the_same_state(ddp_run):
    """Regularizer state (EWC's Fisher and anchors, LwF's teacher), accuracies and weights after every evaluation."""
    _, run_dir, folder = ddp_run
    results = read_results(run_dir)
    for rank0 in sorted((folder / "ranks").glob("rank0_*.pt")):
        rank1 = rank0.with_name(rank0.name.replace("rank0", "rank1"))
        assert_same(torch.load(rank0, weights_only=False), torch.load(rank1, weights_only=False))
    # the accuracies the ranks computed are the rows of results.json (init, then test and validation per task)
    evals = [torch.load(p, weights_only=False)["last_eval"] for p in sorted((folder / "ranks").glob("rank1_*.pt"))]
    assert evals[0] == results["random_init_acc"]
    assert evals[1::2] == results["acc_matrix"] and evals[2::2] == results["val_acc_matrix"]


def test_ddp_evaluation_equals_single_process_evaluation(ddp_run, tmp_path):
    method, run_dir, _ = ddp_run
    results = read_results(run_dir)
    loop = build_loop(tmp_path, f"method={method}", *PROTOCOL)  # one process, the same config otherwise
    loop.module.trained_up_to = -1
    assert loop.evaluate("test") == results["random_init_acc"]  # same seed, same initial weights
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    loop.module.load_state_dict(checkpoint["state_dict"])
    loop.module.on_load_checkpoint(checkpoint)
    assert loop.module.trained_up_to == 2
    assert loop.evaluate("test") == results["acc_matrix"][-1]  # exactly: every sample counted once
    assert loop.evaluate("val") == results["val_acc_matrix"][-1]


def test_state_made_at_a_task_end_under_ddp_equals_one_process(ddp_run, tmp_path):
    """The last task's end (EWC: Fisher over the whole task, gathered from both shards; LwF: the teacher) redone
    in one process from the same weights and the state before it gives the state the DDP run saved."""
    method, run_dir, _ = ddp_run
    before = torch.load(run_dir / "checkpoints" / "task_1.ckpt", map_location="cpu", weights_only=False)
    after = torch.load(run_dir / "checkpoints" / "task_2.ckpt", map_location="cpu", weights_only=False)
    loop = build_loop(tmp_path, f"method={method}", *PROTOCOL)
    module, dm = loop.module, loop.dm
    loop.module.trained_up_to = -1
    loop.evaluate("test")  # attaches the trainer, as in a run
    module.on_load_checkpoint(before)
    module.load_state_dict(after["state_dict"])
    module.current_task = 2
    dm.set_task(2, include_past=module.regularizer.trains_on_past_tasks)
    module.regularizer.on_task_end(2, module, dm)
    assert_same(module.regularizer.state_dict(), after["regularizer"], rtol=1e-5, atol=1e-8)


def test_only_rank_0_writes(tmp_path, monkeypatch):
    """The task loop as a rank other than 0 sees it: it trains and evaluates, and writes no file."""
    loop = build_loop(tmp_path, *SYNTHETIC, "dataset.tasks.n_tasks=2", "trainer.max_steps=1", "save_checkpoints=false")
    before = {p.name for p in loop.run_dir.iterdir()}
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    results = loop.run()
    assert results["status"] == "finished" and len(results["acc_matrix"]) == 2
    assert {p.name for p in loop.run_dir.iterdir()} == before


def test_ddp_jobs_of_a_sequential_sweep(tmp_path):
    """`-m` with DDP: Lightning re-runs the whole command in the second process, which walks the same jobs in the
    same order; each job's two processes must hold the job's own config (seed) and the same state."""
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "src.train", "-m", f"hydra.sweep.dir={sweep}", "trainer=ddp", "trainer.devices=2",
           "trainer.accelerator=cpu", "callbacks=none", "save_checkpoints=false", *PROTOCOL, "dataset.tasks.n_tasks=2",
           "seed=0,1", "+callbacks.rank_state._target_=tests.test_ddp.RankState",
           "+callbacks.rank_state.folder=${paths.output_dir}/ranks"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, seed in (("0", 0), ("1", 1)):
        assert read_results(sweep / job)["status"] == "finished"
        dumps = sorted((sweep / job / "ranks").glob("*.pt"))
        assert len(dumps) == 2 * 5  # init, then test and validation after each of 2 tasks, on 2 ranks
        for rank0 in [d for d in dumps if d.name.startswith("rank0")]:
            a = torch.load(rank0, weights_only=False)
            b = torch.load(rank0.with_name(rank0.name.replace("rank0", "rank1")), weights_only=False)
            assert a["seed"] == b["seed"] == str(seed) and a["pid"] != b["pid"]
            assert_same(a, b)
