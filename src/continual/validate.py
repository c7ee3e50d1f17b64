"""Checks of the composed config that run before any data are loaded or anything is built.

Each failure is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

from omegaconf import DictConfig


class ConfigError(ValueError):
    pass


def _check(condition: bool, key: str, value, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


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
    tasks = data.tasks
    _check(isinstance(tasks.n_tasks, int) and tasks.n_tasks >= 1, "dataset.tasks.n_tasks", tasks.n_tasks,
           "an integer >= 1")
    if "classes_per_task" in tasks:
        _check(isinstance(tasks.classes_per_task, int) and tasks.classes_per_task >= 1,
               "dataset.tasks.classes_per_task", tasks.classes_per_task, "an integer >= 1")
    scenario = cfg.scenario
    if "train_classes" in scenario:
        _check(scenario.train_classes in ("seen", "current"), "scenario.train_classes", scenario.train_classes,
               "one of seen, current")
