"""One line and exit 2 for a command line Hydra cannot compose, with the key that was probably meant.

Hydra refuses a misspelled key (`method.lamda=100`), an unknown group option (`method=ewx`) and a run folder it cannot
create while it composes and prepares the job — before `main` runs — with a multi-line message and exit 1.
`explain_composition_errors(main)` wraps Hydra's own error reporter, through which every composition and every job
runs, so that these failures print `error: <key>=<value> is invalid: <allowed>` instead. Nothing runs until something
fails: a good command line costs nothing, and `--help`, `--cfg`, `-m` and sweeps go through Hydra unchanged.
"""

from __future__ import annotations

import inspect
import re
import sys

# Spellings from other libraries and papers; suggested when the config has the key on the right.
ALIASES = {
    "learning_rate": "lr", "lr_rate": "lr", "epsilon": "eps", "beta1": "betas", "beta2": "betas", "beta": "betas",
    "wd": "weight_decay", "l2": "weight_decay", "decay": "weight_decay", "lam": "lambda", "epochs": "max_epochs",
    "steps": "max_steps", "gpus": "devices", "n_gpus": "devices", "temp": "temperature", "T": "temperature",
}


def closest(name: str, candidates) -> str | None:
    """The candidate `name` was most probably meant to be (difflib, or a known alias), or None."""
    import difflib

    candidates = list(candidates)
    if ALIASES.get(name) in candidates:
        return ALIASES[name]
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not match:  # case slips: `Lambda`, `LR`
        match = [c for c in candidates if c.lower() == name.lower()]
    return match[0] if match else None


def did_you_mean(name: str, candidates, prefix: str = "", what: str = "its keys are") -> str:
    """"; did you mean <prefix><best>?", or the list of candidates when none is close (one line either way)."""
    candidates = sorted(c for c in candidates if not str(c).startswith("_"))
    best = closest(name, candidates)
    if best is not None:
        return f"; did you mean {prefix}{best}?"
    return f"; {what} {', '.join(candidates)}" if candidates else ""


def _overrides_on_command_line() -> list:
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    try:
        return OverridesParser.create().parse_overrides(args.overrides)
    except Exception:
        return []


def _given(overrides, key: str, fallback: str) -> str:
    """How the command line wrote `key=value` (the value as typed), else `fallback`."""
    for override in reversed(overrides):  # the last one wins, as in Hydra
        if override.key_or_group == key:
            return override.input_line
    return fallback


def _composed_without(overrides, bad_key: str, config_name: str):
    """The config the command line gives without the override of `bad_key` (a sweep counts with its first value)."""
    from hydra import compose

    kept = []
    for override in overrides:
        if override.key_or_group == bad_key or override.key_or_group.startswith(bad_key + "."):
            continue
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()), None)
            if first is None:
                continue
            prefix = "+" if override.is_add() else ""
            kept.append(f"{prefix}{override.key_or_group}={first}")
        else:
            kept.append(override.input_line)
    return compose(config_name, overrides=kept, return_hydra_config=True)


def _misspelled_key(err, config_name: str) -> str | None:
    from omegaconf import DictConfig, OmegaConf

    cause = err.__cause__
    missing = getattr(cause, "full_key", None)  # the first part of the key that does not exist
    match = re.search(r"Could not override '([^']+)'", str(err))
    deleted = re.search(r"Could not delete from config\. '([^']+)' does not exist", str(err))
    if deleted:  # `~key`
        match, missing = deleted, deleted.group(1)
    if not missing or not match:
        return None
    key = match.group(1)
    overrides = _overrides_on_command_line()
    appended = re.search(r"use \+(\S+)", str(err))
    given = _given(overrides, key, appended.group(1) if appended else key)
    try:
        cfg = _composed_without(overrides, key, config_name)
    except Exception:
        return None
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices) if "hydra" in cfg else {}
    parent, _, name = missing.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    siblings = list(node.keys()) if isinstance(node, DictConfig) else []
    if not parent and not key.startswith("hydra.") and "hydra" in siblings:
        siblings.remove("hydra")
    # the group the key would belong to: the longest prefix that is a config group
    parts, owner, group = missing.split("."), "the config (conf/" + config_name + ".yaml)", None
    for i in range(len(parts) - 1, 0, -1):
        if choices.get("/".join(parts[:i])):
            group = "/".join(parts[:i])
            owner = f"{'.'.join(parts[:i])}={choices[group]}"
            break
    rest = key[len(missing):]  # what followed the missing part (`traner.max_epochs`: `.max_epochs`)
    best = closest(name, [s for s in siblings if not str(s).startswith("_")])
    if best is not None:
        return f"{given} is invalid: {missing} is not a key of {owner}; did you mean {parent + '.' if parent else ''}{best}{rest}?"
    elsewhere = _in_other_options(group, missing, choices.get(group)) if group else None
    hint = f"; {elsewhere}" if elsewhere else did_you_mean(name, siblings)
    return f"{given} is invalid: {missing} is not a key of {owner}{hint}"


def _in_other_options(group: str, key: str, chosen: str) -> str | None:
    """"scenario.train_classes is a key of scenario=class": the key meant, found in another option of the group."""
    from omegaconf import DictConfig, OmegaConf

    from src.config import ROOT

    inside = key.split(".")[len(group.split("/")):]
    parent, name = inside[:-1], inside[-1]
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        if path.stem == chosen:
            continue
        try:
            node = OmegaConf.load(path)
            for part in parent:
                node = node.get(part)
        except Exception:
            continue
        if isinstance(node, DictConfig):
            best = closest(name, [k for k in node.keys() if not str(k).startswith("_")])
            if best is not None:
                option = group.replace("/", ".")
                return f"{'.'.join([option, *parent, best])} is a key of {option}={path.stem}"
    return None


def _unknown_option(err) -> str | None:
    options, missing = getattr(err, "options", None), getattr(err, "missing_cfg_file", None)
    if not options or not missing or "/" not in missing:
        return None
    group, _, option = missing.rpartition("/")
    key = group.replace("/", ".") if group.startswith("hydra/") else group
    given = _given(_overrides_on_command_line(), key, f"{key}={option}")
    best = closest(option, options)
    hint = f"; did you mean {key}={best}?" if best else ""
    return f"{given} is invalid: not an option of {key}, which has {', '.join(sorted(options))}{hint}"


def _run_folder(err: OSError) -> str:
    overrides = _overrides_on_command_line()
    keys = {o.key_or_group: o for o in overrides}
    key = next((k for k in ("resume", "hydra.run.dir", "hydra.sweep.dir") if k in keys), "hydra.run.dir")
    given = _given(overrides, key, f"{key}={err.filename}")
    return (f"{given} is invalid: the run folder must be a folder this user can create and write "
            f"({err.filename}: {err.strerror})")


def _os_error_in(err: BaseException | None, depth: int = 4) -> OSError | None:
    """The OSError about a file that `err` is, or was raised from (through `__cause__`/`__context__`)."""
    while err is not None and depth > 0:
        if isinstance(err, OSError) and err.filename is not None:
            return err
        err, depth = err.__cause__ or err.__context__, depth - 1
    return None


def one_line(err: BaseException, task_function, config_name: str = "train") -> str | None:
    """The one-line explanation of a failure Hydra reports before `task_function` ran, or None to leave it to Hydra."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    try:
        if isinstance(err, MissingConfigException):
            return _unknown_option(err)
        if isinstance(err, ConfigCompositionException):
            return _misspelled_key(err, config_name)
        os_error = _os_error_in(err)  # Hydra wraps some (logging's "Unable to configure handler 'file'")
        if os_error is not None:
            code = inspect.unwrap(task_function).__code__
            tb, in_task = err.__traceback__, False
            while tb is not None:
                in_task = in_task or tb.tb_frame.f_code is code
                tb = tb.tb_next
            return None if in_task else _run_folder(os_error)
    except Exception:  # explaining must never hide the original error
        return None
    return None


def explain_composition_errors(task_function, config_name: str = "train") -> None:
    """Make Hydra's composition failures one line and exit 2 (call before the `@hydra.main` function).

    Wraps `hydra._internal.utils.run_and_report` (Hydra 1.1–1.3): should a later Hydra lack it, this does nothing and
    Hydra's own messages come back unchanged."""
    import hydra._internal.utils as hydra_utils

    try:
        config_name = hydra_utils.get_args_parser().parse_known_args(sys.argv[1:])[0].config_name or config_name
    except BaseException:  # a bad command line: Hydra's own parser says so
        pass

    report = getattr(hydra_utils, "run_and_report", None)
    if report is None or getattr(report, "explains", False):
        return

    def run_and_report(func):
        def explained():
            try:
                return func()
            except Exception as err:
                line = one_line(err, task_function, config_name)
                if line is None:
                    raise
                print(f"error: {line}", file=sys.stderr)
                sys.exit(2)

        return report(explained)

    run_and_report.explains = True
    hydra_utils.run_and_report = run_and_report
