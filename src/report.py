"""Compare runs: one table and two plots from any number of run folders.

    python -m src.report outputs/multirun/2026-11-24/13-00-00               # a sweep
    python -m src.report outputs/runs/.../run_a outputs/runs/.../run_b --out comparison/

Every `results.json` under the given paths (run folders, multirun folders, or folders of those) is read. Runs that
differ only by their seed form one group; per group the table gives mean ± std over seeds (sample std) of the final
average accuracy, forgetting, BWT, FWT and wall time, per method × dataset × scenario × hyperparameters, where the
hyperparameters are the config keys that differ between the runs (output paths, loggers and seed-derived keys
aside). Written to `--out` (default: the first path):

    report.md             the table (percent), the plots, and every failed or incomplete run with its error
    report.csv            the table, one column per statistic (accuracies as fractions in [0, 1], as in results.json)
    report_runs.csv       every run found, finished or not
    report_avg_acc.png    average accuracy after each task: mean over seeds with a ±1 std band, one line per method
    report_final_acc.png  final accuracy on each task: bars (mean ± std over seeds), one bar per method

Runs whose results.json says other than `finished`, is unreadable, or which have no results.json at all (a folder with
Hydra's `.hydra/` but nothing else) are listed, never silently dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

METRICS = ("avg_acc", "forgetting", "bwt", "fwt", "wall_time_s")
EXTRA_METRICS = ("val_avg_acc",)
PERCENT = {"avg_acc", "forgetting", "bwt", "fwt", "val_avg_acc"}
HEADERS = {"avg_acc": "avg acc (%)", "forgetting": "forgetting (%)", "bwt": "BWT (%)", "fwt": "FWT (%)",
           "wall_time_s": "wall time (s)", "val_avg_acc": "val avg acc (%)"}
# Config keys that never make runs different experiments: where they write, how they log, how they checkpoint.
NOT_HYPERPARAMETERS = ("seed", "name", "paths", "logger", "callbacks", "hydra", "trainer.default_root_dir",
                       "save_checkpoints", "checkpoint", "resume", "ckpt_path", "trainer.enable_progress_bar",
                       "trainer.enable_model_summary", "trainer.log_every_n_steps", "dataset.eval_batch_size")
# Config groups whose keys are explained by a column of their own, unless they vary within it.
GROUP_COLUMNS = {"method": "method", "dataset": "dataset", "scenario": "scenario"}
METHOD_ORDER = ("finetune", "ewc", "lwf", "joint")


@dataclass
class Run:
    path: Path
    status: str
    error: str | None = None
    results: dict = field(default_factory=dict)
    method: str = "?"
    dataset: str = "?"
    scenario: str = "?"
    seed: object = None
    config: dict = field(default_factory=dict)
    hparams: tuple = ()

    @property
    def finished(self) -> bool:
        return self.status == "finished"


# ---- finding and reading runs ----------------------------------------------------------------------------------
def find_run_folders(paths: list[Path]) -> list[Path]:
    """Folders with a results.json, or with Hydra's `.hydra/` (a run that died before writing results)."""
    found: dict[Path, None] = {}
    for path in paths:
        path = Path(path)
        if path.is_file() and path.name == "results.json":
            found[path.parent.resolve()] = None
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder")
        candidates = [path, *sorted(p.parent for p in path.rglob("results.json")),
                      *sorted(p.parent.parent for p in path.rglob(".hydra/config.yaml"))]
        for folder in candidates:
            if _is_run_folder(folder):
                if "wandb" not in folder.relative_to(path).parts:
                    found[folder.resolve()] = None
    return list(found)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else tree}


def _dataset_name(folder: Path, config: dict, scenario: str) -> str:
    """The dataset's config choice (`dataset=split_fmnist`): from Hydra's record of the run, else from the run's
    default `name` (`<method>-<dataset>-<scenario>`), else the dataset's source class."""
    hydra_file = folder / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        import yaml

        try:
            choices = yaml.safe_load(hydra_file.read_text())["hydra"]["runtime"]["choices"]
            if choices.get("dataset"):
                return str(choices["dataset"])
        except (yaml.YAMLError, KeyError, TypeError):
            pass
    parts = str(config.get("name", "")).split("-")
    if len(parts) >= 3 and parts[-1] == scenario:
        return "-".join(parts[1:-1])
    target = (config.get("dataset") or {}).get("source", {}).get("_target_", "?")
    return target.rsplit(".", 1)[-1]


def read_run(folder: Path) -> Run:
    file = folder / "results.json"
    if not file.is_file():
        return Run(folder, "no results.json", "the run stopped before its first results were written")
    try:
        results = json.loads(file.read_text())
        config = results["config"]
        run = Run(folder, results.get("status", "?"), results.get("error"), results, results["method"],
                  _dataset_name(folder, config, results["scenario"]), results["scenario"], config.get("seed"), _flatten(config))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return Run(folder, "unreadable", f"results.json: {type(err).__name__}: {err}")
    if run.finished:
        R, n = results.get("acc_matrix") or [], results.get("n_tasks")
        if len(R) != n or any(results.get(k) is None for k in ("avg_acc", "avg_acc_per_step")):
            run.status, run.error = "incomplete", f"status finished but {len(R)} of {n} rows of acc_matrix"
    return run


# ---- grouping ----------------------------------------------------------------------------------------------------
def _excluded(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NOT_HYPERPARAMETERS)


def hyperparameter_keys(runs: list[Run]) -> list[str]:
    """The config keys that tell the runs apart, other than the seed (and keys that always equal it)."""
    keys = sorted({k for run in runs for k in run.config})
    chosen = []
    for key in keys:
        if _excluded(key):
            continue
        values = [run.config.get(key, "<absent>") for run in runs]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) < 2:
            continue
        if all(run.config.get(key, run.seed) == run.seed for run in runs):
            continue  # seed-derived (dataset.seed: ${seed}, ...)
        column = GROUP_COLUMNS.get(key.split(".", 1)[0])
        if column is not None:  # e.g. method.lambda: a hyperparameter only if it varies within one method
            by_column: dict = {}
            for run, value in zip(runs, values, strict=True):
                by_column.setdefault(getattr(run, column), set()).add(json.dumps(value, default=str))
            if all(len(v) < 2 for v in by_column.values()):
                continue
        chosen.append(key)
    return chosen


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def group_runs(runs: list[Run]) -> dict[tuple, list[Run]]:
    keys = hyperparameter_keys(runs)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        run.hparams = tuple((k, _format_value(run.config[k])) for k in keys if k in run.config)
        groups.setdefault((run.dataset, run.scenario, run.method, run.hparams), []).append(run)

    def order(key):
        dataset, scenario, method, hparams = key
        rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return dataset, scenario, rank, method, hparams

    return {key: sorted(groups[key], key=lambda r: str(r.seed)) for key in sorted(groups, key=order)}


def hparams_label(hparams: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in hparams)


def statistics(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _cell(metric: str, mean, std) -> str:
    if mean is None:
        return "n/a"
    scale, digits = (100.0, 2) if metric in PERCENT else (1.0, 1)
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def _is_run_folder(folder: Path) -> bool:
    return (folder / "results.json").is_file() or (folder / ".hydra" / "config.yaml").is_file()


def display_base(paths: list[Path]) -> Path:
    """Runs are named relative to this: the common folder of the inputs (a run folder's parent for a run folder)."""
    folders = [Path(p).resolve() for p in paths]
    folders = [f.parent if f.is_file() or _is_run_folder(f) else f for f in folders]
    return Path(os.path.commonpath(folders))


def _show(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:
        return str(path)


# ---- writing -----------------------------------------------------------------------------------------------------
def write_tables(groups: dict, runs: list[Run], out: Path, command: str, base: Path) -> None:
    rows = []
    for (dataset, scenario, method, hparams), members in groups.items():
        row = {"dataset": dataset, "scenario": scenario, "method": method, "hyperparameters": hparams_label(hparams),
               "n_runs": len(members), "seeds": " ".join(str(r.seed) for r in members)}
        for metric in METRICS + EXTRA_METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = statistics([r.results.get(metric) for r in members])
        row["runs"] = " ".join(_show(r.path, base) for r in members)
        rows.append(row)
    with open(out / "report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["dataset"])
        writer.writeheader()
        writer.writerows(rows)

    with open(out / "report_runs.csv", "w", newline="") as handle:
        fields = ["run", "status", "dataset", "scenario", "method", "hyperparameters", "seed", *METRICS,
                  *EXTRA_METRICS, "error"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for run in runs:
            writer.writerow({"run": _show(run.path, base), "status": run.status, "dataset": run.dataset,
                             "scenario": run.scenario, "method": run.method, "seed": run.seed,
                             "hyperparameters": hparams_label(run.hparams), "error": run.error,
                             **{m: run.results.get(m) for m in METRICS + EXTRA_METRICS}})

    lines = ["# Run report", "", f"Made by `{command}`.", ""]
    finished = sum(len(m) for m in groups.values())
    lines.append(f"{len(runs)} runs: {finished} finished, in {len(groups)} groups of runs that differ only by "
                 f"seed; {len(runs) - finished} failed or incomplete (listed below). Mean ± std over seeds (sample "
                 "std); accuracies, forgetting, BWT and FWT in percent.")
    lines += ["", "| dataset | scenario | method | hyperparameters | seeds | "
              + " | ".join(HEADERS[m] for m in METRICS) + " |",
              "|" + "---|" * (5 + len(METRICS))]
    for row in rows:
        cells = [_cell(m, row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
        lines.append(f"| {row['dataset']} | {row['scenario']} | {row['method']} | {row['hyperparameters'] or '—'} "
                     f"| {row['seeds']} | " + " | ".join(cells) + " |")
    if groups:
        lines += ["", "![average accuracy after each task](report_avg_acc.png)", "",
                  "![final accuracy on each task](report_final_acc.png)"]
    broken = [r for r in runs if not r.finished]
    lines += ["", "## Failed or incomplete runs", ""]
    if broken:
        lines += ["| run | status | error |", "|---|---|---|"]
        for run in broken:
            error = (run.error or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {_show(run.path, base)} | {run.status} | {error} |")
    else:
        lines.append("None.")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _label(key: tuple) -> str:
    return key[2] + (f" ({hparams_label(key[3])})" if key[3] else "")


def _figure(groups: dict):
    """One panel per dataset (rows) × scenario (columns), the legend under each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one colour and marker per method (+ hyperparameters) across panels; markers tell apart lines that overlap
    colors = {label: (plt.cm.tab10(i % 10), "osD^vP*X"[i % 8])
              for i, label in enumerate(dict.fromkeys(map(_label, groups)))}
    datasets = list(dict.fromkeys(key[0] for key in groups))
    scenarios = list(dict.fromkeys(key[1] for key in groups))
    entries = max(sum(1 for key in groups if key[:2] == (d, s)) for d in datasets for s in scenarios)
    fig, axes = plt.subplots(len(datasets), len(scenarios), squeeze=False,
                             figsize=(5.4 * len(scenarios), (4.0 + 0.2 * entries) * len(datasets)))
    panels = []
    for i, dataset in enumerate(datasets):
        for j, scenario in enumerate(scenarios):
            keys = [key for key in groups if key[:2] == (dataset, scenario)]
            if keys:
                axes[i][j].set_title(f"{dataset} · {scenario}-incremental")
                panels.append((axes[i][j], keys))
            else:
                axes[i][j].axis("off")
    return plt, fig, panels, colors


def _finish_panel(ax) -> None:
    ax.set_ylim(0, 101)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)


def plot(groups: dict, out: Path) -> None:
    plt, fig, panels, colors = _figure(groups)
    for ax, keys in panels:
        longest = 0
        for key in keys:
            curves = [r.results["avg_acc_per_step"] for r in groups[key]]
            length = min(len(c) for c in curves)
            longest = max(longest, length)
            values = 100 * np.array([c[:length] for c in curves])
            steps = np.arange(1, length + 1)
            mean = values.mean(axis=0)
            color, marker = colors[_label(key)]
            ax.plot(steps, mean, marker=marker, markersize=7, markerfacecolor="none", color=color, alpha=0.9,
                    label=f"{_label(key)}, n={len(curves)}")
            if len(curves) > 1:
                std = values.std(axis=0, ddof=1)
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        ax.set_xticks(np.arange(1, longest + 1))
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("average accuracy on tasks so far (%)")
        ax.grid(alpha=0.3)
        _finish_panel(ax)
    fig.suptitle("Average accuracy after each task: mean over seeds, band ±1 std", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "report_avg_acc.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    plt, fig, panels, colors = _figure(groups)
    for ax, keys in panels:
        bar = 0.8 / len(keys)
        longest = 0
        for i, key in enumerate(keys):
            rows = [r.results["acc_matrix"][-1] for r in groups[key]]
            length = min(len(r) for r in rows)
            longest = max(longest, length)
            values = 100 * np.array([r[:length] for r in rows])
            std = values.std(axis=0, ddof=1) if len(rows) > 1 else None
            x = np.arange(length) - 0.4 + bar * (i + 0.5)
            ax.bar(x, values.mean(axis=0), bar, yerr=std, capsize=2, color=colors[_label(key)][0],
                   label=f"{_label(key)}, n={len(rows)}")
        ax.set_xticks(np.arange(longest))
        ax.set_xticklabels([f"T{j}" for j in range(longest)])
        ax.set_xlabel("task")
        ax.set_ylabel("accuracy after the last task (%)")
        ax.grid(alpha=0.3, axis="y")
        _finish_panel(ax)
    fig.suptitle("Final accuracy on each task: mean over seeds, error bars ±1 std", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "report_final_acc.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def report(paths: list[Path], out: Path | None = None, command: str = "python -m src.report") -> dict:
    """Read, group, write; returns {"runs": [...], "groups": {...}} for scripting."""
    out = Path(out or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(folder) for folder in find_run_folders(paths)]
    groups = group_runs([r for r in runs if r.finished])
    write_tables(groups, runs, out, command, display_base(paths))
    if groups:
        plot(groups, out)
    return {"runs": runs, "groups": groups}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, multirun folders, or folders of those")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: the first path)")
    args = parser.parse_args(argv)
    command = "python -m src.report " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        made = report(args.paths, args.out, command)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs, groups = made["runs"], made["groups"]
    out = args.out or args.paths[0]
    broken = [r for r in runs if not r.finished]
    print(f"{len(runs)} runs, {len(runs) - len(broken)} finished in {len(groups)} groups -> {out}/report.md")
    for run in broken:
        print(f"  not finished: {run.path} ({run.status}{': ' + run.error if run.error else ''})")
    if not runs:
        print(f"error: no run folders (results.json or .hydra/) under {' '.join(map(str, args.paths))}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
