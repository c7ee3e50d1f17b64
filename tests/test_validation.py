"""Bad input fails before any work with one line naming the key; non-finite losses stop the run cleanly;
result files are written atomically; runs are deterministic under a seed."""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import src.continual.validate as validate
from src.continual.results import write_json_atomic
from src.continual.validate import ConfigError, validate_config
from tests.helpers import (
    FMNIST_SYSTEM_DIR,
    ROOT,
    SYNTHETIC,
    SyntheticSource,
    assert_only_the_failure_is_recorded,
    build_loop,
    compose_config,
    read_results,
    run_train,
)

LOADING = "the dataset is being loaded"


class SourceThatSaysWhenItLoads(SyntheticSource):
    """A synthetic source that says so on stderr when its data are read: a refused run must never print it."""

    def load(self):
        print(LOADING, file=sys.stderr, flush=True)
        return super().load()


LOUD = ("dataset.source._target_=tests.test_validation.SourceThatSaysWhenItLoads",)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")

BAD = [
    (["method=ewc", "method.lambda=-1"], "method.lambda=-1"),
    (["method=lwf", "method.temperature=0"], "method.temperature=0"),
    (["method=lwf", "method.alpha=1.5"], "method.alpha=1.5"),
    (["dataset.tasks.classes_per_task=3", "dataset.tasks.n_tasks=3"], "dataset.tasks.classes_per_task=3"),
    (["dataset.tasks.classes_per_task=1", "dataset.tasks.n_tasks=11"], "dataset.tasks.n_tasks=11"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["dataset.batch_size=0"], "dataset.batch_size=0"),
    (["dataset.eval_batch_size=-1"], "dataset.eval_batch_size=-1"),
    (["dataset.val_fraction=1.0"], "dataset.val_fraction=1.0"),
    (["checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps=-1"),
    (["steps_per_batch=0"], "steps_per_batch=0"),
    (["plots=maybe"], "plots='maybe' is invalid: true or false"),
    (["steps_per_batch=2.5"], "steps_per_batch=2.5"),
    (["steps_per_batch=4", "trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=1.0"),
    (["steps_per_batch=4", "+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2"),
    (["eval.every_n_tasks=0"], "eval.every_n_tasks=0 is invalid: an integer >= 1"),
    (["eval.tasks=seen"], "eval.tasks='seen' is invalid: one of all, seen_and_next"),
    (["threads=0"], "threads=0 is invalid: auto or an integer >= 1"),
    (["threads=many"], "threads='many' is invalid: auto or an integer >= 1"),
    (["threads=true"], "threads=True is invalid"),
    (["dataset.data_on_device=maybe"], "dataset.data_on_device='maybe'"),
    (["scenario=class", "scenario.train_classes=new"], "scenario.train_classes='new'"),
    ([*SYNTHETIC, "model=convnet", "+dataset.source.shape=[64]"], "model=convnet"),
    # seeds: numpy's (and so Lightning's) seeding takes [0, 2**32 - 1]
    (["seed=abc"], "seed='abc' is invalid: an integer in [0, 4294967295]"),
    (["seed=-1"], "seed=-1 is invalid"),
    (["seed=4294967296"], "seed=4294967296 is invalid"),
    (["seed=true"], "seed=True is invalid"),
    (["dataset.tasks.shuffle_seed=-3"], "dataset.tasks.shuffle_seed=-3 is invalid"),
    # optimizer arguments: unknown keys from the class's signature, types from its defaults, ranges from torch itself
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 is invalid: a number >= 0 (torch.optim.Adam: Invalid learning rate"),
    (["optimizer.lr=abc"], "optimizer.lr='abc' is invalid: a number"),
    (["+optimizer.learning_rate=0.1"], "optimizer.learning_rate=0.1 is invalid: not an argument of torch.optim.Adam; "
                                       "did you mean optimizer.lr?"),
    (["+optimizer.weight_decy=0.1"], "did you mean optimizer.weight_decay?"),
    (["optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5] is invalid: torch.optim.Adam refuses it (Invalid beta"),
    (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9] is invalid: a list of 2 numbers"),
    (["+optimizer.eps=-1"], "optimizer.eps=-1 is invalid: a number >= 0"),
    (["+optimizer.amsgrad=3"], "optimizer.amsgrad=3 is invalid: true or false"),
    (["optimizer=sgd", "optimizer.momentum=-0.5"], "optimizer.momentum=-0.5 is invalid: a number >= 0"),
    (["optimizer=sgd", "+optimizer.nesterov=true"], "optimizer.nesterov=True is invalid: torch.optim.SGD refuses it "
                                                    "(Nesterov momentum requires a momentum and zero dampening)"),
    (["optimizer=sgd", "+optimizer.betas=[0.9,0.99]"], "optimizer.betas=[0.9, 0.99] is invalid: not an argument of "
                                                       "torch.optim.SGD"),
    # any torch optimizer, with no table of its arguments here
    (["optimizer._target_=torch.optim.Adagrad", "~optimizer.betas", "optimizer.lr=-1"], "optimizer.lr=-1 is invalid"),
    (["optimizer._target_=torch.optim.RMSprop", "~optimizer.betas", "+optimizer.alpha=-1"],
     "optimizer.alpha=-1 is invalid: a number >= 0 (torch.optim.RMSprop"),
    (["optimizer._target_=torch.optim.AdamW", "+optimizer.momentum=0.9"],
     "optimizer.momentum=0.9 is invalid: not an argument of torch.optim.AdamW"),
    (["optimizer._target_=torch.optim.Nope"], "optimizer._target_='torch.optim.Nope' is invalid"),
    # keys added with + that the class does not take
    (["method=ewc", "+method.lamda=1"], "method.lamda=1 is invalid: unknown key for EWC; did you mean method.lambda?"),
    (["method=lwf", "+method.alpa=1"], "method.alpa=1 is invalid: not an argument of src.methods.lwf.LwF; did you "
                                       "mean method.alpha?"),
    (["+dataset.tasks.n_task=3"], "dataset.tasks.n_task=3 is invalid: not an argument of src.data.tasks.ClassSplit; "
                                  "did you mean dataset.tasks.n_tasks?"),
    (["+dataset.source.rooot=x"], "did you mean dataset.source.root?"),
    (["+model.hiden=[10]"], "model.hiden=[10] is invalid: not an argument of src.models.pretrained.build_backbone with "
                            "src.models.mlp.MLP; did you mean model.hidden?"),
    # accelerator and devices
    (["trainer.accelerator=tpux"], "trainer.accelerator='tpux' is invalid: one of auto, cpu, gpu, cuda, mps, tpu"),
    (["trainer.devices=0"], "trainer.devices=0 is invalid"),
    (["trainer.devices=[0,1]"], "trainer.devices=[0, 1] is invalid: a number of processes >= 1 on CPU"),
    pytest.param(["trainer=gpu"], "trainer.accelerator='gpu' is invalid: an accelerator this machine has", marks=NO_CUDA),
]


def _bad_id(case):
    return " ".join(case.values[0] if hasattr(case, "values") else case[0])


@pytest.mark.parametrize("overrides, expected", BAD, ids=[_bad_id(b) for b in BAD])
def test_bad_value_is_one_line_naming_the_key(tmp_path, overrides, expected):
    if any(o.startswith("method=") and not (ROOT / "conf/method" / f"{o[7:]}.yaml").exists() for o in overrides):
        pytest.skip("method not available")
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(*overrides, run_dir=tmp_path))
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_valid_default_config_passes(tmp_path):
    validate_config(compose_config(run_dir=tmp_path))


@pytest.mark.parametrize("optimizer", sorted(p.stem for p in (ROOT / "conf/optimizer").glob("*.yaml")))
def test_every_optimizer_preset_passes(tmp_path, optimizer):
    validate_config(compose_config(f"optimizer={optimizer}", run_dir=tmp_path))


def test_gpu_count_is_checked_against_the_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    validate.check_accelerator(compose_config("trainer=gpu", "trainer.devices=2", run_dir=tmp_path).trainer)
    validate.check_accelerator(compose_config("trainer=gpu", "trainer.devices=[1]", run_dir=tmp_path).trainer)
    for devices, expected in (("3", "at most the 2 GPU"), ("[0,2]", "GPU indices below 2")):
        with pytest.raises(ConfigError, match=rf"^trainer\.devices=.* is invalid: {expected}"):
            validate.check_accelerator(compose_config("trainer=gpu", f"trainer.devices={devices}",
                                                      run_dir=tmp_path).trainer)


def test_more_cpu_processes_than_cores_is_allowed_with_a_warning(tmp_path, monkeypatch, caplog):
    """DDP on CPU with more processes than cores gives the same results, only slower: a warning, not an error."""
    monkeypatch.setattr(validate, "_cpu_cores", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="src.continual.validate"):
        validate.check_accelerator(compose_config("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=3",
                                                  run_dir=tmp_path).trainer)
    assert "trainer.devices=3 starts 3 processes on 2 CPU core(s)" in caplog.text


# ---- checkpoints: torch checkpoints are zip archives, checked without unpickling them ----------------------------
def _checkpoints(folder):
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, good)
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[data.find(b"data.pkl") + 40] ^= 0xFF  # inside the pickle of the checkpoint's structure
    (folder / "flipped.ckpt").write_bytes(bytes(flipped))
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (folder / "text.ckpt").write_text("not a checkpoint")
    with zipfile.ZipFile(folder / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "a zip, not a checkpoint")
    return good


@pytest.mark.parametrize("name, reason", [("truncated.ckpt", "BadZipFile"), ("text.ckpt", "BadZipFile"),
                                          ("flipped.ckpt", "Bad CRC-32"), ("other.zip", "without data.pkl")])
def test_a_checkpoint_that_cannot_be_read_is_refused(tmp_path, name, reason):
    good = _checkpoints(tmp_path / "ckpts")
    validate.check_checkpoint(compose_config(f"ckpt_path={good}", run_dir=tmp_path / "run"))
    bad = tmp_path / "ckpts" / name
    with pytest.raises(ConfigError) as err:
        validate.check_checkpoint(compose_config(f"ckpt_path={bad}", run_dir=tmp_path / "run"))
    message = str(err.value)
    assert message.startswith(f"ckpt_path='{bad}' is invalid: a") and reason in message and "\n" not in message


def test_resume_checks_the_folders_last_checkpoint(tmp_path):
    run = tmp_path / "previous"
    _checkpoints(run / "checkpoints")
    os.replace(run / "checkpoints" / "truncated.ckpt", run / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=rf"^resume='{run}' is invalid: a readable torch checkpoint"):
        validate.check_checkpoint(compose_config(f"resume={run}", run_dir=run))


# ---- folders --------------------------------------------------------------------------------------------------------
def _deny_writing_below(monkeypatch, folder):
    """os.access as for a user who may not write under `folder` (the tests may run as root, who may write anywhere)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        path = os.path.abspath(path)
        inside = path == str(folder) or path.startswith(str(folder) + os.sep)
        return False if inside and mode & os.W_OK else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(validate.os, "access", access)


def test_a_run_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^hydra\.run\.dir='.*file/run' is invalid: a folder this user can write"):
        validate.check_folders(compose_config(run_dir=tmp_path / "file" / "run"), None)
    (tmp_path / "locked").mkdir()
    _deny_writing_below(monkeypatch, tmp_path / "locked")
    with pytest.raises(ConfigError, match=r"^hydra\.run\.dir=.* is invalid"):
        validate.check_folders(compose_config(run_dir=tmp_path / "locked" / "run"), None)


FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")


def test_a_data_folder_must_be_readable_and_writable_only_when_it_must_take_a_download(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^paths\.data_dir='.*file' is invalid: a folder this user can read"):
        validate_config(compose_config(f"paths.data_dir={tmp_path / 'file'}", run_dir=tmp_path / "run"))
    data_dir = tmp_path / "read-only"
    data_dir.mkdir()
    _deny_writing_below(monkeypatch, data_dir)
    no_copy_elsewhere = (f"paths.data_dir={data_dir}", "dataset.source.system_dir=null")
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(*no_copy_elsewhere, run_dir=tmp_path / "run"))
    assert str(err.value).startswith(f"paths.data_dir='{data_dir}' is invalid: a folder this user can write, since "
                                     "train-images-idx3-ubyte.gz and 3 more must be written")
    (data_dir / "fashion-mnist").mkdir()
    for name in FMNIST_FILES:
        (data_dir / "fashion-mnist" / name).write_bytes(b"")  # present: nothing to download, read-only is fine
    validate_config(compose_config(*no_copy_elsewhere, run_dir=tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"^paths\.data_dir=.* is invalid: .* cifar-10-python\.tar\.gz must be"):
        validate_config(compose_config("dataset=split_cifar10", "model=convnet", f"paths.data_dir={data_dir}",
                                       run_dir=tmp_path / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read and write any folder")
def test_a_read_only_data_folder_for_a_real_user(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o555)
    try:
        with pytest.raises(ConfigError, match=r"^paths\.data_dir=.* is invalid: a folder this user can write"):
            validate_config(compose_config(f"paths.data_dir={data_dir}", "dataset.source.system_dir=null",
                                           run_dir=tmp_path / "run"))
        data_dir.chmod(0o000)
        with pytest.raises(ConfigError, match=r"^paths\.data_dir=.* is invalid: a folder this user can read"):
            validate_config(compose_config(f"paths.data_dir={data_dir}", run_dir=tmp_path / "run"))
    finally:
        data_dir.chmod(0o755)


# ---- through the command line: one line on stderr, exit 2, and the data never read -------------------------------
CLI_BAD = [
    # misspelled keys and options: Hydra cannot compose them; the line says which key was meant
    (["method=ewc", "method.lamda=100"],
     "error: method.lamda=100 is invalid: method.lamda is not a key of method=ewc; did you mean method.lambda?"),
    (["trainer.max_epoch=2"],
     "error: trainer.max_epoch=2 is invalid: trainer.max_epoch is not a key of trainer=cpu; did you mean "
     "trainer.max_epochs?"),
    (["scenario.train_class=seen"],
     "error: scenario.train_class=seen is invalid: scenario.train_class is not a key of scenario=task; "
     "scenario.train_classes is a key of scenario=class"),
    (["sed=1"], "error: sed=1 is invalid: sed is not a key of the config (conf/train.yaml); did you mean seed?"),
    (["method=ewx"], "error: method=ewx is invalid: not an option of method, which has "
                     + ", ".join(sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")))
                     + "; did you mean method=ewc?"),
    # values: refused by validate_config before the data are read
    (["seed=abc"], "error: seed='abc' is invalid: an integer in [0, 4294967295]"),
    (["optimizer.lr=-0.1"], "error: optimizer.lr=-0.1 is invalid: a number >= 0 (torch.optim.Adam: Invalid learning "
                            "rate: -0.1)"),
    (["+optimizer.learning_rate=0.1"], "error: optimizer.learning_rate=0.1 is invalid: not an argument of "
                                       "torch.optim.Adam; did you mean optimizer.lr?"),
    pytest.param(["trainer=gpu"], "error: trainer.accelerator='gpu' is invalid: an accelerator this machine has: torch "
                 f"{torch.__version__} sees no CUDA GPU (use trainer=cpu, or accelerator=auto)", marks=NO_CUDA),
    (["ckpt_path={tmp}/truncated.ckpt"], "error: ckpt_path='{tmp}/truncated.ckpt' is invalid: a readable torch "
                                         "checkpoint, and {tmp}/truncated.ckpt is not one (BadZipFile"),
    (["hydra.run.dir={tmp}/file/run"], "error: hydra.run.dir={tmp}/file/run is invalid: the run folder must be a "
                                       "folder this user can create and write ({tmp}/file/run: Not a directory)"),
]


@pytest.mark.parametrize("overrides, expected", CLI_BAD, ids=[_bad_id(b) for b in CLI_BAD])
def test_bad_input_through_the_cli_is_one_line_and_exit_2_before_the_data_are_read(tmp_path, overrides, expected):
    _checkpoints(tmp_path)
    (tmp_path / "file").write_text("")
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    proc = run_train(tmp_path / "run", *LOUD, *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith(expected.format(tmp=tmp_path)), proc.stderr
    assert LOADING not in proc.stderr + proc.stdout
    assert_only_the_failure_is_recorded(tmp_path / "run", proc.stderr)


def test_a_misspelled_key_in_a_multirun_is_the_same_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "src.train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0,1",
                           "trainer.max_epoch=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: trainer.max_epoch=2 is invalid: trainer.max_epoch is not a key of trainer=cpu; did you mean "
        "trainer.max_epochs?"]


def test_bad_value_through_the_cli_exits_non_zero_before_any_results(tmp_path):
    proc = run_train(tmp_path / "run", "dataset.tasks.classes_per_task=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dataset.tasks.classes_per_task=3 is invalid")
    assert_only_the_failure_is_recorded(tmp_path / "run", proc.stderr.strip().splitlines()[-1])


def test_non_finite_loss_stops_with_task_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *SYNTHETIC, "method._target_=tests.helpers.NaNAtTask", "trainer.max_steps=4",
                     "logger=none", check=False)
    assert proc.returncode == 3
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss") and "in task 2 at step" in last
    results = read_results(run_dir)
    assert results["status"] == "failed" and "non-finite loss" in results["error"]
    assert len(results["acc_matrix"]) == 2
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["continual"]["task"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_no_checkpoint_is_written_after_a_non_finite_loss(tmp_path):
    """Losses are checked lazily (a flag on the device), but always before a checkpoint is saved."""
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *SYNTHETIC, "method._target_=tests.helpers.NaNAtTask", "trainer.max_steps=6",
                     "checkpoint.every_n_steps=1", "logger=none", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["continual"]["task"] == 2 and ckpt["continual"]["phase"] == "training"  # a step checkpoint in task 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_a_learning_rate_that_blows_up_fails_the_run(tmp_path):
    loop = build_loop(tmp_path, *SYNTHETIC, "optimizer=sgd", "optimizer.lr=1e30", "trainer.max_steps=20")
    with pytest.raises(Exception, match="non-finite loss"):
        loop.run()
    assert json.loads((loop.run_dir / "results.json").read_text())["status"] == "failed"


def test_atomic_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"status": "running", "acc_matrix": [[0.5]]})

    def explode(data, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", explode)
    with pytest.raises(OSError):
        write_json_atomic(path, {"status": "finished"})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "running", "acc_matrix": [[0.5]]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_two_runs_with_the_same_seed_are_identical(tmp_path):
    overrides = ("deterministic=true", "trainer.max_steps=30", "dataset.tasks.shuffle_seed=3",
                 "dataset.eval_max_samples=1000", "model.dropout=0.2")
    first = build_loop(tmp_path / "a", *overrides).run()
    second = build_loop(tmp_path / "b", *overrides).run()
    for key in ("acc_matrix", "random_init_acc", "val_acc_matrix", "avg_acc", "forgetting", "bwt", "fwt",
                "task_classes"):
        assert first[key] == second[key], key
    other = build_loop(tmp_path / "c", *overrides[:-1], "seed=1", "model.dropout=0.2").run()
    assert other["acc_matrix"] != first["acc_matrix"]


def _without_root() -> list[str]:
    """A command prefix that drops root (who may write anywhere) for a permission test, or [] when not root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and no setpriv to run as another user")
    for path in (ROOT, Path(sys.executable)):
        if any(p.stat().st_mode & 0o005 != 0o005 for p in [path, *path.parents] if p.is_dir()):
            pytest.skip(f"{path} is not readable by other users")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.parametrize("case", ["run folder", "existing run folder", "data folder"])
def test_folders_this_user_cannot_write_through_the_cli(case):
    prefix = _without_root()
    tmp = Path(tempfile.mkdtemp(prefix="validate-"))
    try:
        tmp.chmod(0o777)
        locked = tmp / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        overrides, expected = {
            "run folder": ([*LOUD, f"hydra.run.dir={locked / 'run'}"],
                           f"error: hydra.run.dir={locked / 'run'} is invalid: the run folder must be a folder this "
                           f"user can create and write ({locked / 'run'}: Permission denied)"),
            "existing run folder": ([*LOUD, f"hydra.run.dir={locked}"],
                                    f"error: hydra.run.dir={locked} is invalid: the run folder must be a folder this "
                                    f"user can create and write ({locked}/"),
            "data folder": ([f"hydra.run.dir={tmp / 'run'}", f"paths.data_dir={locked}", "dataset.source.system_dir=null"],
                            f"error: paths.data_dir='{locked}' is invalid: a folder this user can write, since "
                            f"train-images-idx3-ubyte.gz and 3 more must be written"),
        }[case]
        proc = subprocess.run([*prefix, sys.executable, "-m", "src.train", "callbacks=none", "method=finetune",
                               *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HOME": str(tmp)})
        if prefix and proc.returncode != 2 and "Permission denied" in proc.stderr and "error:" not in proc.stderr:
            pytest.skip(f"the project cannot be run as another user here: {proc.stderr.strip()[-300:]}")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(expected)
        assert LOADING not in proc.stderr + proc.stdout
    finally:
        locked.chmod(0o755)
        shutil.rmtree(tmp, ignore_errors=True)
