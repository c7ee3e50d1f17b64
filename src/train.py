"""Train one model on a sequence of tasks and measure what it forgets.

    python -m src.train                                    # EWC-free default: finetune on Split Fashion-MNIST
    python -m src.train method=joint scenario=class trainer.max_epochs=2
    python -m src.train --help                             # config groups and their options

Composes the config, validates it, builds the DataModule, model, regularizer, loggers and trainer from their
`_target_`s, runs the task loop and returns the objective a sweeper maximises (validation average accuracy when a
validation split exists, else test average accuracy).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.continual.module import ContinualModule
from src.continual.task_loop import TaskLoop
from src.continual.validate import ConfigError, validate_config
from src.data.download import DatasetError

log = logging.getLogger("src.train")

# Lightning's advice for DataLoader workers does not apply: our loaders cut batches from in-memory tensors.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*is not a `torch.utils.data.DataLoader`.*")
warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
# Lightning's start-up notices (accelerator summary, tips) and per-fit "stopped" lines drown the task-boundary lines.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def build_task_loop(cfg: DictConfig, run_dir: Path) -> TaskLoop:
    """Everything a run needs, built from the config; `TaskLoop.run()` then trains the whole sequence."""
    validate_config(cfg)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.dataset, _recursive_=True)
    datamodule.setup()
    scenario = instantiate(cfg.scenario, n_tasks=datamodule.n_tasks, classes_per_task=datamodule.classes_per_task)
    backbone = instantiate(cfg.model, input_shape=datamodule.input_shape)
    module = ContinualModule(
        backbone, scenario, instantiate(cfg.method), optimizer=instantiate(cfg.optimizer),
        reset_optimizer=cfg.reset_optimizer,
    )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return TaskLoop(
        trainer, module, datamodule, run_dir,
        epochs_per_task=cfg.trainer.max_epochs, steps_per_task=cfg.trainer.max_steps,
        config=OmegaConf.to_container(cfg, resolve=True), save_checkpoints=cfg.save_checkpoints,
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = build_task_loop(cfg, run_dir).run()
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return results["val_avg_acc"] if results["val_avg_acc"] is not None else results["avg_acc"]


if __name__ == "__main__":
    main()
