"""Lightning's progress bar for training only: the task loop evaluates every task after every task, and a bar per
evaluation would bury the one line per task boundary."""

from lightning.pytorch.callbacks import TQDMProgressBar


class TrainingProgressBar(TQDMProgressBar):
    def on_test_start(self, trainer, pl_module):
        pass

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        pass

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        pass

    def on_test_end(self, trainer, pl_module):
        pass
