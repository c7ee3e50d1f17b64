"""`python -m src.bench` runs end to end on small data and reports what it claims to measure."""

import json
import math

import pytest

from src.bench import main
from tests.helpers import SYNTHETIC


def test_bench_measures_every_contender_and_writes_json_and_results_md(tmp_path):
    out, md = tmp_path / "results", tmp_path / "RESULTS.md"
    [result] = main(["--preset", "mlp", "--rounds", "2", "--steps", "3", "--reference-samples", "8",
                     "--main-job", "yes", "--out", str(out), "--results-md", str(md), *SYNTHETIC])
    assert result["steps_per_measurement"] == 3
    for key in ("bare", "finetune", "ewc", "lwf"):
        assert result["train_samples_per_s"][key] > 0 and len(result["train_seconds"][key]) == 2
    for value in result["ratios"].values():
        assert math.isfinite(value) and value > 0
    # the fast Fisher is checked against the per-sample autograd loop on the same samples
    assert result["fisher"]["max_relative_error_vs_per_sample_loop"] < 1e-4
    assert result["fisher"]["per_sample_loop_measured_on"] == 8
    job = result["main_job"]
    assert job["steps"] > 0 and job["peak_rss_mb"] > 0 and 0 < job["train_share"] < 1
    assert 0 < job["first_step_s"] < job["wall_s"] and job["startup_detail_s"]["data loading left after the imports"] >= 0
    assert abs(sum(job["parts_s"].values()) - job["wall_s"]) < 1e-6
    [written] = out.glob("mlp-*.json")
    assert json.loads(written.read_text())["ratios"] == result["ratios"]
    text = md.read_text()
    assert "| framework finetune ÷ bare loop (throughput) |" in text and "python -m src.bench --preset mlp" in text


@pytest.mark.slow  # five task loops on the synthetic source
def test_bench_transforms_measures_cached_and_per_batch_steps(tmp_path):
    """`--transforms` on the synthetic source: every contender timed, the cached ones from their cache, one section."""
    out, md = tmp_path / "results", tmp_path / "RESULTS.md"
    (result,) = main(["--transforms", "--rounds", "1", "--steps", "2", "--out", str(out), "--results-md", str(md),
                      *SYNTHETIC])
    assert set(result["step_s"]) == {"split", "permuted", "rotated", "permuted, per batch", "rotated, per batch"}
    assert all(v > 0 and math.isfinite(v) for v in (*result["step_s"].values(), *result["ratios"].values()))
    assert json.loads((out / "transforms-cpu-{}cores.json".format(result["machine"]["cores"])).read_text())["kind"] == \
        "transforms"
    assert "rotated step ÷ permuted step" in md.read_text()


@pytest.mark.slow
def test_bench_startup_measures_imports_against_the_budget_and_the_end_of_a_job(tmp_path):
    out, md = tmp_path / "results", tmp_path / "RESULTS.md"
    [result] = main(["--startup", "--rounds", "1", "--out", str(out), "--results-md", str(md), *SYNTHETIC,
                     "method=finetune", "callbacks=none", "logger=none", "trainer.max_steps=2",
                     "dataset.tasks.n_tasks=2"])
    pieces = result["imports"]["pieces"]
    assert pieces["torch"]["own_cpu_s"] > 0 and set(result["imports"]["budget"]) <= set(pieces)
    run = result["jobs"]["medians"]["this checkout"]
    assert 0 < run["first_step_s"] < run["results_written_s"] < run["wall_s"] and run["end_after_results_s"] > 0
    assert result["jobs"]["baseline"] is None and result["load_average"]["before"]
    assert "| everything a run imports before its first step |" in md.read_text()
