"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

At the end of every task a frozen copy of the network (the *teacher*) is kept. While task t trains, the *student* is
trained on task t's labels plus a distillation term that keeps its outputs for the old tasks close to the teacher's,
computed on task t's own inputs: LwF never stores or replays old data.

    KD  = T² · KL( softmax(teacher_old(x) / T) ‖ softmax(student_old(x) / T) )          (batch mean)
    L   = w_ce · CE + w_kd · KD

Every choice below moves the numbers (PRIOR_ART.md, pitfalls 8–11), so each is written down with its reason.

The distillation term
    Computed in log space on both sides (`log_softmax`, `F.kl_div(..., log_target=True, reduction="batchmean")`):
    no `log(softmax)` underflow, and `batchmean` is the mathematically correct KL per sample (sum over classes, mean
    over the batch). KL differs from Li & Hoiem's "modified cross-entropy" −Σ p log q only by the teacher's entropy,
    a constant, so the gradients are identical; KL has the advantage of being exactly 0 when the student equals the
    teacher, which makes the logged `kd` readable.
    `t_squared` (default true) multiplies by T², as Hinton et al. (2015) advise: the soft-target gradients scale as
    1/T², so without it changing T silently changes the strength of the regulariser. Li & Hoiem do not apply it, and
    van de Ven et al.'s reference code has it as an option that is off by default (`loss_fn_kd(..., norm=False)`);
    set `t_squared: false` to reproduce them. `temperature` defaults to 2 (Li & Hoiem; van de Ven et al.).

Which logits are distilled (the teacher is from the last trained task τ = t−1; "old" = tasks 0…τ)
    task-incremental   every old task's own head (its column block), each softmaxed over its own head — that is
                       how those heads are used at test time — and the per-head KL terms are averaged over the old
                       tasks (van de Ven et al. 2022 average over their per-task "replays"). Li & Hoiem sum over the
                       old tasks: that is (t−1)·KD, i.e. `weighting: van_de_ven`.
    class-incremental  `distill: old` (default): the logits of all classes of tasks 0…τ, softmaxed together, for
                       student and teacher alike — a proper KL between two distributions over the old classes, and
                       the standard LwF adaptation to a single growing head (e.g. FACIL's class-IL LwF).
                       `distill: all_active`: the student's softmax over all classes seen so far (tasks 0…t) against
                       the teacher's old-class probabilities padded with zeros for the new classes, van de Ven et al.'s
                       variant (their `loss_fn_kd` pads the targets with zeros). Here the distillation also pushes
                       probability mass away from the new classes, on new-task inputs.
                       The padded entries contribute 0·log 0 = 0, so this is computed as the KL restricted to the old
                       columns of the student's log-softmax over all active columns — no −inf·0 = NaN.
    domain-incremental the one shared head (all outputs). `distill` only matters in class-incremental learning.
    Which classes the *cross-entropy* covers in class-incremental learning (only the current task's, or all seen
    so far) is the scenario's option `scenario.train_classes: current | seen`; LwF uses the scenario's CE as is.

The weighting (t = number of tasks so far = current task + 1; KD as above)
    convex      α·CE + (1−α)·KD                (default; the form of the issue and of Hinton-style distillation)
    additive    CE + λ_o·KD                    (Li & Hoiem's L_new + λ_o·L_old, with `lambda_o`; they use λ_o = 1)
    van_de_ven  task/domain: CE + (t−1)·KD;    class: (1/t)·CE + (1−1/t)·KD    (van de Ven et al. 2022: the new
                task counts as one of t tasks; in their code the per-task KD terms are averaged and then multiplied
                by t−1 outside class-IL, and mixed with "rnt" = 1/t in class-IL)
    On the first task there is no teacher: the loss is the CE alone (whatever the weighting) and `kd` is logged as 0.
    `alpha` defaults to 0.3: the best (or within noise of the best) validation accuracy of a sweep over 0.1…0.9
    in both scenarios on Split Fashion-MNIST (experiments/lwf/README.md).

The teacher
    A deep copy of `backbone` + `head` only (not the LightningModule: that holds this regulariser and the metrics),
    taken in `on_task_end`, put in eval mode (dropout off, BatchNorm statistics frozen — a popular library forgot),
    with `requires_grad` off and its copied `.grad`s dropped. It is not a submodule of the LightningModule, so it is
    in no optimizer, in no `module.parameters()`, and Lightning's `module.train()` never flips it back to train mode.
    In the training step it runs under `torch.no_grad()` on the very batch the student sees (after the DataModule's
    on-device normalisation and transform, so teacher and student see the same augmented image — another library
    precomputes teacher outputs on non-augmented images). `no_grad` rather than `inference_mode`: inference tensors
    cannot be saved for backward, and `kl_div` saves its target. The teacher is moved lazily to the device of the
    student's logits (Lightning moves the module between devices around `fit`/`test`, never the teacher). Under DDP
    every rank runs `on_task_end` and so holds its own identical copy; nothing is communicated.
    It is regulariser state: `state_dict()` holds its weights and buffers and the task it is from; `load_state_dict`
    keeps them and the teacher is rebuilt from the module's architecture the next time `on_task_start` or `loss`
    sees the module (the interface hands `load_state_dict` no module).

Warm-up (`warmup_epochs` > 0)
    Li & Hoiem first train only the new task's output layer with the shared trunk and the old heads frozen, then
    everything. Here, in `on_task_start` of every task t ≥ 1 (on task 0 the trunk is random and there is nothing to
    protect): the backbone is put in eval mode and its features for task t's training samples are computed once
    (`datamodule.task_batches`, i.e. task t's data only); then `warmup_epochs` epochs of shuffled mini-batches
    (`datamodule.batch_size`) train only the rows of `head` that are task t's outputs, with their own Adam
    (`warmup_lr`), on the scenario's cross-entropy (no KD: the frozen parts cannot move the old outputs in task-IL).
    Domain-incremental learning has no new head (one shared head), so warm-up is refused there. Under DDP each rank
    warms up on its shard and the new rows are then averaged over ranks, so all ranks start task t identical.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from src.continual.validate import ConfigError
from src.methods.base import Regularizer
from src.models.speed import compile_copy

log = logging.getLogger(__name__)

WEIGHTINGS = ("convex", "additive", "van_de_ven")
DISTILL = ("old", "all_active")


# ---- the math: pure functions ------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      t_squared: bool = True) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) over the last dimension, summed over any middle dimensions and
    averaged over the batch (dimension 0); × T² when `t_squared`.

    If the student has more columns than the teacher (class-IL `distill: all_active`), the student is normalised
    over all its columns and the teacher's distribution is zero-padded to that width.
    """
    n_teacher = teacher_logits.shape[-1]
    student_logp = F.log_softmax(student_logits / temperature, dim=-1)[..., :n_teacher]
    teacher_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    kd = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")
    return kd * temperature**2 if t_squared else kd


def distilled_logits(scenario, student_logits, teacher_logits, teacher_task: int, current_task: int,
                     distill: str = "old"):
    """(student part, teacher part) that `distillation_loss` compares, for `scenario`; task-IL parts are stacked
    (batch, old tasks, classes per task) so that each old head gets its own softmax."""
    if scenario.name == "task":
        old = range(teacher_task + 1)
        return (torch.stack([scenario.logits_of_task(student_logits, s) for s in old], dim=1),
                torch.stack([scenario.logits_of_task(teacher_logits, s) for s in old], dim=1))
    if scenario.name == "class":
        n_old = scenario.active(teacher_task)
        n_student = n_old if distill == "old" else scenario.active(current_task)
        return student_logits[:, :n_student], teacher_logits[:, :n_old]
    if scenario.name == "domain":
        return student_logits, teacher_logits
    raise ValueError(f"LwF does not know scenario {scenario.name!r}")


def loss_weights(weighting: str, scenario_name: str, n_tasks_so_far: int, alpha: float = 0.5,
                 lambda_o: float = 1.0) -> tuple[float, float]:
    """(weight of CE, weight of KD) once a teacher exists (n_tasks_so_far ≥ 2)."""
    t = n_tasks_so_far
    if weighting == "convex":
        return alpha, 1.0 - alpha
    if weighting == "additive":
        return 1.0, lambda_o
    if weighting == "van_de_ven":
        return (1.0 / t, 1.0 - 1.0 / t) if scenario_name == "class" else (1.0, float(t - 1))
    raise ConfigError(f"method.weighting={weighting!r} is invalid: one of {', '.join(WEIGHTINGS)}")


def snapshot(module) -> nn.Sequential:
    """A frozen deep copy of the module's network (backbone + head): eval mode, no gradients, no copied `.grad`s.
    A `model.compile=true` backbone is compiled again in the copy (`deepcopy` drops the compiled forward)."""
    teacher = nn.Sequential(compile_copy(copy.deepcopy(module.backbone)), copy.deepcopy(module.head))
    for p in teacher.parameters():
        p.grad = None
    return teacher.eval().requires_grad_(False)


# ---- the regularizer ---------------------------------------------------------------------------------------------
class LwF(Regularizer):
    def __init__(self, alpha: float = 0.3, temperature: float = 2.0, t_squared: bool = True,
                 weighting: str = "convex", lambda_o: float = 1.0, distill: str = "old",
                 warmup_epochs: int = 0, warmup_lr: float = 1e-3):
        checks = [
            (0.0 <= alpha <= 1.0, "alpha", alpha, "a number in [0, 1]"),
            (temperature > 0, "temperature", temperature, "a number > 0"),
            (weighting in WEIGHTINGS, "weighting", weighting, f"one of {', '.join(WEIGHTINGS)}"),
            (lambda_o >= 0, "lambda_o", lambda_o, "a number >= 0"),
            (distill in DISTILL, "distill", distill, f"one of {', '.join(DISTILL)}"),
            (isinstance(warmup_epochs, int) and warmup_epochs >= 0, "warmup_epochs", warmup_epochs, "an integer >= 0"),
            (warmup_lr > 0, "warmup_lr", warmup_lr, "a number > 0"),
        ]
        for ok, key, value, allowed in checks:
            if not ok:
                raise ConfigError(f"method.{key}={value!r} is invalid: {allowed}")
        self.alpha, self.temperature, self.t_squared = float(alpha), float(temperature), bool(t_squared)
        self.weighting, self.lambda_o, self.distill = weighting, float(lambda_o), distill
        self.warmup_epochs, self.warmup_lr = warmup_epochs, float(warmup_lr)
        self.teacher: nn.Module | None = None
        self.teacher_task = -1  # the last task the teacher was trained on; -1: no teacher yet
        self._restored: dict | None = None  # teacher weights from a checkpoint, waiting for a module to shape them

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def on_task_start(self, task, module, datamodule) -> None:
        self._materialise(module)
        if self.warmup_epochs > 0:
            if module.scenario.name == "domain":
                raise ConfigError("method.warmup_epochs > 0 trains a new task's head; domain-incremental learning has "
                                 "one shared head (set method.warmup_epochs=0)")
            if task > 0:
                self._warm_up_new_head(task, module, datamodule)

    def loss(self, module, batch, logits, task_loss):
        teacher = self._teacher_on(module, logits.device)
        if teacher is None:
            return {"loss": task_loss, "task_loss": task_loss, "kd": torch.zeros((), device=logits.device)}
        with torch.no_grad():
            teacher_logits = teacher(batch[0])
        student_part, teacher_part = distilled_logits(
            module.scenario, logits, teacher_logits, self.teacher_task, module.current_task, self.distill
        )
        kd = distillation_loss(student_part, teacher_part, self.temperature, self.t_squared)
        if student_part.dim() == 3:  # task-IL: the mean over the old heads, not their sum
            kd = kd / student_part.shape[1]
        w_ce, w_kd = loss_weights(self.weighting, module.scenario.name, module.current_task + 1, self.alpha,
                                  self.lambda_o)
        return {"loss": w_ce * task_loss + w_kd * kd, "task_loss": task_loss, "kd": kd}

    def on_task_end(self, task, module, datamodule) -> None:
        self.teacher, self.teacher_task, self._restored = snapshot(module), task, None

    # ---- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._restored is not None:
            return {"teacher": self._restored, "teacher_task": self.teacher_task}
        if self.teacher is None:
            return {"teacher": None, "teacher_task": -1}
        weights = {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        return {"teacher": weights, "teacher_task": self.teacher_task}

    def load_state_dict(self, state: dict) -> None:
        self.teacher, self.teacher_task = None, int(state.get("teacher_task", -1))
        self._restored = state.get("teacher")

    def _materialise(self, module) -> None:
        """Rebuild the teacher restored by `load_state_dict`, now that a module gives its architecture."""
        if self._restored is not None:
            teacher = snapshot(module)
            teacher.load_state_dict(self._restored)
            self.teacher, self._restored = teacher, None

    def _teacher_on(self, module, device) -> nn.Module | None:
        self._materialise(module)
        if self.teacher is not None and next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        return self.teacher

    # ---- warm-up -------------------------------------------------------------------------------------------------
    def _warm_up_new_head(self, task, module, datamodule) -> None:
        trainer = getattr(module, "_trainer", None)
        device = trainer.strategy.root_device if trainer is not None else module.device
        module.to(device)
        scenario, head = module.scenario, module.head
        rows = scenario.logits_of_task(torch.arange(head.out_features, device=device)[None], task)[0]

        backbone_was_training = module.backbone.training
        module.backbone.eval()
        features, labels, task_ids = [], [], []
        with torch.no_grad():
            for x, y, t in datamodule.task_batches(task, "train", device=device):
                features.append(module.backbone(x))
                labels.append(y)
                task_ids.append(t)
        module.backbone.train(backbone_was_training)
        features, labels, task_ids = torch.cat(features), torch.cat(labels), torch.cat(task_ids)

        weight = head.weight.detach()[rows].clone().requires_grad_(True)
        bias = head.bias.detach()[rows].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weight, bias], lr=self.warmup_lr)
        generator = torch.Generator().manual_seed(getattr(datamodule, "seed", 0) * 1000 + task)
        batch_size = getattr(datamodule, "batch_size", 128)
        loss = torch.tensor(float("nan"))
        for _ in range(self.warmup_epochs):
            for idx in torch.randperm(len(labels), generator=generator).to(device).split(batch_size):
                full_weight = head.weight.detach().index_put((rows,), weight)
                full_bias = head.bias.detach().index_put((rows,), bias)
                logits = F.linear(features[idx], full_weight, full_bias)
                view, targets = scenario.train_view(logits, labels[idx], task_ids[idx], task)
                loss = F.cross_entropy(view, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                for new in (weight, bias):
                    torch.distributed.all_reduce(new)
                    new /= torch.distributed.get_world_size()
            head.weight[rows] = weight
            head.bias[rows] = bias
        log.info("LwF warm-up of task %d's head: %d epoch(s), last cross-entropy %.4f", task, self.warmup_epochs,
                 float(loss.detach()))
