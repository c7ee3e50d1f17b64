"""Train one model on a sequence of tasks and measure what it forgets.

    python -m src.train                                    # the default: EWC on Split Fashion-MNIST, task-incremental
    python -m src.train method=joint scenario=class trainer.max_epochs=2
    python -m src.train resume=<run folder>                # continue a killed run with its own config
    python -m src.train --help                             # config groups and their options

Composes the config, validates it, builds the DataModule, model, regularizer, loggers and trainer from their
`_target_`s, runs the task loop and returns the objective a sweeper maximises (validation average accuracy when a
validation split exists, else test average accuracy). A run that fails before training leaves a results.json with
status `failed` and the one-line reason; in a multirun such a job fails alone (docs/sweeps.md).
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
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from src.continual import requeue, resume
from src.continual.lightning_import import import_lightning
from src.continual.preemption import stops_on_signal  # preempt: SIGTERM/SIGINT/SIGUSR1 -> checkpoint, exit 128+n
from src.continual.results import SCHEMA_VERSION, write_json_atomic, write_text_atomic
from src.continual.run_lock import RunFolderInUse, hold_run_lock  # preempt: one live run per run folder
from src.continual.threads import set_threads
from src.continual.validate import ConfigError, take_validated_backbone, validate_config
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


# `resume=<folder>` makes that folder the run folder (conf/hydra/default.yaml, src/continual/resume.py)
OmegaConf.register_new_resolver("resume_or", lambda resume, default: str(resume) if resume else default, replace=True)

# What may differ between a run and its continuation (src/continual/resume.py checks the rest)
MAY_DIFFER_ON_RESUME, ADDED_KEYS = resume.MAY_DIFFER_ON_RESUME, resume.ADDED_KEYS


class JobFailed(CompactHydraException):
    """A multirun job that failed: Hydra's launchers record it and run the other jobs (a SystemExit would end the
    whole sweep); Hydra prints this one line and exits 1 at the end of the sweep."""


def checkpoint_to_resume(cfg: DictConfig) -> Path | None:
    """The checkpoint `resume=`/`ckpt_path=` point at, after checking it belongs to a run of the same config (all
    the differences at once). A single-run `resume=` was checked already, before Hydra wrote anything."""
    if not cfg.get("resume") and not cfg.get("ckpt_path"):
        return None
    key = "ckpt_path" if cfg.get("ckpt_path") else "resume"
    ckpt = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else Path(cfg.resume) / "checkpoints" / "last.ckpt"
    source = Path(cfg.resume) if cfg.get("resume") else ckpt.parent.parent
    resume.check_run_folder(key, cfg[key], source, ckpt)
    now = dict(resume.flatten(OmegaConf.to_container(cfg, resolve=True)))
    differences = resume.config_differences(resume.saved_config(source), now)
    if differences:
        raise resume.refusal(key, cfg[key], differences)
    return ckpt


def fail_before_training(run_dir: Path, cfg: DictConfig, err: Exception, code: int = 2) -> None:
    """One line, and a results.json (status `failed`) that says why: a new one, or the resumed run's own with its
    status changed. Then exit `code`, or, in a multirun, fail this job alone."""
    print(f"error: {err}", file=sys.stderr)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        path = run_dir / "results.json"
        try:
            results = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            results = None
        if results is None:
            try:
                config = OmegaConf.to_container(cfg, resolve=True)
            except Exception:  # an interpolation that does not resolve: the config as written
                config = OmegaConf.to_container(cfg, resolve=False)
            results = {"schema_version": SCHEMA_VERSION, "config": config}
        results.update(status="failed", error=str(err))
        try:
            write_json_atomic(path, results)
        except OSError:  # e.g. a run folder that is not writable: the line above is all there is
            pass
    exit_job(code, f"error: {err}")


def exit_job(code: int, line: str) -> None:
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(line)
    sys.exit(code)


def build_task_loop(cfg: DictConfig, run_dir: Path, validate: bool = True, source=None, resume_from: Path | None = None):
    """Everything a run needs, built from the config; `TaskLoop.run()` then trains the whole sequence.
    `validate=False` when the caller has already checked the config; `source`: the dataset source to use instead of
    a new one from the config (e.g. one already loading in the background); `resume_from`: the checkpoint the run
    will continue from (its loggers then continue their logs from there)."""
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
    backbone = take_validated_backbone(cfg, datamodule.input_shape)  # built once per run, by validation
    if backbone is None:
        backbone = instantiate(cfg.model, input_shape=datamodule.input_shape)
    module = ContinualModule(
        backbone, scenario, instantiate(cfg.method), optimizer=instantiate(cfg.optimizer),
        reset_optimizer=cfg.reset_optimizer, steps_per_batch=cfg.get("steps_per_batch", 1),
    )
    datamodule.steps_per_batch = module.steps_per_batch
    loggers = build_loggers(cfg, resume_from)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **requeue.trainer_plugins(cfg))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    loop = TaskLoop(
        trainer, module, datamodule, run_dir,
        epochs_per_task=cfg.trainer.max_epochs, steps_per_task=cfg.trainer.max_steps,
        config=OmegaConf.to_container(cfg, resolve=True), save_checkpoints=cfg.save_checkpoints,
        checkpoint_every_n_steps=cfg.checkpoint.every_n_steps, plots=cfg.get("plots", True),
    )
    loop.results["timing_s"]["data"] = loading
    return loop


def build_loggers(cfg: DictConfig, resume_from: Path | None = None) -> list:
    """The loggers of `logger=…`; when resuming, they continue the run's logs (src/continual/loggers.py)."""
    from src.continual.loggers import LogPosition, previous_wandb_id

    loggers = []
    for node in (cfg.get("logger") or {}).values():
        extra = {}
        if resume_from is not None and "wandb" in str(node.get("_target_", "")).lower():
            run_id = previous_wandb_id(node.save_dir)
            if run_id is not None:
                extra = {"id": run_id, "resume": "allow"}
        loggers.append(instantiate(node, **extra))
    if resume_from is not None:
        position = LogPosition.of_checkpoint(resume_from)
        for logger in loggers:
            if hasattr(logger, "continue_from"):
                logger.continue_from(position)
    return loggers


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@stops_on_signal  # preempt
def main(cfg: DictConfig) -> float | None:
    # resume=<folder> continues in that folder (in a single run it is also Hydra's: src/continual/resume.py)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if not cfg.get("resume") and HydraConfig.get().mode == RunMode.MULTIRUN:  # a single run's: ResumeInItsFolder
        restarted = requeue.folder_to_continue(output_dir)  # a job SLURM requeued continues its run
        if restarted is not None:
            with open_dict(cfg):
                cfg.resume = str(restarted)
    run_dir = Path(cfg.resume) if cfg.get("resume") else output_dir
    preloaded = "lightning" in sys.modules  # a forkserver sweep worker (src/continual/sweep_workers.py), a later job
    failures_to = output_dir  # a refused resume= or ckpt_path= leaves the run it names as it was
    try:
        validate_config(cfg)
        threads = set_threads(cfg.get("threads", "auto"), OmegaConf.to_container(HydraConfig.get().launcher),
                              HydraConfig.get().mode == RunMode.MULTIRUN)  # cores ÷ parallel jobs of a local sweep
        ckpt = checkpoint_to_resume(cfg)
        failures_to = run_dir
        previous = run_dir / "results.json"
        if ckpt is not None and cfg.get("resume") and previous.is_file():
            results = json.loads(previous.read_text())
            if results.get("status") == "finished":
                log.info("%s already finished; nothing to do", run_dir)
                return results["val_avg_acc"] if results.get("val_avg_acc") is not None else results["avg_acc"]
        hold_run_lock(run_dir)  # preempt: a second live run into this folder is refused (exit 2)
        source = LoadingInBackground(instantiate(cfg.dataset.source))
        import_lightning()  # while the dataset loads; without what torchmetrics would import for nothing
        from src.continual.module import NonFiniteLossError
        from src.continual.task_loop import ResumeError

        loop = build_task_loop(cfg, run_dir, validate=False, source=source, resume_from=ckpt)
        loop.results["threads"] = {**threads, "imports_preloaded": preloaded}
    except RunFolderInUse as err:  # the folder belongs to a live run: write nothing into it
        print(f"error: {err}", file=sys.stderr)
        return exit_job(2, f"error: {err}")
    except (ConfigError, DatasetError) as err:
        return fail_before_training(failures_to, cfg, err)
    try:  # from here on the task loop keeps results.json (status `failed` and why, if it fails)
        results = loop.run(resume_from=ckpt)
    except (ConfigError, DatasetError, ResumeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_job(2, f"error: {err}")
    except NonFiniteLossError as err:  # results.json says failed and why; the last good checkpoint stays
        print(f"error: {err}", file=sys.stderr)
        return exit_job(3, f"error: {err}")
    return results["val_avg_acc"] if results["val_avg_acc"] is not None else results["avg_acc"]


if __name__ == "__main__":
    from src.continual.fast_exit import exit_now
    from src.continual.overrides import explain_composition_errors

    explain_composition_errors(main)  # a misspelled key or option: one line naming the key meant, exit 2
    main()
    exit_now(0)  # succeeded, everything written and closed: skip the interpreter's teardown (src/continual/fast_exit.py)
