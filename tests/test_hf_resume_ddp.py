"""model=hf with EWC on LoRA through `python -m src.train`: a run stopped mid-task (SIGTERM) and resumed ends exactly
where an uninterrupted deterministic run ends (R, weights with the LoRA matrices, EWC's Fishers and anchors); two CPU
processes (DDP) train the one-process run (same R)."""

from __future__ import annotations

import signal

import pytest

from tests.helpers import read_results, run_train
from tests.test_ddp import _largest_differences, _run_pair
from tests.test_hf import OFFLINE
from tests.test_signals import assert_interrupted, assert_same_results, checkpoint, signal_at
from tests.test_text_data import make_task_folders, tiny_bert  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return make_task_folders(tmp_path_factory.mktemp("hf_tasks"), n_tasks=3, n_train=20, n_test=12)


def common(model, tasks) -> tuple[str, ...]:
    # 3 tasks of 4 steps; BERT's dropout (0.1) makes the RNG state matter; LoRA r=4 on query and value
    return ("model=hf", f"model.name={model}", "model.pooling=mean", "model.lora.r=4", "dataset=text_files",
            f"dataset.source.root={tasks}", "dataset.max_length=10", "dataset.batch_size=8", "logger=none",
            "trainer.max_steps=4", "deterministic=true", "method=ewc", "optimizer.lr=0.01")


def _run(run_dir, *overrides, check=True):
    return run_train(run_dir, *overrides, check=check, env=OFFLINE, timeout=300)


@pytest.mark.slow
def test_hf_lora_ewc_stopped_by_sigterm_mid_task_resumes_exactly(tiny_bert, tasks, tmp_path):  # noqa: F811
    args = common(tiny_bert, tasks)
    reference = tmp_path / "reference"
    _run(reference, *args)
    names = list(checkpoint(reference)["state_dict"])
    assert sum("lora_A" in n for n in names) == sum("lora_B" in n for n in names) == 4  # 2 layers × query, value
    assert read_results(reference)["method_summary"]["fisher_stats"][0]["fallback"] == []

    term = tmp_path / "sigterm"  # SIGTERM in task 1: the step is checkpointed, the run exits 143
    proc = _run(term, *args, *signal_at(6, "SIGTERM"), check=False)
    assert_interrupted(proc, term, signal.SIGTERM)
    saved = checkpoint(term)
    assert (saved["continual"]["phase"], saved["continual"]["task"], saved["global_step"]) == ("training", 1, 7)
    _run(term, *args, f"resume={term}", "+callbacks.signal.step=1000000")
    assert_same_results(term, reference)


@pytest.mark.slow
def test_hf_lora_ewc_on_two_processes_trains_the_one_process_run(tiny_bert, tasks, tmp_path, monkeypatch):  # noqa: F811
    """Global batches of 8 cut 4 + 4: the same steps, the same weights (LoRA matrices and heads) to float tolerance
    and every cell of R within test_ddp's 0.005 (SGD, as there: Adam turns rounding noise into updates). BERT's
    dropout is off (a config key through model.kwargs): its masks are drawn per process, so with dropout two
    processes train a different (equally valid) run than one (measured: weights 0.016 apart after 3 tasks)."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # _run_pair's runs inherit the environment
        monkeypatch.setenv(key, OFFLINE[key])
    runs = _run_pair(tmp_path, *common(tiny_bert, tasks), "optimizer=sgd", "optimizer.lr=0.1", "method.lambda=100",
                      "+model.kwargs.hidden_dropout_prob=0.0", "+model.kwargs.attention_probs_dropout_prob=0.0")
    one, two = runs["one"][0], runs["two"][0]
    assert one["status"] == two["status"] == "finished" and two["config"]["trainer"]["devices"] == 2
    assert one["steps_per_task"] == two["steps_per_task"] == [4, 4, 4]
    assert two["method_summary"]["fisher_stats"][0]["fallback"] == []
    lora = [k for k in runs["two"][1][-1]["weights"] if "lora_" in k]
    assert len(lora) == 8  # the weights compared below include every LoRA matrix
    weights, cells = _largest_differences(runs)
    assert weights < 1e-4 and cells <= 0.005
