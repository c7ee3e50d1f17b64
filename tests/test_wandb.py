"""`logger=wandb` offline: read the run files back and check what a dashboard would get (config, per-step losses,
per-task accuracies against the task index, forgetting/BWT/FWT, the accuracy matrix as a table and a heatmap,
wall time per task), and that the jobs of one sweep share a group but never a run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SYNTHETIC, read_results

BLOCK = 32 * 1024  # wandb's transaction log: LevelDB-style 32 KiB blocks of chunks (7-byte header: crc, length, type)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Every record of an offline run's `run-<id>.wandb` file, as protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _put(into: dict, item) -> None:
    """A history/summary/config item: `nested_key` is a path (a logged wandb object is a dict of fields)."""
    path = list(item.nested_key) or [item.key]
    for name in path[:-1]:
        into = into.setdefault(name, {})
    into[path[-1]] = json.loads(item.value_json)


def _items(items) -> dict:
    out: dict = {}
    for item in items:
        _put(out, item)
    return out


def read_offline_run(run_folder: Path) -> dict:
    """The offline W&B run under `<run_folder>/wandb`: run info, config, metric definitions, history rows, summary."""
    files = list(Path(run_folder).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    run = {"dir": files[0].parent, "config": {}, "metrics": {}, "history": [], "summary": {}, "exit": None}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["run"] = record.run
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "metric":
            run["metrics"][record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "history":
            run["history"].append(_items(record.history.item))
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
        elif kind == "exit":
            run["exit"] = record.exit
    return run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two jobs (seed 0, 1) of one multirun with logger=wandb, EWC so that the regularizer has its own term."""
    sweep_dir = tmp_path_factory.mktemp("wandb") / "sweep"
    cmd = [sys.executable, "-m", "src.train", "-m", f"hydra.sweep.dir={sweep_dir}", "callbacks=none", *SYNTHETIC,
           "method=ewc", "logger=wandb", "logger.wandb.project=cl-test", "logger.wandb.tags=[a,b]",
           "dataset.tasks.n_tasks=3", "trainer.max_steps=2", "trainer.log_every_n_steps=1", "save_checkpoints=false",
           "seed=0,1"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sweep_dir, proc


def test_offline_by_default_and_says_so_in_one_line(sweep):
    sweep_dir, proc = sweep
    output = proc.stdout + proc.stderr
    assert output.count("W&B offline") == 2  # one line per job
    assert "wandb:" not in output  # wandb's own banner is silenced
    for job in ("0", "1"):
        run = read_offline_run(sweep_dir / job)
        assert run["config"]["logger"]["wandb"]["mode"] == "offline"
        assert run["exit"] is not None and run["exit"].exit_code == 0  # closed when the job ended


def test_jobs_of_one_sweep_share_a_group_but_not_a_run(sweep):
    sweep_dir, _ = sweep
    runs = [read_offline_run(sweep_dir / job) for job in ("0", "1")]
    assert runs[0]["run"].run_id != runs[1]["run"].run_id
    for seed, run in enumerate(runs):
        assert run["run"].run_group == str(sweep_dir)
        assert run["run"].project == "cl-test"
        assert list(run["run"].tags) == ["a", "b"]
        assert f"seed={seed}" in run["run"].display_name
        assert run["config"]["seed"] == seed
        # its own three tasks only: a job never logs into another job's run
        assert [row["eval/tasks_trained"] for row in run["history"] if "eval/tasks_trained" in row] == [1, 2, 3]


def test_logged_keys_and_values(sweep):
    sweep_dir, _ = sweep
    run_folder = sweep_dir / "0"
    results, run = read_results(run_folder), read_offline_run(run_folder)

    # the resolved config
    assert run["config"]["method"]["_target_"] == "src.methods.ewc.EWC"
    assert run["config"]["trainer"]["max_steps"] == 2 and run["config"]["dataset"]["tasks"]["n_tasks"] == 3

    # per-step training losses, the regularizer's term separately, against the global step
    steps = [row for row in run["history"] if "train/loss" in row]
    assert len(steps) == 3 * 2
    assert all({"train/task_loss", "train/ewc_penalty", "trainer/global_step"} <= row.keys() for row in steps)
    assert [row["trainer/global_step"] for row in steps] == list(range(6))

    # after each task: every task's accuracy with the task index as x-axis, and the metrics so far
    for j in range(3):
        assert run["metrics"][f"eval/acc_task_{j}"].step_metric == "eval/tasks_trained"
    for key in ("eval/forgetting", "eval/bwt", "eval/fwt", "eval/task_time_s", "eval/avg_acc_seen"):
        assert run["metrics"][key].step_metric == "eval/tasks_trained"
    rows = [row for row in run["history"] if "eval/tasks_trained" in row]
    R = results["acc_matrix"]
    for i, row in enumerate(rows):
        assert row["eval/tasks_trained"] == i + 1
        assert [row[f"eval/acc_task_{j}"] for j in range(3)] == pytest.approx(R[i], abs=1e-7)
        assert row["eval/avg_acc_seen"] == pytest.approx(results["avg_acc_per_step"][i], abs=1e-7)
        assert row["eval/task_time_s"] == pytest.approx(results["task_times_s"][i], abs=1e-6)
        assert ("eval/forgetting" in row) == (i > 0)
    for key in ("forgetting", "bwt", "fwt"):
        assert rows[-1][f"eval/{key}"] == pytest.approx(results[key], abs=1e-7)
    # after task 2 of 3: forgetting of task 0 over the first two rows
    assert rows[1]["eval/forgetting"] == pytest.approx(R[0][0] - R[1][0], abs=1e-7)
    assert rows[1]["eval/bwt"] == pytest.approx(R[1][0] - R[0][0], abs=1e-7)

    # at the end: the accuracy matrix as a table and a heatmap, the final metrics in the summary
    final = next(row for row in run["history"] if "results/acc_matrix" in row)
    assert final["results/acc_matrix"]["_type"] == "table-file"
    table = json.loads((run["dir"] / "files" / final["results/acc_matrix"]["path"]).read_text())
    assert table["columns"] == ["after", "task_0", "task_1", "task_2", "avg_seen"]
    assert [a for r in table["data"][1:] for a in r[1:4]] == pytest.approx([a for row in R for a in row], abs=1e-7)
    assert table["data"][0][1:4] == pytest.approx(results["random_init_acc"], abs=1e-7)
    assert final["results/acc_matrix_heatmap"]["_type"] == "image-file"
    assert (run["dir"] / "files" / final["results/acc_matrix_heatmap"]["path"]).is_file()
    for key in ("avg_acc", "forgetting", "bwt", "fwt", "val_avg_acc", "wall_time_s"):
        assert run["summary"][f"final/{key}"] == pytest.approx(results[key], abs=1e-6), key
    assert run["summary"]["final/task_times_s"] == pytest.approx(results["task_times_s"], abs=1e-6)


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    """SIGKILL mid-task (tests/kill_at_step.py), then `resume=`: the continuation logs into the same run id (a second
    offline folder, which `wandb sync` merges into that run), from the checkpoint's step on."""
    folder = tmp_path / "run"
    common = ["callbacks=none", *SYNTHETIC, "method=finetune", "logger=wandb", "dataset.tasks.n_tasks=2",
              "trainer.max_steps=7", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=3"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    kill = ["+callbacks.kill._target_=tests.kill_at_step.KillAtStep", "+callbacks.kill.step=11",
            f"+callbacks.kill.marker={tmp_path / 'killed'}"]
    proc = subprocess.run([sys.executable, "-m", "src.train", f"hydra.run.dir={folder}", *common, *kill], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr[-3000:]
    (first,) = folder.glob("wandb/offline-run-*")
    proc = subprocess.run([sys.executable, "-m", "src.train", f"resume={folder}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(folder.glob("wandb/offline-run-*"))
    assert len(folders) == 2 and first in folders
    assert {f.name.rsplit("-", 1)[1] for f in folders} == {first.name.rsplit("-", 1)[1]}  # one run id
    (resumed,) = [f for f in folders if f != first]
    records = [r for r in wandb_records(next(resumed.glob("run-*.wandb")))]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == first.name.rsplit("-", 1)[1]
    steps = [h["trainer/global_step"] for h in (_items(r.history.item) for r in records
                                                 if r.WhichOneof("record_type") == "history") if "train/loss" in h]
    assert steps == list(range(9, 14))  # from the checkpoint (global step 9) to the end of task 2
    assert read_results(folder)["status"] == "finished"
