"""`python -m src.train --help` lists every config group with its options, and the launchers."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_help_lists_config_groups_and_launchers():
    proc = subprocess.run([sys.executable, "-m", "src.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = {line.split(": ", 1)[0]: line.split(": ", 1)[1].split(", ") for line in proc.stdout.splitlines()
              if ": " in line and not line.startswith(" ") and "=" not in line.split(": ", 1)[0]}
    assert {"joblib", "submitit_local", "slurm", "basic"} <= set(groups["hydra/launcher"])
    assert "optuna" in groups["hydra/sweeper"]
    for group in ("method", "dataset", "model", "scenario", "experiment", "debug"):
        assert groups[group] == sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")), group
    assert proc.stdout.startswith("python -m src.train [group=option ...] [key=value ...]")
