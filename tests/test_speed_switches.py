"""The speed switches `model.compile` and `model.channels_last` (src/models/speed.py), and `trainer.precision=bf16-mixed`.

Both switches must give the same numbers as eager/contiguous runs, keep parameter names (checkpoints, EWC) unchanged,
and keep the EWC Fisher's hooks working. Everything runs on CPU; compile tests use tiny models and a few steps.

Tolerances: inductor fuses kernels and reorders float sums, and a conv in channels_last sums in another order, so
results agree to about 1e-7 per step rather than bit for bit. The runs that compare weights use plain SGD: Adam
divides by √v, which turns a 1e-8 difference in a near-zero gradient into a whole ±lr step (measured: a few weights
off by 2·lr after 12 steps), while SGD keeps differences at the float-reordering level, so weights are compared at
atol 1e-4 (measured: below 1e-6). A real fault moves them by more than 1e-3: for example, the Fisher's hooks
skipped by the compiled forward, or a teacher that shares the student's weights. Accuracies are compared within
0.02 (4 of the 200 test images of a task). EWC's λ is lowered to 10 for SGD (the default λ = 1e4 makes the conv
net's loss non-finite at lr 0.1); the Fisher itself is compared directly.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from src.continual.validate import ConfigError
from src.methods.fisher import fisher_diagonal
from src.models.pretrained import build_backbone
from src.models.speed import is_compiled
from tests.helpers import ROOT, SYNTHETIC, assert_only_the_failure_is_recorded, build_loop

ACC_TOL, WEIGHT_ATOL, WEIGHT_RTOL = 0.02, 1e-4, 1e-3
# 3 tasks of 2 classes, 180 training and 200 test images each; a few steps per task
SMALL = (*SYNTHETIC, "+dataset.source.n_test=100", "dataset.tasks.n_tasks=3", "trainer.max_steps=4",
         "dataset.batch_size=32", "deterministic=true", "save_checkpoints=false")
SGD = ("optimizer=sgd", "optimizer.lr=0.1")  # for comparing weights (see the module docstring)
METHOD = {"finetune": ("method=finetune",), "ewc": ("method=ewc", "method.lambda=10"), "lwf": ("method=lwf",)}
# a small conv net on 3-channel images, trained long enough to be off chance level
CONV = (*SYNTHETIC, "+dataset.source.n_test=100", "+dataset.source.shape=[3,16,16]", "dataset.tasks.n_tasks=2",
        "model=convnet", "model.channels=[8,16]", "trainer.max_epochs=3", "dataset.batch_size=32",
        "deterministic=true", "save_checkpoints=false")


@pytest.fixture
def fresh_dynamo():
    """Empty Dynamo's caches and counters, so that `unique_graphs` shows this test really compiled something."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def run(tmp_path, name, *overrides):
    loop = build_loop(tmp_path / name, *overrides)
    return loop, loop.run()


def weights(loop) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loop.module.state_dict().items()}


def assert_same_numbers(a, b, results_a, results_b):
    """Accuracy matrices within ACC_TOL, the same state_dict keys, weights within the float-reordering tolerance."""
    for row_a, row_b in zip(results_a["acc_matrix"], results_b["acc_matrix"], strict=True):
        assert row_a == pytest.approx(row_b, abs=ACC_TOL)
    wa, wb = weights(a), weights(b)
    assert list(wa) == list(wb)
    for key in wa:
        torch.testing.assert_close(wa[key].float(), wb[key].float(), atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL,
                                   msg=lambda m, key=key: f"{key}: {m}")


def assert_same_fisher(a, b, rtol=1e-4, atol=1e-7):
    ewc_a, ewc_b = a.module.regularizer, b.module.regularizer
    assert ewc_a.tasks == ewc_b.tasks and ewc_a.tasks
    assert ewc_a.precision.keys() == ewc_b.precision.keys()
    torch.testing.assert_close(ewc_a.precision, ewc_b.precision, rtol=rtol, atol=atol)
    assert sum(float(f.sum()) for f in ewc_a.precision.values()) > 0


# ---- model.compile ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["finetune", "ewc", "lwf"])
def test_compile_gives_the_same_numbers_as_eager(tmp_path, fresh_dynamo, method):
    eager_loop, eager = run(tmp_path, "eager", *SMALL, *SGD, *METHOD[method])
    assert compiled_graphs() == 0
    loop, compiled = run(tmp_path, "compiled", *SMALL, *SGD, *METHOD[method], "model.compile=true")
    assert is_compiled(loop.module.backbone) and not is_compiled(eager_loop.module.backbone)
    assert compiled_graphs() > 0  # the compiled forward really ran (a no-op compile would pass everything below)
    assert_same_numbers(loop, eager_loop, compiled, eager)
    if method == "ewc":  # the Fisher's hooks ran although the backbone was compiled before they were added
        assert_same_fisher(loop, eager_loop)
        assert loop.module.regularizer.param_names == eager_loop.module.regularizer.param_names
    if method == "lwf":  # the deep-copied teacher is compiled again, and has its own weights
        teacher, student = loop.module.regularizer.teacher, loop.module
        assert is_compiled(teacher[0])
        assert not {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
        x = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            expected = eager_loop.module.regularizer.teacher(x)
            torch.testing.assert_close(teacher(x), expected, atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL)


@pytest.mark.parametrize("arch", ["mlp", "convnet"])
def test_fisher_of_a_compiled_model_equals_the_eager_fisher(fresh_dynamo, arch):
    """The trap: Dynamo does not guard on hooks added after compilation, so without `eager()` in `fisher_diagonal`
    the recording hooks are skipped by the compiled forward and the Fisher is wrong, with no error."""
    shape, kwargs = (3, 8, 8), ({"hidden": [16, 12]} if arch == "mlp" else {"channels": [4, 8]})
    architecture = {"mlp": "src.models.mlp.MLP", "convnet": "src.models.convnet.ConvNet"}[arch]

    def make(compile):
        torch.manual_seed(0)
        backbone = build_backbone(shape, architecture, compile=compile, **kwargs)
        return nn.Sequential(backbone, nn.Linear(backbone.out_features, 4))

    compiled, eager_model = make(True), make(False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, *shape, generator=g), torch.randint(0, 4, (32,), generator=g)
    for model in (compiled, eager_model):  # as in a run: training steps, then an evaluation, then the Fisher
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.eval()(x)
        model.train()
    assert compiled_graphs() > 0
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    for kind in ("exact", "empirical"):
        got, n = fisher_diagonal(compiled, batches, kind)
        want, _ = fisher_diagonal(eager_model, batches, kind)
        assert n == 32 and got.keys() == want.keys()
        # BatchNorm's running statistics came from the compiled forward: equal up to the order of float sums
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert all(float(f.sum()) > 0 for f in got.values())


def test_compiled_run_checkpoints_have_the_eager_keys_and_resume(tmp_path, fresh_dynamo):
    common = (*SMALL, *SGD, *METHOD["ewc"], "save_checkpoints=true", "checkpoint.keep_every_task=true")
    eager_loop = build_loop(tmp_path / "eager", *common)  # not run: only its names are needed
    loop, full = run(tmp_path, "compiled", *common, "model.compile=true")
    checkpoint = torch.load(loop.run_dir / "checkpoints" / "task_0.ckpt", map_location="cpu", weights_only=False)
    assert list(checkpoint["state_dict"]) == list(eager_loop.module.state_dict())
    assert checkpoint["regularizer"]["param_names"] == [n for n, p in eager_loop.module.named_parameters()
                                                        if p.requires_grad]
    resumed_loop = build_loop(tmp_path / "resumed", *common, "model.compile=true")
    resumed = resumed_loop.run(resume_from=loop.run_dir / "checkpoints" / "task_0.ckpt")
    assert resumed["status"] == "finished" and is_compiled(resumed_loop.module.backbone)
    assert_same_numbers(resumed_loop, loop, resumed, full)


# ---- model.channels_last ---------------------------------------------------------------------------------------------
def test_channels_last_gives_the_same_numbers_and_really_is_channels_last(tmp_path):
    eager_loop, eager = run(tmp_path, "contiguous", *CONV, *SGD, *METHOD["ewc"])
    loop = build_loop(tmp_path / "channels_last", *CONV, *SGD, *METHOD["ewc"], "model.channels_last=true")
    conv_inputs = []
    first_conv = next(m for m in loop.module.backbone.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda m, args: conv_inputs.append(args[0]))
    results = loop.run()
    assert max(results["avg_acc_per_step"]) > 0.6  # learned something: the comparison below means something
    conv_weights = [p for p in loop.module.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    assert not all(p.is_contiguous() for p in conv_weights)  # (3-channel 3×3 kernels: the two formats differ)
    assert conv_inputs and all(x.is_contiguous(memory_format=torch.channels_last) for x in conv_inputs)
    assert_same_numbers(loop, eager_loop, results, eager)
    assert_same_fisher(loop, eager_loop, rtol=1e-4, atol=1e-6)


def test_channels_last_leaves_the_mlp_alone():
    torch.manual_seed(0)
    plain = build_backbone((3, 8, 8), "src.models.mlp.MLP")
    torch.manual_seed(0)
    switched = build_backbone((3, 8, 8), "src.models.mlp.MLP", channels_last=True)
    assert not switched._forward_pre_hooks
    assert all(torch.equal(a, b) and a.stride() == b.stride()
               for a, b in zip(plain.state_dict().values(), switched.state_dict().values(), strict=True))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(plain(x), switched(x))


def test_channels_last_input_hook_ignores_inputs_that_are_not_images():
    from src.models.speed import _channels_last_input

    flat = torch.randn(2, 5)
    assert _channels_last_input(None, (flat,)) is None
    image = torch.randn(2, 3, 4, 4)
    (converted,) = _channels_last_input(None, (image,))
    assert converted.is_contiguous(memory_format=torch.channels_last) and torch.equal(converted, image)


@pytest.mark.slow
def test_the_whole_gpu_recipe_runs_on_cpu(tmp_path, fresh_dynamo):
    """channels_last + compile + bf16-mixed + EWC on a conv net: finite results, a finite float32 Fisher, weights
    still channels_last after training, and the same numbers as eager/contiguous (bf16: wider tolerance)."""
    recipe = (*CONV, "optimizer.lr=0.01", "method=ewc", "trainer.precision=bf16-mixed")
    eager_loop, eager = run(tmp_path, "plain", *recipe)
    loop, results = run(tmp_path, "fast", *recipe, "model.channels_last=true", "model.compile=true")
    assert compiled_graphs() > 0 and results["status"] == "finished"
    assert all(math.isfinite(a) for row in results["acc_matrix"] for a in row)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in loop.module.parameters() if p.dim() == 4)
    assert all(f.dtype == torch.float32 and bool(torch.isfinite(f).all())
               for f in loop.module.regularizer.precision.values())
    for row_a, row_b in zip(results["acc_matrix"], eager["acc_matrix"], strict=True):
        assert row_a == pytest.approx(row_b, abs=0.05)


# ---- trainer.precision=bf16-mixed --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["finetune", "ewc"])
def test_bf16_mixed_runs_end_to_end_on_cpu(tmp_path, method):
    loop = build_loop(tmp_path, *SMALL, f"method={method}", "trainer.precision=bf16-mixed")
    dtypes = []
    loop.module.head.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype) if m.training else None)
    results = loop.run()
    assert results["status"] == "finished" and torch.bfloat16 in dtypes  # autocast really was on while training
    assert all(math.isfinite(a) for row in results["acc_matrix"] for a in row)
    assert results["avg_acc"] > 0.6
    assert all(bool(torch.isfinite(p).all()) and p.dtype == torch.float32 for p in loop.module.parameters())
    if method == "ewc":
        regularizer = loop.module.regularizer
        assert regularizer.tasks == [0, 1, 2] and len(regularizer.fisher_stats) == 3
        assert all(f.dtype == torch.float32 and bool(torch.isfinite(f).all()) for f in regularizer.precision.values())
        assert all(s["mean"] > 0 for s in regularizer.fisher_stats)
        penalty = regularizer.penalty(loop.module)
        assert math.isfinite(float(penalty)) and float(penalty) > 0


# ---- bad values --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "key"), [
    ({"compile": "maybe"}, "model.compile"), ({"compile": 1}, "model.compile"),
    ({"channels_last": "yes"}, "model.channels_last"), ({"compile": True, "compile_mode": "fastest"}, "model.compile_mode"),
])
def test_a_bad_switch_value_is_one_config_error_line(kwargs, key):
    with pytest.raises(ConfigError) as err:
        build_backbone((1, 8, 8), "src.models.mlp.MLP", **kwargs)
    assert str(err.value).startswith(f"{key}=") and "\n" not in str(err.value)


def test_cli_rejects_compile_maybe_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", f"hydra.run.dir={tmp_path}", "callbacks=none", "logger=none",
         "method=finetune", *SYNTHETIC, "model.compile=maybe"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: model.compile='maybe' is invalid: true or false"
    assert_only_the_failure_is_recorded(tmp_path, proc.stderr.strip().splitlines()[-1])  # failed before the run started


def test_data_on_device_auto_means_accelerators_only():
    from src.data.datamodule import TaskSequenceDataModule

    def keeps(setting, device):
        return TaskSequenceDataModule(None, None, data_on_device=setting)._keep_on_device(torch.device(device))

    assert not keeps("auto", "cpu") and keeps("auto", "cuda") and keeps("auto", "mps")
    assert keeps(True, "cpu") and not keeps(False, "cuda")
