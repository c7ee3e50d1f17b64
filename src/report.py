"""Compare runs: one table and three figures from any number of run folders.

    python -m src.report outputs/multirun/2026-11-24/13-00-00               # a sweep
    python -m src.report outputs/runs/.../run_a outputs/runs/.../run_b --out comparison/ --latex --fit-axis

Every `results.json` under the given paths (run folders, multirun folders, or folders of those) is read. Runs that
differ only by their seed form one group; per group the table gives mean ± std over seeds (sample std) of the final
average accuracy, validation average accuracy, forgetting, BWT, FWT (left out for class-incremental runs, where it
is not informative) and wall time, per dataset × scenario × method × hyperparameters. The hyperparameters column
gives the method's effective hyperparameters (its defaults included, read from each run's `config.method`) and any
other config key that differs between the groups (output paths, loggers and seed-derived keys aside). The table is
printed on the terminal and written to `--out` (default: the first path):

    report.md                           the table (percent), the Optuna search's objective and best trial, the plots,
                                        and every failed, interrupted or incomplete run with its reason
    report.csv                          the table, one column per statistic (accuracies as fractions, as in results.json)
    report_runs.csv                     every run found, finished or not
    report.tex                          with --latex: the table as a LaTeX (booktabs) table
    report_avg_acc.{png,pdf,svg}        average accuracy after each task: mean over seeds, ±1 std band
    report_final_acc.{png,pdf,svg}      final accuracy on each task: bars (mean ± std over seeds)
    report_task_acc.{png,pdf,svg}       accuracy on each task as tasks are learned, one panel per group

Tasks are numbered 1…T, as in the table a run prints and its plots. Runs whose results.json says other than
`finished`, is unreadable, or which have no results.json at all (a folder with Hydra's `.hydra/` but nothing else)
are listed with the reason, never silently dropped.
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

METRICS = ("avg_acc", "val_avg_acc", "forgetting", "bwt", "fwt", "wall_time_s")
PERCENT = {"avg_acc", "forgetting", "bwt", "fwt", "val_avg_acc"}
HEADERS = {"avg_acc": "avg acc (%)", "forgetting": "forgetting (%)", "bwt": "BWT (%)", "fwt": "FWT (%)",
           "wall_time_s": "wall time (s)", "val_avg_acc": "val avg acc (%)"}
LATEX_HEADERS = {"avg_acc": "ACC", "val_avg_acc": "val ACC", "forgetting": "forgetting", "bwt": "BWT",
                 "fwt": "FWT", "wall_time_s": "time (s)"}
# Config keys that never make runs different experiments: where they write, how they log, how they checkpoint.
NOT_HYPERPARAMETERS = ("seed", "name", "paths", "logger", "callbacks", "hydra", "trainer.default_root_dir",
                       "save_checkpoints", "checkpoint", "resume", "ckpt_path", "trainer.enable_progress_bar",
                       "trainer.enable_model_summary", "trainer.log_every_n_steps", "dataset.eval_batch_size")
# Config groups whose keys are explained by a column of their own, unless they vary within it.
GROUP_COLUMNS = {"method": "method", "dataset": "dataset", "scenario": "scenario"}
METHOD_ORDER = ("finetune", "ewc", "lwf", "joint")
# A method's keys that do not change its results: memory only, or seeds that follow the run's seed.
NOT_METHOD_HYPERPARAMETERS = {"_target_", "seed", "fisher_batch_size"}
# A method's keys that it ignores unless another key says so (conf/method/*.yaml): left out of the column then.
USED_ONLY_IF = {
    ("EWC", "gamma"): lambda method, scenario: method.get("mode") == "online",
    ("LwF", "lambda_o"): lambda method, scenario: method.get("weighting") == "additive",
    ("LwF", "distill"): lambda method, scenario: scenario == "class",
    ("LwF", "warmup_lr"): lambda method, scenario: (method.get("warmup_epochs") or 0) > 0,
}
STATUS_MEANING = {
    "running": "still running, or killed without a chance to say so (SIGKILL, out of memory); resume=<folder> "
               "continues it",
    "interrupted": "stopped by a signal; resume=<folder> continues it",
}
ABSENT = "<absent>"


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
    config: dict = field(default_factory=dict)  # flattened: {"method.lambda": 10000.0, ...}
    method_hparams: dict = field(default_factory=dict)  # the method's effective hyperparameters
    hparams: tuple = ()  # (key, value) of the keys that differ between the runs read

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def subsampled(self):
        """`dataset.eval_max_samples` (debug=fast): evaluated on a subsample, not numbers to report."""
        return self.config.get("dataset.eval_max_samples")

    def objective(self) -> tuple[float | None, str]:
        """What `python -m src.train` returns, and so what a sweeper optimises: validation average accuracy, or
        test average accuracy when the run had no validation split."""
        if self.results.get("val_avg_acc") is not None:
            return self.results["val_avg_acc"], "validation average accuracy (val_avg_acc)"
        return self.results.get("avg_acc"), "test average accuracy (avg_acc: the run had no validation split)"


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


def method_hyperparameters(method: dict, scenario: str) -> dict:
    """The method's config as the run used it (defaults included), less what does not change its results."""
    target = str(method.get("_target_", "")).rsplit(".", 1)[-1]
    chosen = {}
    for key, value in method.items():
        used = USED_ONLY_IF.get((target, key))
        if key in NOT_METHOD_HYPERPARAMETERS or (used is not None and not used(method, scenario)):
            continue
        chosen[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return chosen


def read_run(folder: Path) -> Run:
    file = folder / "results.json"
    if not file.is_file():
        return Run(folder, "no results.json", "the run stopped before its first results were written")
    try:
        results = json.loads(file.read_text())
        if isinstance(results, dict) and results.get("status") != "finished" and not {"config", "method",
                                                                                        "scenario"} <= set(results):
            # an early failure (bad config, before training) may write little more than its status and error
            return Run(folder, str(results.get("status", "?")), results.get("error"), results,
                       str(results.get("method", "?")), scenario=str(results.get("scenario", "?")))
        config = results["config"]
        run = Run(folder, results.get("status", "?"), results.get("error"), results, results["method"],
                  _dataset_name(folder, config, results["scenario"]), results["scenario"], config.get("seed"),
                  _flatten(config), method_hyperparameters(config.get("method") or {}, results["scenario"]))
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
        values = [run.config.get(key, ABSENT) for run in runs]
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


def format_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def sort_value(value) -> tuple:
    """Numbers sort as numbers (1859 < 4136 < 19549), before text; absent and null last."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    if value is None or value == ABSENT:
        return (2, 0.0, "")
    return (1, 0.0, str(value))


def group_runs(runs: list[Run]) -> dict[tuple, list[Run]]:
    keys = hyperparameter_keys(runs)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        run.hparams = tuple((k, run.config.get(k, ABSENT)) for k in keys)
        groups.setdefault((run.dataset, run.scenario, run.method, run.hparams), []).append(run)

    def order(key):
        dataset, scenario, method, hparams = key
        rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return dataset, scenario, rank, method, tuple(sort_value(v) for _, v in hparams)

    def seed_order(run):
        return sort_value(run.seed), str(run.path)

    return {key: sorted(groups[key], key=seed_order) for key in sorted(groups, key=order)}


def hparams_label(hparams: tuple) -> str:
    """The varied keys, `key=value, ...` (what tells a group's runs from the other groups')."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in hparams if v != ABSENT)


def effective_label(run: Run, markup=lambda text: text) -> str:
    """The method's effective hyperparameters, then the other varied keys; `markup` marks those that vary."""
    varied = {k: v for k, v in run.hparams if v != ABSENT}
    parts = []
    for key, value in run.method_hparams.items():
        text = f"{key}={format_value(value)}"
        parts.append(markup(text) if f"method.{key}" in varied else text)
    parts += [markup(f"{k}={format_value(v)}") for k, v in varied.items()
              if not (k.startswith("method.") and k[len("method."):] in run.method_hparams)]
    return ", ".join(parts)


def statistics(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _cell(metric: str, mean, std, pm: str = " ± ") -> str:
    if mean is None:
        return "n/a"
    scale, digits = (100.0, 2) if metric in PERCENT else (1.0, 1)
    text = f"{scale * mean:.{digits}f}"
    return text + (f"{pm}{scale * std:.{digits}f}" if std is not None else "")


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


# ---- Optuna searches ---------------------------------------------------------------------------------------------
@dataclass
class Search:
    """An Optuna sweep: Hydra's optimization_results.yaml and the trial that produced its best value."""
    folder: Path
    best_params: dict
    best_value: float | None
    direction: str
    n_trials: int | None
    trials: list[Run]
    best_run: Run | None = None
    solutions: int | None = None  # multi-objective: the number of Pareto solutions


def _matches(value, wanted) -> bool:
    if isinstance(value, (int, float)) and isinstance(wanted, (int, float)):
        return math.isclose(float(value), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    return str(value) == str(wanted)


def find_searches(paths: list[Path], runs: list[Run]) -> list[Search]:
    import yaml

    files: dict[Path, None] = {}
    for path in map(Path, paths):
        if path.is_dir():
            for file in sorted(path.rglob("optimization_results.yaml")):
                files[file.resolve()] = None
    searches = []
    for file in files:
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        folder = file.parent
        sweeper, n_trials = {}, None
        multirun = folder / "multirun.yaml"
        if multirun.is_file():
            try:
                sweeper = (yaml.safe_load(multirun.read_text()) or {}).get("hydra", {}).get("sweeper", {}) or {}
                n_trials = sweeper.get("n_trials")
            except (OSError, yaml.YAMLError, AttributeError):
                sweeper = {}
        trials = [r for r in runs if r.path is not None and folder in Path(r.path).parents]
        search = Search(folder, data.get("best_params") or {}, data.get("best_value"),
                        str(sweeper.get("direction", "maximize")), n_trials, trials,
                        solutions=len(data["solutions"]) if "solutions" in data else None)
        if search.best_value is not None:
            for run in sorted((r for r in trials if r.finished), key=lambda r: str(r.path)):
                value, _ = run.objective()
                if (value is not None and math.isclose(value, search.best_value, rel_tol=1e-6, abs_tol=1e-9)
                        and all(_matches(run.config.get(k), v) for k, v in search.best_params.items())):
                    search.best_run = run
                    break
        searches.append(search)
    return searches


def _where(folder: Path) -> str:
    """A folder to `cd` into: relative to the current folder when under it, else absolute."""
    folder = Path(folder).resolve()
    return str(folder.relative_to(Path.cwd())) if folder.is_relative_to(Path.cwd()) else str(folder)


def search_lines(search: Search, code=lambda text: f"`{text}`") -> list[str]:
    finished = [r for r in search.trials if r.finished]
    what = (finished[0].objective()[1] if finished else "validation average accuracy (val_avg_acc)")
    trials = f"{search.n_trials} trials asked, " if search.n_trials is not None else ""
    lines = [f"Optuna search {code(_where(search.folder))}: objective = {what}, as a fraction in [0, 1] (what "
             f"`python -m src.train` returns), {search.direction}d; {trials}{len(finished)} finished runs found."]
    if search.solutions is not None:
        lines.append(f"Multi-objective: {search.solutions} Pareto solutions in optimization_results.yaml.")
        return lines
    params = ", ".join(f"{k}={v!r}" for k, v in search.best_params.items())  # in full: to be copied
    value = "n/a" if search.best_value is None else f"{search.best_value:.5g} ({100 * search.best_value:.2f}%)"
    if search.best_run is not None:
        test = search.best_run.results.get("avg_acc")
        lines.append(f"Best trial: {code(_where(search.best_run.path))} with {params}: objective {value}; test "
                     f"average accuracy {'n/a' if test is None else f'{100 * test:.2f}%'}.")
    else:
        lines.append(f"Best trial: {params}: objective {value}; no finished run read here has these parameters and "
                     "this value.")
    return lines


# ---- the table ---------------------------------------------------------------------------------------------------
def table_rows(groups: dict, base: Path) -> list[dict]:
    rows = []
    for (dataset, scenario, method, hparams), members in groups.items():
        row = {"dataset": dataset, "scenario": scenario, "method": method,
               "hyperparameters": effective_label(members[0]), "varied": hparams_label(hparams),
               "n_runs": len(members), "seeds": " ".join(str(r.seed) for r in members)}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = statistics([r.results.get(metric) for r in members])
        row["eval_max_samples"] = members[0].subsampled
        row["runs"] = " ".join(_show(r.path, base) for r in members)
        row["_first"] = members[0]
        rows.append(row)
    return rows


def shown_metrics(rows: list[dict]) -> list[str]:
    """FWT only where some row is not class-incremental; the validation column only where some run had one."""
    shown = list(METRICS)
    if all(r["scenario"] == "class" for r in rows):
        shown.remove("fwt")
    if all(r["val_avg_acc_mean"] is None for r in rows):
        shown.remove("val_avg_acc")
    return shown


def metric_cell(row: dict, metric: str, pm: str = " ± ") -> str:
    if metric == "fwt" and row["scenario"] == "class":
        return "—"
    return _cell(metric, row[f"{metric}_mean"], row[f"{metric}_std"], pm)


def _notes(rows: list[dict], varied: list[str]) -> list[str]:
    notes = []
    if varied:
        notes.append("Varied between groups: " + ", ".join(varied) + ".")
    if any(r["scenario"] == "class" for r in rows) and "fwt" in shown_metrics(rows):
        notes.append("FWT is left out (—) for class-incremental rows: an unseen task's classes are inactive, so "
                     "R[j−1][j] = 0 and FWT = −mean(random-init accuracy), which says nothing (README, Metrics).")
    subsampled = [r for r in rows if r["eval_max_samples"] is not None]
    if subsampled:
        notes.append(f"WARNING: {len(subsampled)} rows were evaluated on a subsample (dataset.eval_max_samples, as "
                     "debug=fast sets it): not numbers to report.")
    return notes


def text_table(rows: list[dict]) -> str:
    """The table for the terminal: aligned plain-text columns."""
    metrics = shown_metrics(rows)
    header = ["dataset", "scenario", "method", "hyperparameters", "seeds", *(HEADERS[m] for m in metrics)]
    body = [[r["dataset"], r["scenario"], r["method"], r["hyperparameters"] or "—", r["seeds"],
             *(metric_cell(r, m) for m in metrics)] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    numeric = set(range(5, len(header)))

    def render(line):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths,
                                                                                                     strict=True)))

    return "\n".join([render(header), "  ".join("-" * w for w in widths), *map(render, body)]).rstrip()


def _latex_escape(text: str) -> str:
    replace = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(replace.get(c, c) for c in str(text))


def latex_table(rows: list[dict], command: str) -> str:
    """A booktabs table (\\usepackage{booktabs}): mean ± std over seeds, in percent (wall time in seconds)."""
    metrics = shown_metrics(rows)
    seeds = sorted({r["n_runs"] for r in rows})
    lines = [f"% made by {command}", r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{llll" + "r" * (1 + len(metrics)) + "}", r"\toprule",
             " & ".join(["dataset", "scenario", "method", "hyperparameters", "seeds",
                         *(LATEX_HEADERS[m] for m in metrics)]) + r" \\", r"\midrule"]
    for r in rows:
        cells = []
        for m in metrics:
            cell = metric_cell(r, m, pm=r" \pm ")
            cells.append("--" if cell == "—" else (cell if cell == "n/a" else f"${cell}$"))
        lines.append(" & ".join([_latex_escape(r["dataset"]), _latex_escape(r["scenario"]), _latex_escape(r["method"]),
                                 _latex_escape(r["hyperparameters"] or "--"), str(r["n_runs"]), *cells]) + r" \\")
    fwt = " FWT is not given for class-incremental rows (not informative there)." if any(
        r["scenario"] == "class" for r in rows) and "fwt" in metrics else ""
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{Mean $\pm$ std over " + "/".join(map(str, seeds)) + r" seeds (sample std). ACC: average "
              r"accuracy on all tasks after the last; forgetting, BWT, FWT as defined in the text; in percent." + fwt
              + "}", r"\label{tab:results}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def broken_lines(runs: list[Run], base: Path) -> list[tuple[str, str, str]]:
    out = []
    for run in runs:
        if run.finished:
            continue
        reason = run.error or STATUS_MEANING.get(run.status, "")
        out.append((_show(run.path, base), run.status, reason.replace("\n", " ")))
    return out


# ---- writing -----------------------------------------------------------------------------------------------------
def write_tables(groups: dict, runs: list[Run], out: Path, command: str, base: Path, searches=(),
                 latex: bool = False) -> list[dict]:
    rows = table_rows(groups, base)
    varied = hyperparameter_keys([r for r in runs if r.finished])
    csv_fields = ["dataset", "scenario", "method", "hyperparameters", "varied", "n_runs", "seeds",
                  *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), "eval_max_samples", "runs"]
    with open(out / "report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    with open(out / "report_runs.csv", "w", newline="") as handle:
        fields = ["run", "status", "dataset", "scenario", "method", "hyperparameters", "seed", *METRICS, "error"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for run in runs:
            writer.writerow({"run": _show(run.path, base), "status": run.status, "dataset": run.dataset,
                             "scenario": run.scenario, "method": run.method, "seed": run.seed,
                             "hyperparameters": effective_label(run), "error": run.error,
                             **{m: run.results.get(m) for m in METRICS}})

    metrics = shown_metrics(rows) if rows else list(METRICS)
    lines = ["# Run report", "", f"Made by `{command}`.", ""]
    finished = sum(len(m) for m in groups.values())
    lines.append(f"{len(runs)} runs: {finished} finished, in {len(groups)} groups of runs that differ only by "
                 f"seed; {len(runs) - finished} failed, interrupted or incomplete (listed below). Mean ± std over "
                 "seeds (sample std); accuracies, forgetting, BWT and FWT in percent. Hyperparameters: the method's "
                 "effective ones (defaults included), those that differ between groups in bold.")
    lines += ["", "| dataset | scenario | method | hyperparameters | seeds | "
              + " | ".join(HEADERS[m] for m in metrics) + " |",
              "|" + "---|" * (5 + len(metrics))]
    for row in rows:
        label = effective_label(row["_first"], markup=lambda text: f"**{text}**") or "—"
        lines.append(f"| {row['dataset']} | {row['scenario']} | {row['method']} | {label} | {row['seeds']} | "
                     + " | ".join(metric_cell(row, m) for m in metrics) + " |")
    notes = _notes(rows, varied)
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    for search in searches:
        lines += ["", "## Hyperparameter search", ""] + search_lines(search)
    if groups:
        lines += ["", "![average accuracy after each task](report_avg_acc.png)", "",
                  "![final accuracy on each task](report_final_acc.png)", "",
                  "![accuracy on each task as tasks are learned](report_task_acc.png)", "",
                  "Each figure is also written as PDF and SVG (report_*.pdf, report_*.svg)."]
    broken = broken_lines(runs, base)
    lines += ["", "## Failed, interrupted or incomplete runs", ""]
    if broken:
        lines += ["| run | status | reason |", "|---|---|---|"]
        for path, status, reason in broken:
            lines.append(f"| {path} | {status} | {reason.replace('|', chr(92) + '|')} |")
    else:
        lines.append("None.")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    if latex and rows:
        (out / "report.tex").write_text(latex_table(rows, command))
    return rows


# ---- figures -----------------------------------------------------------------------------------------------------
def _label(key: tuple) -> str:
    label = hparams_label(key[3])
    return key[2] + (f" ({label})" if label else "")


def _figure(groups: dict):
    """One panel per dataset (rows) × scenario (columns), the legend under each panel."""
    from src.continual.plots import line_style, pyplot

    plt = pyplot()
    # one look per method (+ hyperparameters) across panels: colour, marker and dash pattern
    styles = {label: line_style(i) for i, label in enumerate(dict.fromkeys(map(_label, groups)))}
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
    return fig, panels, styles


def _ylim(ax, values: list, fit: bool) -> None:
    """0–100, or fitted to the values drawn (with a margin) when `fit`."""
    values = np.concatenate([np.ravel(v) for v in values]) if values else np.array([0.0, 100.0])
    values = values[np.isfinite(values)]
    if not fit or values.size == 0:
        ax.set_ylim(0, 101)
        return
    low, high = float(values.min()), float(values.max())
    margin = max(1.0, 0.08 * (high - low))
    ax.set_ylim(max(0.0, low - margin), min(101.0, high + margin))


def _legend(ax) -> None:
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)


def _offsets(n: int, spread: float = 0.12) -> np.ndarray:
    """Small horizontal shifts that keep identical lines (and their markers) apart."""
    return (np.arange(n) - (n - 1) / 2) * (spread / max(n, 1)) if n > 1 else np.zeros(1)


def plot(groups: dict, out: Path, fit_axis: bool = False) -> None:
    from src.continual.plots import FORMATS, draw_task_accuracy, pyplot, save_figure, task_ticks

    plt = pyplot()
    fig, panels, styles = _figure(groups)
    for ax, keys in panels:
        longest, drawn = 0, []
        for key, dx in zip(keys, _offsets(len(keys)), strict=True):
            curves = [r.results["avg_acc_per_step"] for r in groups[key]]
            length = min(len(c) for c in curves)
            longest = max(longest, length)
            values = 100 * np.array([c[:length] for c in curves], dtype=float)  # null (not evaluated) → NaN: a gap
            steps = np.arange(1, length + 1) + dx
            mean = values.mean(axis=0)
            style = styles[_label(key)]
            ax.plot(steps, mean, alpha=0.9, label=f"{_label(key)}, n={len(curves)}", **style)
            drawn.append(mean)
            if len(curves) > 1:
                std = values.std(axis=0, ddof=1)
                ax.fill_between(steps, mean - std, mean + std, color=style["color"], alpha=0.15, linewidth=0)
                drawn += [mean - std, mean + std]
        ax.set_xticks(np.arange(1, longest + 1))
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("average accuracy on tasks so far (%)")
        ax.grid(alpha=0.3)
        _ylim(ax, drawn, fit_axis)
        _legend(ax)
    fig.suptitle("Average accuracy after each task: mean over seeds, band ±1 std", fontsize=10)
    save_figure(fig, out / "report_avg_acc.png", FORMATS, dpi=110)

    fig, panels, styles = _figure(groups)
    for ax, keys in panels:
        bar = 0.8 / len(keys)
        longest, drawn = 0, []
        for i, key in enumerate(keys):
            rows = [r.results["acc_matrix"][-1] for r in groups[key]]
            length = min(len(r) for r in rows)
            longest = max(longest, length)
            values = 100 * np.array([r[:length] for r in rows], dtype=float)
            std = values.std(axis=0, ddof=1) if len(rows) > 1 else None
            x = np.arange(length) - 0.4 + bar * (i + 0.5)
            mean = values.mean(axis=0)
            ax.bar(x, mean, bar, yerr=std, capsize=2, color=styles[_label(key)]["color"],
                   hatch=["", "//", "..", "xx"][i % 4], edgecolor="white", label=f"{_label(key)}, n={len(rows)}")
            drawn += [mean, mean + (std if std is not None else 0), np.zeros(1)]
        task_ticks(ax, longest, "x", offset=0)
        ax.set_xlabel("task")
        ax.set_ylabel("accuracy after the last task (%)")
        ax.grid(alpha=0.3, axis="y")
        _ylim(ax, drawn, fit_axis)
        _legend(ax)
    fig.suptitle("Final accuracy on each task: mean over seeds, error bars ±1 std", fontsize=10)
    save_figure(fig, out / "report_final_acc.png", FORMATS, dpi=110)

    # accuracy on each task j as tasks are learned: one panel per group
    keys = list(groups)
    columns = min(3, len(keys))
    n_rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(n_rows, columns, squeeze=False, figsize=(4.6 * columns, 3.6 * n_rows))
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys, strict=False):
        matrices = [np.asarray(r.results["acc_matrix"], dtype=float) for r in groups[key]]
        shape = min(m.shape for m in matrices)
        stack = np.stack([m[: shape[0], : shape[1]] for m in matrices])
        std = stack.std(axis=0, ddof=1) if len(stack) > 1 else None
        draw_task_accuracy(ax, stack.mean(axis=0), std)
        ax.set_title(f"{key[0]} · {key[1]}-IL · {_label(key)}, n={len(stack)}", fontsize=8)
        _ylim(ax, [100 * stack.mean(axis=0)[np.triu_indices(shape[0], 0, shape[1])]], fit_axis)
        ax.legend(fontsize=6, ncol=2, frameon=False)
    fig.suptitle("Accuracy on each task as tasks are learned (mean over seeds, band ±1 std)", fontsize=10)
    save_figure(fig, out / "report_task_acc.png", FORMATS, dpi=110)


# ---- entry point -------------------------------------------------------------------------------------------------
def report(paths: list[Path], out: Path | None = None, command: str = "python -m src.report", latex: bool = False,
           fit_axis: bool = False) -> dict:
    """Read, group, write; returns {"runs", "groups", "rows", "searches"} for scripting."""
    out = Path(out or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(folder) for folder in find_run_folders(paths)]
    groups = group_runs([r for r in runs if r.finished])
    searches = find_searches(paths, runs)
    base = display_base(paths)
    rows = write_tables(groups, runs, out, command, base, searches, latex)
    if groups:
        plot(groups, out, fit_axis)
    return {"runs": runs, "groups": groups, "rows": rows, "searches": searches, "base": base}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, multirun folders, or folders of those")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: the first path)")
    parser.add_argument("--latex", action="store_true", help="also write the table as report.tex (booktabs)")
    parser.add_argument("--fit-axis", action="store_true", help="fit the plots' accuracy axis to the data (default "
                        "0-100)")
    args = parser.parse_args(argv)
    command = "python -m src.report " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        made = report(args.paths, args.out, command, latex=args.latex, fit_axis=args.fit_axis)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs, groups, rows, base = made["runs"], made["groups"], made["rows"], made["base"]
    if not runs:
        print(f"error: no run folders (results.json or .hydra/) under {' '.join(map(str, args.paths))}",
              file=sys.stderr)
        return 2
    out = args.out or args.paths[0]
    if rows:
        print(text_table(rows))
        for note in _notes(rows, hyperparameter_keys([r for r in runs if r.finished])):
            print(note)
        print()
    for search in made["searches"]:
        for line in search_lines(search, code=str):
            print(line)
        print()
    broken = broken_lines(runs, base)
    for path, status, reason in broken:
        print(f"not finished: {path} ({status}{': ' + reason if reason else ''})")
    written = "report.md, report.csv, report_runs.csv" + (", report.tex" if args.latex and rows else "") + (
        ", report_{avg_acc,final_acc,task_acc}.{png,pdf,svg}" if groups else "")
    print(f"{len(runs)} runs, {len(runs) - len(broken)} finished in {len(groups)} groups -> {out}/ ({written})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
