"""model=timm: timm architectures without torchvision, local "pretrained" weights and their checks, the pretrained
input transform, LoRA (trainable set and Fisher against the per-sample definition), and full runs offline."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from src.continual.validate import ConfigError
from src.methods.fisher import fisher_coverage, fisher_diagonal
from src.models.timm_backbone import PretrainedInput, build_timm_backbone, import_timm
from tests.helpers import run_train
from tests.test_fisher import Net, assert_same, make_batches, slow_fisher, task_view

TINY_VIT = {"depth": 1, "embed_dim": 16, "num_heads": 2, "img_size": 8, "patch_size": 4}
SYNTHETIC = ["dataset.source._target_=tests.helpers.SyntheticSource", "+dataset.source.n_train=30",
             "+dataset.source.n_test=10", "dataset.eval_batch_size=100", "dataset.batch_size=16", "logger=none"]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_timm_is_imported_without_torchvision():
    import importlib.util

    assert importlib.util.find_spec("torchvision") is None  # the project never installs it
    backbone = build_timm_backbone((1, 28, 28), "resnet18")
    assert backbone.out_features == 512 and not backbone.normalizes_inputs
    assert backbone(torch.zeros(2, 1, 28, 28)).shape == (2, 512)  # built for the data: in_chans=1, no resizing
    assert "torchvision" not in sys.modules  # the placeholders are gone after the import


def test_random_vit_gets_the_data_size_rounded_to_its_patches():
    backbone = build_timm_backbone((1, 28, 28), "vit_tiny_patch16_224")
    assert backbone.trunk.patch_embed.img_size == (32, 32)
    assert backbone(torch.zeros(2, 1, 28, 28)).shape == (2, 192)


def test_pretrained_input_is_grey_to_rgb_resized_and_normalised():
    module = PretrainedInput(3, (6, 6), (0.5, 0.4, 0.3), (0.2, 0.25, 0.5), "bilinear")
    x = torch.rand(2, 1, 4, 4)
    expected = F.interpolate(x.expand(-1, 3, -1, -1), size=(6, 6), mode="bilinear", align_corners=False)
    expected = (expected - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(module(x), expected)


def test_datamodule_hands_a_self_normalising_backbone_unit_range_images():
    from src.data.datamodule import TaskSequenceDataModule
    from src.data.tasks import ClassSplit
    from tests.helpers import SyntheticSource

    dm = TaskSequenceDataModule(SyntheticSource(), ClassSplit(5, 2), batch_size=4)
    dm.setup()
    x = dm.data.train_x[:4]
    batch = (x, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(dm._prepare(batch, None)[0], (x.float() / 255 - 0.2) / 0.3)  # the dataset's stats
    backbone = SimpleNamespace(normalizes_inputs=True)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(backbone=backbone), training=False)
    dm._norm_cache.clear()
    torch.testing.assert_close(dm._prepare(batch, None)[0], x.float() / 255)


def test_local_weights_are_loaded_and_checked(tmp_path):
    timm = import_timm()
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=10)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    backbone = build_timm_backbone((1, 28, 28), "resnet18", pretrained=str(tmp_path), image_size=32)
    for name, value in backbone.trunk.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[name], msg=name)
    assert backbone.normalizes_inputs and backbone.preprocess.size == (32, 32)
    assert backbone.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 512)
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    build_timm_backbone((1, 28, 28), "resnet18", pretrained=str(tmp_path / "model.safetensors"), sha256=digest)
    with pytest.raises(ConfigError, match=r"^model.sha256=f+ is invalid: .*model.safetensors has sha256 " + digest):
        build_timm_backbone((1, 28, 28), "resnet18", pretrained=str(tmp_path), sha256="f" * 64)
    with pytest.raises(ConfigError, match="model.pretrained=.* is invalid: no such file or folder"):
        build_timm_backbone((1, 28, 28), "resnet18", pretrained=str(tmp_path / "nothing"))
    frozen = build_timm_backbone((1, 28, 28), "resnet18", pretrained=str(tmp_path), freeze_trunk=True).train()
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.trunk.training


def test_offline_and_not_cached_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"^model.pretrained=true: timm's weights for resnet18 \(Hugging Face hub "
                                          r"repo timm/resnet18.a1_in1k.*set model.pretrained=<its path>"):
        build_timm_backbone((3, 32, 32), "resnet18", pretrained=True)


def test_hub_weights_come_from_the_cache_first_and_fail_fast_without_network(monkeypatch):
    """The cache is tried first (no network touched); a host that does not resolve fails at once, not after
    huggingface_hub's ≈ 20 s of retries per file name; a missing file name online tries the next one."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    from src.models import hub, timm_backbone

    original_offline_reason = hub.offline_reason
    calls = []
    online = {"model.safetensors": EntryNotFoundError("404"), "pytorch_model.bin": "/cache/pytorch_model.bin"}

    def download(repo, filename, revision=None, local_files_only=False):
        calls.append((filename, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        if isinstance(online[filename], Exception):
            raise online[filename]
        return online[filename]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cfg = {"hf_hub_id": "timm/x"}
    monkeypatch.setattr(hub, "offline_reason", lambda: None)
    assert timm_backbone._hub_weights(None, "x", cfg) == "/cache/pytorch_model.bin"
    assert calls == [("model.safetensors", True), ("pytorch_model.bin", True), ("model.safetensors", False),
                     ("pytorch_model.bin", False)]
    calls.clear()
    online["model.safetensors"] = LocalEntryNotFoundError("connection error")  # online but no network: one try
    with pytest.raises(ConfigError, match=r"cannot be downloaded \(LocalEntryNotFoundError\)"):
        timm_backbone._hub_weights(None, "x", cfg)
    assert calls[2:] == [("model.safetensors", False)]
    calls.clear()
    monkeypatch.setattr(hub, "offline_reason", original_offline_reason)
    monkeypatch.setattr(hub, "endpoint_resolves", lambda url: False)
    with pytest.raises(ConfigError, match=r"cannot be downloaded \(https://.* does not resolve\)"):
        timm_backbone._hub_weights(None, "x", cfg)
    assert all(local for _, local in calls)


def test_hub_reachability_is_decided_without_waiting(monkeypatch):
    """No DNS: unreachable at once; behind a proxy: reachable as far as we can tell; a transformers loader is asked
    for the cache first and goes online only when the hub may be reachable."""
    from src.models import hub

    for key in hub.PROXY_VARS:
        monkeypatch.delenv(key, raising=False)
    assert not hub.endpoint_resolves("https://nowhere.invalid")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy the host name is the proxy's business
    assert hub.endpoint_resolves("https://nowhere.invalid")
    calls = []

    def load(local_files_only):
        calls.append(local_files_only)
        if local_files_only:
            raise OSError("not cached")
        return "online"

    monkeypatch.setattr(hub, "offline_reason", lambda: None)
    assert hub.cache_first(load) == "online" and calls == [True, False]
    calls.clear()
    monkeypatch.setattr(hub, "offline_reason", lambda: "HF_HUB_OFFLINE is set")
    with pytest.raises(hub.HubUnreachable, match="HF_HUB_OFFLINE is set"):
        hub.cache_first(load)
    assert calls == [True]


def test_bad_names_and_keys_are_config_errors():
    with pytest.raises(ConfigError, match="model.name='no_such_net' is invalid: not a timm architecture"):
        build_timm_backbone((1, 28, 28), "no_such_net")
    with pytest.raises(ConfigError, match="model.sha256=.* is invalid: .*model.pretrained=false"):
        build_timm_backbone((1, 28, 28), "resnet18", sha256="ab")
    with pytest.raises(ConfigError, match="model.lora.r=-1 is invalid"):
        build_timm_backbone((1, 28, 28), "resnet18", lora={"r": -1})
    with pytest.raises(ConfigError, match="model.lora.target_modules=null is invalid for timm model resnet18"):
        build_timm_backbone((1, 28, 28), "resnet18", lora={"r": 2})  # no Linear layer (num_classes=0)


def test_lora_vit_trains_only_adapters_and_its_fisher_is_exact():
    torch.manual_seed(0)
    backbone = build_timm_backbone((1, 8, 8), "vit_tiny_patch16_224", lora={"r": 2, "alpha": 4}, kwargs=TINY_VIT)
    net = Net(backbone, 6).double()
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n} == {"qkv", "proj", "fc1", "fc2"}
    assert not any("patch_embed" in n for n in trainable)  # full Linear names: the patch conv `proj` is not adapted
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    assert fisher_coverage(net)["fallback"] == []
    batches = make_batches(n=6, shape=(1, 8, 8), batch_size=3)
    assert_same(fisher_diagonal(net, batches, "exact", task_view)[0], slow_fisher(net, batches, "exact", task_view))


def test_full_vit_fisher_falls_back_for_its_own_parameters_and_says_so():
    torch.manual_seed(0)
    net = Net(build_timm_backbone((1, 8, 8), "vit_tiny_patch16_224", kwargs=TINY_VIT), 6).double()
    batches = make_batches(n=6, shape=(1, 8, 8), batch_size=3)
    ran: dict = {}
    fast = fisher_diagonal(net, batches, "exact", task_view, coverage=ran)[0]
    assert sorted(ran["fallback"]) == ["backbone.trunk.cls_token", "backbone.trunk.pos_embed"]
    assert set(ran["fast"]) == {"conv2d", "layernorm", "linear"} and ran["fallback_method"] == "torch.func vmap"
    assert_same(fast, slow_fisher(net, batches, "exact", task_view))


# ---- full runs through the entry point ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["ewc", "lwf"])  # finetune: tests/test_hf.py
def test_lora_vit_runs_every_method(tmp_path, method):
    run = tmp_path / method
    run_train(run, "model=timm", "model.name=vit_tiny_patch16_224", "model.lora.r=4", f"method={method}",
              *[f"+model.kwargs.{k}={v}" for k, v in TINY_VIT.items()], *SYNTHETIC, "dataset.tasks.n_tasks=2",
              "trainer.max_steps=3", "save_checkpoints=false", env=OFFLINE)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and len(results["acc_matrix"]) == 2
    if method == "ewc":
        assert results["method_summary"]["fisher_stats"][0]["fallback"] == []


def test_pretrained_file_run_with_a_frozen_trunk(tmp_path):
    """Local weights, the pretrained input transform and a frozen trunk through the entry point (the sha256 mismatch
    run is in tests/test_hf.py; the check itself in test_local_weights_are_loaded_and_checked)."""
    timm = import_timm()
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "w.safetensors")
    run_train(tmp_path / "ok", "model=timm", "model.name=resnet18", f"model.pretrained={tmp_path / 'w.safetensors'}",
              "model.image_size=16", "model.freeze_trunk=true", *SYNTHETIC, "dataset.tasks.n_tasks=2",
              "trainer.max_steps=2", "save_checkpoints=false", env=OFFLINE)
    assert json.loads((tmp_path / "ok" / "results.json").read_text())["status"] == "finished"
