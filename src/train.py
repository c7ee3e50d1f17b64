"""Train one model on a sequence of tasks and measure what it forgets.

    python -m src.train                                    # EWC-free default: finetune on Split Fashion-MNIST
    python -m src.train method=joint scenario=class trainer.max_epochs=2
    python -m src.train --help                             # config groups and their options

Composes the config, validates it, builds the DataModule, model, regularizer, loggers and trainer from their
`_target_`s, runs the task loop and returns the objective a sweeper maximises (validation average accuracy when a
validation split exists, else test average accuracy).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.continual.preemption import stops_on_signal  # preempt: SIGTERM/SIGINT/SIGUSR1 -> checkpoint, exit 128+n
from src.continual.results import write_text_atomic
from src.continual.run_lock import hold_run_lock  # preempt: one live run per run folder
from src.continual.validate import ConfigError, validate_config
from src.data.download import DatasetError
from src.data.source import LoadingInBackground

# Lightning (and all that imports it: the module, the task loop) is imported inside `main`/`build_task_loop`, after
# the dataset has started loading in the background: its ≈ 2.6 s of imports then hide the loading (docs/speed.md).

log = logging.getLogger("src.train")

# Lightning's advice for DataLoader workers does not apply: our loaders cut batches from in-memory tensors.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*is not a `torch.utils.data.DataLoader`.*")
warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
# Our loaders resume mid-epoch themselves (TaskSequenceDataModule.train_dataloader), so Lightning's advice is moot.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
# Lightning's start-up notices (accelerator summary, tips) and per-fit "stopped" lines drown the task-boundary lines.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


# `resume=<folder>` makes that folder the run folder (conf/hydra/default.yaml)
OmegaConf.register_new_resolver("resume_or", lambda resume, default: str(resume) if resume else default, replace=True)

# What may differ between a run and its continuation: where things are written, how often it checkpoints.
MAY_DIFFER_ON_RESUME = ("resume", "ckpt_path", "paths", "logger", "callbacks", "checkpoint", "save_checkpoints",
                        "trainer.default_root_dir")
# Keys added after runs may have been started, with the value that reproduces those runs: a run folder whose
# config.yaml lacks one was made with that value (so it can still be resumed).
ADDED_KEYS = {"steps_per_batch": 1}


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def checkpoint_to_resume(cfg: DictConfig) -> Path | None:
    """The checkpoint `resume=`/`ckpt_path=` point at, after checking it belongs to a run of the same config."""
    if not cfg.get("resume") and not cfg.get("ckpt_path"):
        return None
    key = "ckpt_path" if cfg.get("ckpt_path") else "resume"
    ckpt = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else Path(cfg.resume) / "checkpoints" / "last.ckpt"
    source = Path(cfg.resume) if cfg.get("resume") else ckpt.parent.parent
    if not (source / "config.yaml").is_file():
        raise ConfigError(f"{key}={cfg[key]!r} is invalid: {source} is not a run folder (it has no config.yaml)")
    if not ckpt.is_file():
        raise ConfigError(f"{key}={cfg[key]!r} is invalid: there is no checkpoint {ckpt} (nothing to continue from)")
    before = {**ADDED_KEYS, **dict(_flatten(OmegaConf.to_container(OmegaConf.load(source / "config.yaml"))))}
    now = dict(_flatten(OmegaConf.to_container(cfg, resolve=True)))
    for name in sorted(before.keys() | now.keys()):
        if any(name == k or name.startswith(k + ".") for k in MAY_DIFFER_ON_RESUME):
            continue
        if before.get(name, "<absent>") != now.get(name, "<absent>"):
            raise ConfigError(
                f"{key}={cfg[key]!r} is invalid: that run was made with {name}={before.get(name, '<absent>')!r}, "
                f"this config has {name}={now.get(name, '<absent>')!r}"
            )
    return ckpt


def build_task_loop(cfg: DictConfig, run_dir: Path, validate: bool = True, source=None):
    """Everything a run needs, built from the config; `TaskLoop.run()` then trains the whole sequence.
    `validate=False` when the caller has already checked the config; `source`: the dataset source to use instead of
    a new one from the config (e.g. one already loading in the background)."""
    import lightning as L

    from src.continual.module import ContinualModule
    from src.continual.task_loop import TaskLoop

    if validate:
        validate_config(cfg)
    is_main_process = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    if is_main_process and not cfg.get("resume"):
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    loading = time.perf_counter()
    datamodule = instantiate(cfg.dataset, _recursive_=True)
    if source is not None:
        datamodule.source = source
    datamodule.setup()
    loading = time.perf_counter() - loading  # with a background source: only what was left when it was needed
    scenario = instantiate(cfg.scenario, n_tasks=datamodule.n_tasks, classes_per_task=datamodule.classes_per_task)
    backbone = instantiate(cfg.model, input_shape=datamodule.input_shape)
    module = ContinualModule(
        backbone, scenario, instantiate(cfg.method), optimizer=instantiate(cfg.optimizer),
        reset_optimizer=cfg.reset_optimizer, steps_per_batch=cfg.get("steps_per_batch", 1),
    )
    datamodule.steps_per_batch = module.steps_per_batch
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    loop = TaskLoop(
        trainer, module, datamodule, run_dir,
        epochs_per_task=cfg.trainer.max_epochs, steps_per_task=cfg.trainer.max_steps,
        config=OmegaConf.to_container(cfg, resolve=True), save_checkpoints=cfg.save_checkpoints,
        checkpoint_every_n_steps=cfg.checkpoint.every_n_steps,
    )
    loop.results["timing_s"]["data"] = loading
    return loop


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@stops_on_signal  # preempt
def main(cfg: DictConfig) -> float | None:
    # resume=<folder> continues in that folder (it is also Hydra's run folder unless hydra.run.dir says otherwise)
    run_dir = Path(cfg.resume) if cfg.get("resume") else Path(HydraConfig.get().runtime.output_dir)
    try:
        validate_config(cfg)
        ckpt = checkpoint_to_resume(cfg)
        previous = run_dir / "results.json"
        if ckpt is not None and cfg.get("resume") and previous.is_file():
            results = json.loads(previous.read_text())
            if results.get("status") == "finished":
                log.info("%s already finished; nothing to do", run_dir)
                return results["val_avg_acc"] if results.get("val_avg_acc") is not None else results["avg_acc"]
        hold_run_lock(run_dir)  # preempt: a second live run into this folder is refused (exit 2)
        source = LoadingInBackground(instantiate(cfg.dataset.source))
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    from src.continual.module import NonFiniteLossError  # Lightning: imported while the dataset loads
    from src.continual.task_loop import ResumeError

    try:
        results = build_task_loop(cfg, run_dir, validate=False, source=source).run(resume_from=ckpt)
    except (ConfigError, DatasetError, ResumeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:  # results.json says failed and why; the last good checkpoint stays
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    return results["val_avg_acc"] if results["val_avg_acc"] is not None else results["avg_acc"]


if __name__ == "__main__":
    main()
