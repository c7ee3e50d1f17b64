"""Checks of the composed config that run before any data are loaded or anything is trained.

Each failure is one line naming the key, the value and what is allowed. Methods check their own keys in their
constructors (cheap: nothing is built), and sources declare `n_classes` and `input_shape` without reading files, so
splits and backbones are checked against the dataset before it is loaded.
"""

from __future__ import annotations

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig


class ConfigError(ValueError):
    pass


def _check(condition: bool, key: str, value, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _build(node, what: str, **kwargs):
    """Instantiate a config node, turning the constructor's complaint into one ConfigError line."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"{what}: {str(cause).splitlines()[0]}") from None


def _choice(group: str, fallback: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"{group}={HydraConfig.get().runtime.choices[group]}"
    except Exception:
        return fallback


def validate_config(cfg: DictConfig) -> None:
    trainer, data = cfg.trainer, cfg.dataset
    steps = trainer.get("max_steps", -1)
    epochs = trainer.get("max_epochs", 1)
    _check(isinstance(steps, int) and (steps == -1 or steps >= 1), "trainer.max_steps", steps,
           "an integer >= 1 (steps per task), or -1 to count epochs")
    if steps == -1:
        _check(isinstance(epochs, int) and epochs >= 1, "trainer.max_epochs", epochs, "an integer >= 1 (epochs per task)")
    for key in ("batch_size", "eval_batch_size"):
        _check(isinstance(data[key], int) and data[key] >= 1, f"dataset.{key}", data[key], "an integer >= 1")
    val = data.get("val_fraction", 0.0)
    _check(isinstance(val, (int, float)) and 0.0 <= val < 1.0, "dataset.val_fraction", val, "a number in [0, 1)")
    on_device = data.get("data_on_device", "auto")
    _check(on_device in (True, False, "auto"), "dataset.data_on_device", on_device, "one of auto, true, false")
    k = cfg.get("steps_per_batch", 1)
    _check(isinstance(k, int) and not isinstance(k, bool) and k >= 1, "steps_per_batch", k, "an integer >= 1")
    if k > 1:  # manual optimisation: Lightning forbids both
        clip = trainer.get("gradient_clip_val", None)
        _check(clip is None, "trainer.gradient_clip_val", clip, f"null when steps_per_batch > 1 (it is {k})")
        accumulate = trainer.get("accumulate_grad_batches", 1)
        _check(accumulate == 1, "trainer.accumulate_grad_batches", accumulate,
               f"1 when steps_per_batch > 1 (it is {k})")
    every = cfg.get("checkpoint", {}).get("every_n_steps", 0)
    _check(isinstance(every, int) and every >= 0, "checkpoint.every_n_steps", every, "an integer >= 0 (0: off)")
    keep = cfg.get("checkpoint", {}).get("keep_every_task", False)
    _check(isinstance(keep, bool), "checkpoint.keep_every_task", keep, "true or false")

    scenario = cfg.scenario
    if "train_classes" in scenario:
        _check(scenario.train_classes in ("seen", "current"), "scenario.train_classes", scenario.train_classes,
               "one of seen, current")
    _build(cfg.method, "method")  # methods validate their own keys (λ ≥ 0, 0 ≤ α ≤ 1, T > 0, …)

    tasks = data.tasks
    _check(isinstance(tasks.n_tasks, int) and tasks.n_tasks >= 1, "dataset.tasks.n_tasks", tasks.n_tasks,
           "an integer >= 1")
    source = _build(data.source, "dataset.source")
    n_classes = getattr(source, "n_classes", None)
    if "classes_per_task" in tasks:
        cpt = tasks.classes_per_task
        _check(isinstance(cpt, int) and cpt >= 1, "dataset.tasks.classes_per_task", cpt, "an integer >= 1")
        if n_classes is not None:
            _check(n_classes % cpt == 0, "dataset.tasks.classes_per_task", cpt,
                   f"must divide the dataset's {n_classes} classes")
            _check(tasks.n_tasks * cpt <= n_classes, "dataset.tasks.n_tasks", tasks.n_tasks,
                   f"n_tasks × classes_per_task = {tasks.n_tasks * cpt} exceeds the dataset's {n_classes} classes")

    input_shape = getattr(source, "input_shape", None)
    if input_shape is not None:
        backbone = _build(cfg.model, "model", input_shape=tuple(input_shape))
        from src.models.speed import eager  # (imports this module)

        try:
            with torch.no_grad(), eager():  # a shape check, not worth compiling a graph for (model.compile=true)
                backbone.eval()(torch.zeros(1, *input_shape))
        except Exception as err:
            raise ConfigError(
                f"{_choice('model', 'model')} cannot take the input of {_choice('dataset', 'the dataset')} "
                f"(shape {tuple(input_shape)}): {str(err).splitlines()[0]}"
            ) from None
