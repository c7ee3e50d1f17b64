"""The run's results file and the table printed at the end.

`results.json` is the stable interface users script against. It is rewritten atomically (temporary file in the same
folder, then rename) after every task, so a crash leaves the last complete version and `status` says how it ended:
`running`, `finished`, `failed` or `interrupted` (with `error`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

SCHEMA_VERSION = 1


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name in the same folder, then rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True))


def eval_subsample(results: dict) -> int | None:
    """`dataset.eval_max_samples` of the run (e.g. `debug=fast`): accuracies on a subsample, never to be reported."""
    return ((results.get("config") or {}).get("dataset") or {}).get("eval_max_samples")


def format_table(results: dict) -> str:
    """The accuracy matrix (rows: after training task i; columns: task j; tasks numbered 1…T) and the metrics."""
    R = results["acc_matrix"]
    T = len(results["random_init_acc"])
    width = 7
    header = "after \\ on " + "".join(f"{'T' + str(j + 1):>{width}}" for j in range(T)) + f"{'avg':>{width}}"
    lines = [header, "-" * len(header)]

    def cell(a):  # a cell not evaluated (eval.every_n_tasks, eval.tasks) is null
        return f"{'-':>{width}}" if a is None else f"{100 * a:>{width}.2f}"

    lines.append(f"{'init':<11}" + "".join(cell(a) for a in results["random_init_acc"]))
    for i, row in enumerate(R):
        avg = results["avg_acc_per_step"][i] if i < len(results.get("avg_acc_per_step", [])) else None
        cells = "".join(cell(a) for a in row)
        lines.append(f"{'T' + str(i + 1):<11}" + cells + (f"{100 * avg:>{width}.2f}" if avg is not None else ""))

    def pct(key):
        value = results.get(key)
        return "n/a" if value is None else f"{100 * value:.2f}"

    # class-IL: an unseen task's classes are inactive, so FWT = -mean(random-init accuracy) says nothing (README)
    fwt = "n/a in class-IL" if results.get("scenario") == "class" else pct("fwt")
    lines.append("")
    lines.append(
        f"avg_acc {pct('avg_acc')} | forgetting {pct('forgetting')} | bwt {pct('bwt')} | fwt {fwt}"
        f"   (percent; accuracy on task j after training task i)"
    )
    if results.get("forgetting_exact") is False:
        lines.append("NOTE: forgetting is taken over the evaluated cells only (eval.every_n_tasks / eval.tasks): "
                     "see src/continual/metrics.py")
    n = eval_subsample(results)
    if n is not None:
        lines.append(f"NOTE: evaluated on at most {n} test (and validation) samples per task "
                     f"(dataset.eval_max_samples={n}, e.g. debug=fast): not numbers to report")
    return "\n".join(lines)
