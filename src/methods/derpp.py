"""DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual Learning"): experience replay that
also keeps the model's logits of every stored sample and pulls today's logits of replayed samples towards them.

    L = CE(current batch) + α · MSE(f(x'), z') + β · CE(f(x''), y'')

with (x', z') and (x'', y'') two independent draws of `replay_batch_size` stored samples (z': the logits stored
with x', i.e. the model's output for it in the step that stored it, as in the paper's Algorithm 1 and Mammoth's
`derpp`). All three parts go through ONE forward (current + both replay batches appended to the step's batch).
Everything about the buffer, the preparation of replayed samples and DDP is ER's (`src/methods/er.py`).

Which outputs: the scenario's `train_view` with each replayed sample's task id, for the cross-entropy and for the
MSE alike (stored and current logits cut the same way) — task-incremental: the sample's own task head;
class-incremental: the classes seen so far (Mammoth compares all outputs; the outputs of classes not seen yet are
never trained, so comparing them only adds noise); domain-incremental: the shared head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.continual.validate import ConfigError
from src.methods.er import ER


class DERPP(ER):
    stores_logits = True
    draws = 2

    def __init__(self, alpha: float = 0.3, beta: float = 0.5, **kwargs):
        for key, value in (("alpha", alpha), ("beta", beta)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
                raise ConfigError(f"method.{key}={value!r} is invalid: a number >= 0")
        super().__init__(**kwargs)
        self.alpha, self.beta = float(alpha), float(beta)

    def loss(self, module, batch, logits, task_loss):
        scenario, task, n = module.scenario, module.current_task, self._step["current"]
        _, labels, task_ids = batch
        view, targets = scenario.train_view(logits[:n], labels[:n], task_ids[:n], task)
        ce = F.cross_entropy(view, targets)
        zero = torch.zeros((), device=logits.device)
        terms = {"task_loss": ce, "logit_mse": zero, "replay_ce": zero}
        replayed = self._step.get("replayed")
        if replayed:
            first, second = replayed
            m = len(first["labels"])
            now, _ = scenario.train_view(logits[n : n + m], first["labels"], first["task_ids"], task)
            stored, _ = scenario.train_view(first["logits"], first["labels"], first["task_ids"], task)
            terms["logit_mse"] = F.mse_loss(now, stored)
            view, targets = scenario.train_view(logits[n + m :], second["labels"], second["task_ids"], task)
            terms["replay_ce"] = F.cross_entropy(view, targets)
        self._store(logits)
        return {"loss": ce + self.alpha * terms["logit_mse"] + self.beta * terms["replay_ce"], **terms}
