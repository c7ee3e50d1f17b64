"""Fine-tuning: train each task in turn with nothing added — the lower bound every method must beat."""

from src.methods.base import Regularizer


class Finetune(Regularizer):
    pass
