"""Start-up and teardown of `python -m src.train`: what a run imports, and how it ends (docs/speed.md, "Start-up").

No timings here (they belong to `python -m src.bench`): these tests check the mechanisms that the timings rest on."""

import json
import subprocess
import sys
import textwrap

from tests.helpers import ROOT, SYNTHETIC, read_results, run_train

# Installed here, never needed by a default run: each costs from 0.1 to 1 s of start-up when imported
HEAVY = ("matplotlib", "scipy", "transformers", "timm", "peft", "wandb", "tensorboard", "tensorboardX", "optuna",
         "sklearn", "pandas", "datasets", "joblib", "submitit")


def heavy_in(modules) -> set[str]:
    return {m for m in modules if m.partition(".")[0] in HEAVY}


def test_a_default_run_imports_none_of_the_heavy_packages_and_with_plots_false_draws_none(tmp_path):
    """The default config (EWC, csv logger) on tiny data: at the first training step none of HEAVY is imported; with
    `plots=false` none is at the end of the last evaluation either (the plots import matplotlib), and the plots are
    drawn on demand, afterwards, from results.json."""
    run_dir, record = tmp_path / "run", tmp_path / "imports.json"
    run_train(run_dir, *SYNTHETIC, "method=ewc", "dataset.tasks.n_tasks=2", "plots=false",
              "trainer.max_steps=3", "+callbacks.imports._target_=tests.import_probe.RecordImports",
              f"+callbacks.imports.path={record}")
    imported = json.loads(record.read_text())
    assert "lightning" in imported["first_step"] and "torchmetrics" in imported["first_step"]
    assert heavy_in(imported["first_step"]) == set()
    assert heavy_in(imported["end"]) == set()
    results = read_results(run_dir)
    timing = results["timing_s"]
    assert results["status"] == "finished" and 0 < timing["first_step"] < timing["results_written"]
    assert not list(run_dir.glob("*.png"))
    proc = subprocess.run([sys.executable, "-m", "src.continual.plots", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("acc_matrix", "avg_acc", "task_acc"):
        assert (run_dir / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_packages_torchmetrics_skipped_still_import_on_first_use():
    """After `import_lightning()`, scipy, transformers and matplotlib are not imported, yet import normally (modules
    and package metadata alike), and the torchmetrics metric a run uses computes as usual."""
    proc = run_python("""
        import importlib.metadata, sys
        from src.continual.lightning_import import UNUSED_BY_TORCHMETRICS_HERE, import_lightning
        import_lightning()
        assert "lightning" in sys.modules and "torchmetrics" in sys.modules
        print("before", sorted(p for p in UNUSED_BY_TORCHMETRICS_HERE if p in sys.modules))
        import matplotlib.pyplot, scipy.signal
        from transformers import AutoConfig
        from lightning_utilities.core.imports import package_available
        assert package_available("scipy") and all(importlib.metadata.version(p) for p in UNUSED_BY_TORCHMETRICS_HERE)
        assert not any(type(f).__name__ == "PackagesLookAbsent" for f in sys.meta_path)
        import torch
        from torchmetrics.classification import MulticlassAccuracy
        metric = MulticlassAccuracy(num_classes=3, average="micro")
        metric.update(torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 1]))
        print("accuracy", float(metric.compute()))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["before []", "accuracy 0.75"]


def test_an_already_imported_package_is_not_hidden():
    proc = run_python("""
        import scipy, sys
        from src.continual.lightning_import import import_lightning
        import_lightning()
        print("scipy.signal" in sys.modules)  # torchmetrics found scipy and imported scipy.signal as it always does
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True"]


def test_exit_now_runs_the_exit_handlers_flushes_and_keeps_the_code(tmp_path):
    marker = tmp_path / "atexit"
    proc = run_python(f"""
        import atexit, pathlib, sys
        from src.continual.fast_exit import exit_now
        atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text("ran"))
        sys.stdout.write("unflushed output")
        exit_now(0)
        print("not reached")
    """)
    assert proc.returncode == 0 and proc.stdout == "unflushed output" and marker.read_text() == "ran"


def test_exit_now_leaves_the_ordinary_exit_to_a_live_non_daemon_thread():
    proc = run_python("""
        import threading, time
        from src.continual.fast_exit import exit_now
        worker = threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", flush=True)))
        worker.start()
        exit_now(0)
        print("returned", flush=True)
    """)
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["returned", "thread done"]
