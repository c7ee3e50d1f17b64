"""Joint training: at task t, train on the union of tasks 0…t — the usual upper bound (it breaks the continual
setting on purpose by keeping all old data)."""

from src.methods.base import Regularizer


class Joint(Regularizer):
    trains_on_past_tasks = True
