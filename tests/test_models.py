"""Backbones (MLP, conv nets, reduced and full ResNet-18), shape checks, and pre-trained / frozen trunks."""

import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from src.continual.validate import ConfigError
from src.models.convnet import ConvNet
from src.models.pretrained import FrozenTrunk, build_backbone, save_trunk, trunk_of
from src.models.resnet import ResNet, resnet18, resnet18_reduced
from tests.fake_datasets import cifar10_archive, cifar100_archive, md5, write
from tests.helpers import ROOT, SYNTHETIC, build_loop, compose_config


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("name", "shape", "features"), [
    ("mlp", (1, 28, 28), 400), ("convnet", (1, 28, 28), 128), ("convnet", (3, 32, 32), 128),
    ("convnet_fc", (3, 32, 32), 2000), ("resnet18_reduced", (3, 32, 32), 160), ("resnet18", (3, 32, 32), 512),
    ("resnet18_reduced", (1, 28, 28), 160),
])
def test_every_model_config_builds_for_its_input(tmp_path, name, shape, features):
    backbone = instantiate(compose_config(f"model={name}", run_dir=tmp_path).model, input_shape=shape)
    assert backbone.out_features == features
    assert backbone(torch.zeros(2, *shape)).shape == (2, features)


def test_resnet18_sizes_match_the_papers():
    reduced, full = resnet18_reduced((3, 32, 32)), resnet18((3, 32, 32))
    assert 1.08e6 < n_params(reduced) < 1.10e6  # GEM's reduced ResNet-18 (nf=20): about 1.09M parameters
    assert 11.1e6 < n_params(full) < 11.2e6  # CIFAR ResNet-18: about 11.2M
    first = reduced.net[0]
    assert first.kernel_size == (3, 3) and first.stride == (1, 1) and first.out_channels == 20
    assert [m.out_channels for m in reduced.modules() if isinstance(m, torch.nn.Conv2d)][-1] == 160


def test_van_de_ven_conv_net_flattens_256x2x2_into_two_2000_unit_layers():
    net = ConvNet((3, 32, 32), channels=(16, 32, 64, 128, 256), strides=(1, 2, 2, 2, 2), pooling="flatten",
                  fc=(2000, 2000))
    assert net.trunk(torch.zeros(1, 3, 32, 32)).shape == (1, 1024)
    assert [m.out_features for m in net.fc if isinstance(m, torch.nn.Linear)] == [2000, 2000]
    assert len([m for m in net.trunk if isinstance(m, torch.nn.BatchNorm2d)]) == 5


def test_default_convnet_is_unchanged():
    net = ConvNet((1, 28, 28))
    assert all(k.startswith("net.") for k in net.state_dict()) and net.out_features == 128 and len(net.fc) == 0
    assert ConvNet((1, 8, 8))(torch.zeros(2, 1, 8, 8)).shape == (2, 128)  # small maps shrink to 1×1, as before


@pytest.mark.parametrize(("build", "message"), [
    (lambda: ResNet((3, 4, 4)), "too small"),
    (lambda: ResNet((784,)), "needs images"),
    (lambda: ConvNet((784,)), "needs images"),
    (lambda: ConvNet((1, 28, 28), channels=(8, 8), strides=(2,)), "one stride per layer"),
    (lambda: ConvNet((1, 28, 28), pooling="max"), "pooling"),
    (lambda: build_backbone((1, 8, 8), "src.models.nope.Nope"), "cannot be imported"),
])
def test_a_mismatch_fails_with_one_clear_line(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("entry", ["src.train", "src.pretrain"])
def test_cli_mismatch_is_one_line(tmp_path, entry):
    extra = ["callbacks=none", "logger=none"] if entry == "src.train" else [f"checkpoint={tmp_path}/x.pt"]
    proc = subprocess.run(
        [sys.executable, "-m", entry, f"hydra.run.dir={tmp_path}", *extra, "dataset=split_fmnist",
         "model=resnet18_reduced", *SYNTHETIC, "+dataset.source.shape=[1,4,4]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model=resnet: input (1, 4, 4) is too small")


# ---- pre-trained and frozen trunks --------------------------------------------------------------------------------
def conv_fc(**kwargs):
    return build_backbone((3, 32, 32), "src.models.convnet.ConvNet", channels=[8, 16], strides=[1, 2],
                          pooling="flatten", fc=[32], **kwargs)


def test_pretrained_trunk_is_loaded_and_fc_layers_start_fresh(tmp_path):
    torch.manual_seed(0)
    source = conv_fc()
    path = save_trunk(tmp_path / "b.pt", source, "src.models.convnet.ConvNet", (3, 32, 32))
    torch.manual_seed(1)
    loaded = conv_fc(pretrained=str(path))
    for (name, a), b in zip(source.trunk.state_dict().items(), loaded.trunk.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(source.fc[0].weight, loaded.fc[0].weight)
    mlp = build_backbone((1, 8, 8), "src.models.mlp.MLP", hidden=[16])
    mlp_path = save_trunk(tmp_path / "mlp.pt", mlp, "src.models.mlp.MLP", (1, 8, 8))
    again = build_backbone((1, 8, 8), "src.models.mlp.MLP", hidden=[16], pretrained=str(mlp_path))
    assert all(torch.equal(a, b) for a, b in zip(mlp.state_dict().values(), again.state_dict().values(), strict=True))


def test_frozen_trunk_gets_no_gradient_and_stays_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    path = save_trunk(tmp_path / "b.pt", conv_fc(), "src.models.convnet.ConvNet", (3, 32, 32))
    model = conv_fc(pretrained=str(path), freeze_trunk=True)
    assert isinstance(model, FrozenTrunk) and model.out_features == 32
    assert all(not p.requires_grad for p in model.trunk.parameters())
    assert all(p.requires_grad for p in model.backbone.fc.parameters())
    model.train()
    assert model.training and not model.trunk.training and model.backbone.fc.training
    stats = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    model(torch.randn(8, 3, 32, 32) * 3 + 1).sum().backward()  # a training-mode forward
    assert all(torch.equal(stats[k], v) for k, v in model.trunk.state_dict().items())  # BatchNorm statistics kept
    assert all(p.grad is None for p in model.trunk.parameters())
    assert model.backbone.fc[0].weight.grad is not None
    assert trunk_of(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"junk"), "not a checkpoint"),
    (lambda p: torch.save({"trunk": {"0.weight": torch.zeros(3)}, "architecture": "X", "input_shape": [1]}, p),
     "does not fit"),
])
def test_a_bad_checkpoint_fails_with_one_clear_line(tmp_path, make, message):
    path = tmp_path / "c.pt"
    make(path)
    with pytest.raises(ConfigError) as err:
        conv_fc(pretrained=str(path))
    assert message in str(err.value) and "\n" not in str(err.value) and "model.pretrained" in str(err.value)


def test_pretrain_command_then_training_with_the_frozen_trunk(tmp_path):
    """`python -m src.pretrain` on (generated) CIFAR-10, then Split CIFAR-100 with its frozen conv layers."""
    data = tmp_path / "data"
    ten, hundred = cifar10_archive(), cifar100_archive()
    write(data, {"cifar-10-python.tar.gz": ten, "cifar-100-python.tar.gz": hundred})
    checkpoint = tmp_path / "trunk.pt"
    tiny = ("model.channels=[4,8,8,8,8]", "model.fc=[16,16]")
    proc = subprocess.run(
        [sys.executable, "-m", "src.pretrain", f"hydra.run.dir={tmp_path / 'pre'}", "dataset=split_cifar10",
         "model=convnet_fc", *tiny, "trainer.max_steps=3", f"paths.data_dir={data}", "dataset.source.url=null",
         f"dataset.source.md5={md5(ten)}", f"checkpoint={checkpoint}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model.pretrained={checkpoint}" in proc.stdout
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["architecture"] == "src.models.convnet.ConvNet" and saved["input_shape"] == [3, 32, 32]
    assert saved["steps"] == 3 and 0.0 <= saved["test_acc"] <= 1.0

    loop = build_loop(tmp_path, "dataset=split_cifar100", "model=convnet_fc", *tiny, f"model.pretrained={checkpoint}",
                      "model.freeze_trunk=true", f"paths.data_dir={data}", "dataset.source.url=null",
                      f"dataset.source.md5={md5(hundred)}", "dataset.tasks.n_tasks=2", "dataset.val_fraction=0",
                      "trainer.max_steps=2", "save_checkpoints=false")
    trunk = loop.module.backbone.trunk
    for (name, value), expected in zip(trunk.state_dict().items(), saved["trunk"].values(), strict=True):
        assert torch.equal(value, expected), name
    results = loop.run()
    assert results["status"] == "finished" and results["steps_per_task"] == [2, 2]
    for (name, value), expected in zip(trunk.state_dict().items(), saved["trunk"].values(), strict=True):
        assert torch.equal(value, expected), f"{name} changed although the trunk is frozen"
