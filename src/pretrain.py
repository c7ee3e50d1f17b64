"""Pre-train a backbone on a whole dataset (all classes, one head) and save its trunk for `model.pretrained`.

    python -m src.pretrain dataset=split_cifar10 model=convnet_fc trainer.max_epochs=100
    python -m src.train dataset=split_cifar100 model=convnet_fc model.pretrained=pretrained/convnet_fc-split_cifar10.pt \
        model.freeze_trunk=true

The dataset config is the same as for training (source, batch size, augmentation, normalisation); its task split
is ignored: the model learns every class of the training set at once. `trainer.max_epochs` sets the length, or
`trainer.max_steps` when > 0. The checkpoint (`checkpoint=`, by default pretrained/<model>-<dataset>.pt) holds the
trunk's and the backbone's weights, the architecture and the input shape; the test accuracy is printed.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.continual.module import ContinualModule
from src.continual.scenarios import TaskIncremental
from src.continual.validate import ConfigError
from src.data.download import DatasetError
from src.data.tasks import ClassSplit
from src.methods.finetune import Finetune
from src.models.pretrained import save_trunk

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*is not a `torch.utils.data.DataLoader`.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


class _Loaded:
    """A source whose data are already in memory."""

    def __init__(self, data):
        self.data = data

    def load(self):
        return self.data


def pretrain(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.dataset, _recursive_=True)
    data = datamodule.source.load()
    datamodule.source = _Loaded(data)
    datamodule.tasks = ClassSplit(n_tasks=1, classes_per_task=data.n_classes)  # one task: every class
    datamodule.val_fraction = 0.0
    datamodule.setup()
    datamodule.set_task(0)
    backbone = instantiate(cfg.model, input_shape=data.input_shape)
    module = ContinualModule(backbone, TaskIncremental(1, data.n_classes), Finetune(), optimizer=instantiate(cfg.optimizer))
    steps_win = cfg.trainer.get("max_steps", -1) > 0  # as in training: max_steps > 0 wins over max_epochs
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], **({"max_epochs": -1} if steps_win else {}))
    trainer.fit(module, datamodule=datamodule)
    module.trained_up_to = 0
    datamodule.eval_split = "test"
    trainer.test(module, datamodule=datamodule, verbose=False)
    accuracy = module.last_eval[0]
    path = Path(cfg.checkpoint)
    if trainer.is_global_zero:
        save_trunk(path, module.backbone, architecture=cfg.model.architecture, input_shape=data.input_shape,
                   model=OmegaConf.to_container(cfg.model, resolve=True),
                   dataset=OmegaConf.to_container(cfg.dataset.source, resolve=True),
                   steps=trainer.global_step, test_acc=accuracy)
    return {"checkpoint": str(path), "test_acc": accuracy, "steps": trainer.global_step}


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> float:
    try:
        out = pretrain(cfg)
    except (ConfigError, DatasetError, InstantiationException) as err:
        if isinstance(err, InstantiationException):  # a constructor's own one-line complaint (e.g. a shape check)
            if not isinstance(err.__cause__, (ConfigError, DatasetError)):
                raise
            err = err.__cause__
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"\npre-trained {cfg.model.architecture} for {out['steps']} steps: test accuracy {100 * out['test_acc']:.2f}%"
          f"\ncheckpoint: {out['checkpoint']}  (use it with model.pretrained={out['checkpoint']})\n", flush=True)
    return out["test_acc"]


if __name__ == "__main__":
    main()
