"""`resume=<run folder>`: continue a run in its own folder, with the config it was made with.

Hydra writes its records (`.hydra/`, `train.log`) into the run folder *before* `main` runs, so the resume is checked
earlier, by a Hydra callback (`on_run_start`, registered in conf/hydra/default.yaml): a refused resume, or a folder
that is not a run, leaves every file as it was and creates nothing. Only an accepted resume writes, and then it
adds to the run's records rather than replacing them: `train.log` is appended to, and Hydra's record of this
invocation goes to `.hydra/resumes/<date>_<time>/` beside the run's original `.hydra/` files.

The config a resumed run continues with is the run's own: its saved overrides (`.hydra/overrides.yaml`) composed
again, with the overrides given now applied last. Those may change only the keys in `MAY_DIFFER_ON_RESUME`; every
other difference from the run's `config.yaml` is refused, all of them in one line.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from src.continual.validate import ConfigError, validate_config

# What may differ between a run and its continuation: where things are written, how it is logged and checkpointed.
MAY_DIFFER_ON_RESUME = ("resume", "ckpt_path", "auto_requeue", "paths", "logger", "callbacks", "checkpoint",
                        "save_checkpoints", "plots", "threads", "dataset.cache_task_transform",
                        "trainer.default_root_dir", "dataset.source.root")
# Keys added after runs may have been started, with the value that reproduces those runs: a run folder whose
# config.yaml lacks one was made with that value (so it can still be resumed).
ADDED_KEYS = {"steps_per_batch": 1, "eval.every_n_tasks": 1, "eval.tasks": "all"}
# Config groups whose choice may differ (their keys are in MAY_DIFFER_ON_RESUME)
_GROUPS_THAT_MAY_DIFFER = ("logger", "callbacks", "paths", "hydra", "debug", "local")


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def may_differ(name: str) -> bool:
    return any(name == k or name.startswith(k + ".") for k in MAY_DIFFER_ON_RESUME)


def saved_config(run_folder: Path) -> dict:
    return {**ADDED_KEYS, **dict(flatten(OmegaConf.to_container(OmegaConf.load(run_folder / "config.yaml"))))}


def config_differences(before: dict, now: dict, choices_before: dict | None = None,
                       choices_now: dict | None = None) -> list[tuple[str, object, object]]:
    """(key, value in the run, value now) for every key that may not differ but does. A group chosen differently
    (method=lwf vs method=ewc) is one entry, standing for the keys under it."""
    differences, folded = [], []
    for group in sorted((choices_before or {}).keys() & (choices_now or {}).keys()):
        if group.split("/")[0] in _GROUPS_THAT_MAY_DIFFER or choices_before[group] == choices_now[group]:
            continue
        differences.append((group, choices_before[group], choices_now[group]))
        folded.append(group)
    if folded:
        folded.append("name")  # made of the group choices
    for name in sorted(before.keys() | now.keys()):
        if may_differ(name) or any(name == g or name.startswith(g + ".") for g in folded):
            continue
        if before.get(name, "<absent>") != now.get(name, "<absent>"):
            differences.append((name, before.get(name, "<absent>"), now.get(name, "<absent>")))
    return differences


def refusal(key: str, value, differences) -> ConfigError:
    run = ", ".join(f"{name}={old!r}" for name, old, _ in differences)
    this = ", ".join(f"{name}={new!r}" for name, _, new in differences)
    return ConfigError(
        f"{key}={value!r} is invalid: that run was made with {run}; this command has {this} (only paths, loggers, "
        "callbacks and checkpointing may differ: give resume=<folder> alone to continue the run as it was made)"
    )


def check_run_folder(key: str, value, folder: Path, ckpt: Path) -> None:
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"{key}={value!r} is invalid: {folder} is not a run folder (it has no config.yaml)")
    if not ckpt.is_file():
        raise ConfigError(f"{key}={value!r} is invalid: there is no checkpoint {ckpt} (nothing to continue from)")


def _saved_overrides(folder: Path) -> list[str] | None:
    """The run's own overrides, without those that pointed at a checkpoint (a run resumed before this file was
    kept intact has its resume invocation there, which also lists every override)."""
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [str(o) for o in OmegaConf.load(path)]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.input_line for o in parsed if o.key_or_group not in ("resume", "ckpt_path")]


def _merge(saved: list[str], given: list[str]) -> list[str]:
    """The run's overrides, then the ones given now (the later wins). `+key=…` given again replaces the saved one
    (Hydra refuses to add a key twice)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parser = OverridesParser.create()
    added_now = {o.key_or_group for o in parser.parse_overrides(given)
                 if o.type in (OverrideType.ADD, OverrideType.FORCE_ADD)}
    kept = [o.input_line for o in parser.parse_overrides(saved) if o.key_or_group not in added_now]
    return [*kept, *given]


@contextmanager
def _as_job_in(cfg: DictConfig, output_dir: Path):
    """The job part of a full config (with its `hydra` node), with `${hydra:…}` resolving as in a run whose folder
    is `output_dir` (Hydra sets this up only when the job starts)."""
    from hydra.core.hydra_config import HydraConfig

    cfg = cfg.copy()
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        job = cfg.copy()
        with read_write(job), open_dict(job):
            del job["hydra"]
        yield job
    finally:
        HydraConfig.instance().cfg = previous


def resumed_config(config: DictConfig, config_name: str | None) -> DictConfig:
    """The full config (`hydra` node included) that `resume=` continues with; ConfigError if it is not a resumable
    run, or if the overrides given now change what may not change."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    folder = Path(config.resume).absolute()
    ckpt = Path(config.ckpt_path) if config.get("ckpt_path") else folder / "checkpoints" / "last.ckpt"
    check_run_folder("resume", config.resume, folder, ckpt)
    saved = _saved_overrides(folder)
    given = [str(o) for o in config.hydra.overrides.task]
    composed = config
    if saved is not None:
        try:
            composed = GlobalHydra.instance().hydra.compose_config(
                config_name=config_name, overrides=_merge(saved, given), run_mode=RunMode.RUN,
                with_log_configuration=False)
        except Exception as err:  # e.g. a saved override of a key that no longer exists
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"resume={config.resume!r} is invalid: its overrides no longer compose: {first}") from None
    hydra_yaml = folder / ".hydra" / "hydra.yaml"
    choices_before = (dict(OmegaConf.load(hydra_yaml).hydra.runtime.choices) if hydra_yaml.is_file() and saved
                      is not None else None)
    choices_now = dict(composed.hydra.runtime.choices) if choices_before is not None else None
    with _as_job_in(composed, folder) as job:
        now = dict(flatten(OmegaConf.to_container(job, resolve=True)))
        differences = config_differences(saved_config(folder), now, choices_before, choices_now)
        if differences:
            raise refusal("resume", config.resume, differences)
        validate_config(job)  # what main checks first: a resume it would refuse must not write either
    return composed


class ResumeInItsFolder(Callback):
    """Checks `resume=` before Hydra creates or writes anything (see the module docstring), then runs the job with
    the run's own config, in the run's folder."""

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs) -> None:
        try:
            if not config.get("resume"):
                self._continue_restarted_job(config)
            if not config.get("resume"):
                return
            self._continue_in_run_folder(config, resumed_config(config, config_name))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except Exception as err:  # Hydra would only warn and run on: refuse rather than write into the run
            first = (str(err).strip().splitlines() or [""])[0]
            print(f"error: resume={config.resume!r} is invalid: it could not be checked ({type(err).__name__}: "
                  f"{first})", file=sys.stderr)
            sys.exit(2)

    @staticmethod
    def _continue_restarted_job(config: DictConfig) -> None:
        """A job SLURM restarted (src/continual/requeue.py) whose run folder holds a run: run as if the command had
        said `resume=<that folder>`."""
        from hydra.core.hydra_config import HydraConfig

        from src.continual.requeue import folder_to_continue, restart_count

        if restart_count() < 1:
            return
        previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config.copy())  # the folder's name may use `${hydra:…}` (a copy: this
        try:  # marks its hydra node read-only; `${now:…}` is cached in the config itself, as when Hydra resolves it)
            folder = folder_to_continue(Path(str(config.hydra.run.dir)), noted=True)
        finally:
            HydraConfig.instance().cfg = previous
        if folder is not None:
            with read_write(config), open_dict(config):
                config.resume = str(folder)
                config.hydra.overrides.task.append(f"resume='{folder}'")

    @staticmethod
    def _continue_in_run_folder(config: DictConfig, composed: DictConfig) -> None:
        job = OmegaConf.to_container(composed, resolve=False)
        with read_write(config), open_dict(config):
            for key, value in job.items():
                if key != "hydra":
                    config[key] = value
            for key in [k for k in config if k not in job]:
                del config[key]
            config.hydra.runtime.choices = job["hydra"]["runtime"]["choices"]
            config.hydra.run.dir = str(Path(config.resume).absolute())  # its own folder, whatever hydra.run.dir says
            if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP's other ranks: Lightning names their subdir
                config.hydra.output_subdir = f".hydra/resumes/{datetime.now():%Y-%m-%d_%H-%M-%S}"
