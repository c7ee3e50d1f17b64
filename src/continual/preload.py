"""What a run imports before its first training step, for the forkserver of a parallel sweep
(src/continual/sweep_workers.py) to import once."""

from src.continual.lightning_import import import_lightning

import_lightning()
import torch._dynamo  # noqa: E402,F401  (torch.optim imports it at the first step)

import src.continual.task_loop  # noqa: E402,F401
import src.train  # noqa: E402,F401
