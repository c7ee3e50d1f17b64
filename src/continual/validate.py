"""Checks of the composed config that run before any data are loaded or anything is trained.

Each failure is one line naming the key, the value and what is allowed. Methods check their own keys in their
constructors (cheap: nothing is built), and sources declare `n_classes` and `input_shape` without reading files, so
splits and backbones are checked against the dataset before it is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import zipfile
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# numpy's seeding (which Lightning's seed_everything also seeds) takes 32-bit unsigned integers
SEED_RANGE = (0, 2**32 - 1)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


class ConfigError(ValueError):
    pass


def _check(condition: bool, key: str, value, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _build(node, what: str, **kwargs):
    """Instantiate a config node, turning the constructor's complaint into one ConfigError line."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"{what}: {str(cause).splitlines()[0]}") from None


def _choice(group: str, fallback: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"{group}={HydraConfig.get().runtime.choices[group]}"
    except Exception:
        return fallback


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_arguments(node, name: str, skip_first: bool = False):
    """The keys of a `_target_` node against the signature of what it builds: a key it does not take is named, with
    the closest one it does take. Returns (target, its name, its parameters)."""
    from src.continual.overrides import did_you_mean

    target = node.get("_target_")
    try:
        module, _, attribute = str(target).rpartition(".")
        built = getattr(importlib.import_module(module), attribute)
        assert callable(built)
    except Exception:
        raise ConfigError(f"{name}._target_={target!r} is invalid: an importable class or function") from None
    title = f"torch.optim.{built.__name__}" if module.startswith("torch.optim") else target
    try:
        parameters = dict(inspect.signature(built).parameters)
    except (TypeError, ValueError):  # no signature to read (a builtin): its constructor will say
        return built, title, {}
    if skip_first:
        parameters.pop(next(iter(parameters), None), None)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        forwarded = node.get("architecture") if isinstance(node.get("architecture"), str) else None
        if forwarded is None:
            return built, title, parameters  # takes any key: it checks its own (e.g. EWC's `lambda`)
        try:  # a backbone builder: the other keys go on to `architecture`
            module, _, attribute = forwarded.rpartition(".")
            inner = dict(inspect.signature(getattr(importlib.import_module(module), attribute)).parameters)
        except Exception:
            return built, title, parameters  # the builder names a bad architecture itself
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inner.values()):
            return built, title, parameters
        parameters = {k: p for k, p in {**parameters, **inner}.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        title = f"{title} with {forwarded}"
    for key in node.keys():
        if not str(key).startswith("_") and key not in parameters:
            value = node._get_node(key)._value() if hasattr(node, "_get_node") else node[key]
            hint = did_you_mean(str(key), parameters, prefix=f"{name}.", what=f"{title} takes")
            raise ConfigError(f"{name}.{key}={value!r} is invalid: not an argument of {title}{hint}")
    return built, title, parameters


def check_optimizer(node, name: str = "optimizer") -> None:
    """Every key of a `_partial_` optimizer config against the optimizer class itself: unknown keys (from its
    signature, with the closest one), the type of each value (from its default), and the values torch refuses (by
    building it on a dummy parameter, adding one key at a time, so that the key that makes it fail is named)."""
    cls, title, parameters = check_arguments(node, name, skip_first=True)  # the first: the model's parameters
    values = OmegaConf.to_container(node, resolve=True)
    given = {k: v for k, v in values.items() if not str(k).startswith("_")}
    for key, value in given.items():
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if isinstance(default, bool):
            _check(isinstance(value, bool), f"{name}.{key}", value, "true or false")
        elif _is_number(default):
            _check(_is_number(value), f"{name}.{key}", value, f"a number (default {default})")
        elif isinstance(default, tuple) and all(_is_number(d) for d in default):
            _check(isinstance(value, (list, tuple)) and len(value) == len(default) and all(map(_is_number, value)),
                   f"{name}.{key}", value, f"a list of {len(default)} numbers (default {list(default)})")

    def refusal(kwargs):
        try:
            cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
        except (ValueError, TypeError, RuntimeError) as err:
            return str(err).splitlines()[0] if str(err) else type(err).__name__
        return None

    required = {k: given[k] for k, p in parameters.items() if p.default is inspect.Parameter.empty and k in given
                and p.kind is not inspect.Parameter.VAR_KEYWORD}
    missing = [k for k, p in parameters.items() if p.default is inspect.Parameter.empty and k not in given
               and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    _check(not missing, f"{name}.{missing[0] if missing else ''}", None, f"required by {title}")
    applied = dict(required)
    for key, value in given.items():
        applied[key] = value
        reason = refusal(applied)
        if reason is None:
            continue
        allowed = f"{title} refuses it ({reason})"
        if _is_number(value) and value < 0 and refusal({**applied, key: 0}) is None:
            allowed = f"a number >= 0 ({title}: {reason})"
        raise ConfigError(f"{name}.{key}={value!r} is invalid: {allowed}")


def check_seed(cfg: DictConfig) -> None:
    seed = cfg.get("seed", 0)
    low, high = SEED_RANGE
    _check(_is_int(seed) and low <= seed <= high, "seed", seed, f"an integer in [{low}, {high}]")
    shuffle = cfg.dataset.get("tasks", {}).get("shuffle_seed", None)
    _check(shuffle is None or (_is_int(shuffle) and low <= shuffle <= high), "dataset.tasks.shuffle_seed", shuffle,
           f"null or an integer in [{low}, {high}]")


def _requested_devices(devices, key: str) -> int | None:
    """How many devices `trainer.devices` asks for (None: "auto" or -1, i.e. all there are)."""
    if devices in ("auto", -1, "-1"):
        return None
    if isinstance(devices, str):
        text = devices.strip().rstrip(",")
        if text.isdigit():
            return int(text)
        parts = [p.strip() for p in text.split(",")]
        _check(all(p.isdigit() for p in parts) and parts, key, devices,
               "a number of devices >= 1, -1 or auto (all), or a list of device indices")
        return len(parts)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        _check(len(devices) > 0 and all(_is_int(d) and d >= 0 for d in devices), key, devices,
               "a non-empty list of device indices >= 0")
        return len(devices)
    _check(_is_int(devices) and devices >= 1, key, devices,
           "a number of devices >= 1, -1 or auto (all), or a list of device indices")
    return devices


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_accelerator(trainer) -> None:
    """`trainer.accelerator`/`devices` against what this machine has, without importing Lightning (that would delay
    the data loading that starts after validation)."""
    accelerator = trainer.get("accelerator", "auto")
    devices = trainer.get("devices", "auto")
    _check(isinstance(accelerator, str) and accelerator.lower() in ACCELERATORS, "trainer.accelerator", accelerator,
           f"one of {', '.join(ACCELERATORS)}")
    accelerator = accelerator.lower()
    wanted = _requested_devices(devices, "trainer.devices")
    if accelerator == "auto":
        if torch.cuda.is_available():
            accelerator = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            accelerator = "mps"
        else:
            accelerator = "cpu"
    if accelerator in ("gpu", "cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _check(count > 0, "trainer.accelerator", trainer.get("accelerator"),
               f"an accelerator this machine has: torch {torch.__version__} sees no CUDA GPU (use trainer=cpu, "
               "or accelerator=auto)")
        _check(wanted is None or wanted <= count, "trainer.devices", devices,
               f"at most the {count} GPU(s) this machine has")
        if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
            _check(all(d < count for d in devices), "trainer.devices", devices, f"GPU indices below {count}")
    elif accelerator == "mps":
        available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        _check(available, "trainer.accelerator", trainer.get("accelerator"),
               "an accelerator this machine has: no Apple MPS device here (use trainer=cpu, or accelerator=auto)")
        _check(wanted in (None, 1), "trainer.devices", devices, "1 (there is one MPS device)")
    elif accelerator == "tpu":
        _check(importlib.util.find_spec("torch_xla") is not None, "trainer.accelerator", trainer.get("accelerator"),
               "an accelerator this machine has: torch_xla is not installed")
    else:  # cpu: Lightning takes a number of processes, not indices
        _check(not (isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices)), "trainer.devices", devices,
               "a number of processes >= 1 on CPU (device indices are for GPUs)")
        cores = _cpu_cores()
        if wanted is not None and wanted > cores:  # allowed: DDP on CPU still gives the same results, only slower
            log.warning("trainer.devices=%s starts %d processes on %d CPU core(s): they will share them (slower)",
                        devices, wanted, cores)


def check_checkpoint(cfg: DictConfig) -> None:
    """A `ckpt_path` (or `resume`'s last.ckpt) that exists but is not a readable torch checkpoint, found cheaply:
    torch checkpoints are zip archives, so a truncated file has no central directory, and the pickle of the
    checkpoint's structure (small) is read with its CRC checked. Whether it exists and matches the config is
    checked when the run starts (train.checkpoint_to_resume)."""
    if cfg.get("ckpt_path"):
        key, path = "ckpt_path", Path(cfg.ckpt_path)
    elif cfg.get("resume"):
        key, path = "resume", Path(cfg.resume) / "checkpoints" / "last.ckpt"
    else:
        return
    if not path.is_file():
        return
    value = cfg[key]
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            for name in pickles[:1]:
                with archive.open(name) as stream:
                    while stream.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        raise ConfigError(
            f"{key}={value!r} is invalid: a readable torch checkpoint, and {path} is not one "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'truncated or corrupt'})"
        ) from None
    _check(bool(pickles), key, value, f"a torch checkpoint, and {path} is a zip archive without data.pkl")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> bool:
    """Whether `path` is, or can be created as, a folder this process can write into."""
    existing = _nearest_existing(Path(path))
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def check_folders(cfg: DictConfig, source) -> None:
    """The run folder must be writable; the data folder readable, and writable when the source would download."""
    if cfg.get("resume"):
        key, run_dir = "resume", Path(cfg.resume)
    else:
        key, run_dir = "hydra.run.dir", None
        try:
            from hydra.core.hydra_config import HydraConfig

            hydra_cfg = HydraConfig.get()
            run_dir = Path(hydra_cfg.runtime.output_dir)
            if str(hydra_cfg.get("mode", "")).endswith("MULTIRUN"):
                key = "hydra.sweep.dir"
        except Exception:  # not under Hydra (a config composed in-process without a run folder)
            pass
    if run_dir is not None:
        _check(_writable(run_dir), key, str(run_dir), "a folder this user can write (results, checkpoints, logs)")
    data_dir = cfg.get("paths", {}).get("data_dir")
    if data_dir:
        path = Path(data_dir)
        if path.exists():
            _check(path.is_dir() and os.access(path, os.R_OK | os.X_OK), "paths.data_dir", data_dir,
                   "a folder this user can read (datasets are looked for there)")
    to_download = getattr(source, "files_to_download", None)
    if callable(to_download):
        try:
            files = list(to_download())
        except OSError:
            files = []
        if files and not all(_writable(Path(f).parent) for f in files):
            root = str(getattr(source, "root", ""))
            key = "paths.data_dir" if data_dir and str(Path(root)) == str(Path(data_dir)) else "dataset.source.root"
            raise ConfigError(f"{key}={root!r} is invalid: a folder this user can write, since {Path(files[0]).name}"
                              f"{f' and {len(files) - 1} more' if len(files) > 1 else ''} must be written "
                              f"(downloaded or extracted) into {Path(files[0]).parent}; or put the files there")


def _targets_below(node, path: str):
    """The paths of the `_target_` nodes inside `node` (not `node` itself: the DataModule imports Lightning)."""
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            if "_target_" in child:
                yield f"{path}.{key}"
            yield from _targets_below(child, f"{path}.{key}")


def validate_config(cfg: DictConfig) -> None:
    trainer, data = cfg.trainer, cfg.dataset
    check_seed(cfg)
    from src.continual.threads import check_threads

    check_threads(cfg.get("threads", "auto"))
    from src.continual.sweep_workers import check_sweep_workers

    check_sweep_workers(cfg.get("sweep_workers", "forkserver"))
    steps = trainer.get("max_steps", -1)
    epochs = trainer.get("max_epochs", 1)
    _check(isinstance(steps, int) and (steps == -1 or steps >= 1), "trainer.max_steps", steps,
           "an integer >= 1 (steps per task), or -1 to count epochs")
    if steps == -1:
        _check(isinstance(epochs, int) and epochs >= 1, "trainer.max_epochs", epochs, "an integer >= 1 (epochs per task)")
    for key in ("batch_size", "eval_batch_size"):
        _check(isinstance(data[key], int) and data[key] >= 1, f"dataset.{key}", data[key], "an integer >= 1")
    _check_global_batch(cfg)
    val = data.get("val_fraction", 0.0)
    _check(isinstance(val, (int, float)) and 0.0 <= val < 1.0, "dataset.val_fraction", val, "a number in [0, 1)")
    on_device = data.get("data_on_device", "auto")
    _check(on_device in (True, False, "auto"), "dataset.data_on_device", on_device, "one of auto, true, false")
    k = cfg.get("steps_per_batch", 1)
    _check(isinstance(k, int) and not isinstance(k, bool) and k >= 1, "steps_per_batch", k, "an integer >= 1")
    if k > 1:  # manual optimisation: Lightning forbids both
        clip = trainer.get("gradient_clip_val", None)
        _check(clip is None, "trainer.gradient_clip_val", clip, f"null when steps_per_batch > 1 (it is {k})")
        accumulate = trainer.get("accumulate_grad_batches", 1)
        _check(accumulate == 1, "trainer.accumulate_grad_batches", accumulate,
               f"1 when steps_per_batch > 1 (it is {k})")
    every = cfg.get("checkpoint", {}).get("every_n_steps", 0)
    _check(isinstance(every, int) and every >= 0, "checkpoint.every_n_steps", every, "an integer >= 0 (0: off)")
    evaluation = cfg.get("eval") or {}
    every = evaluation.get("every_n_tasks", 1)
    _check(isinstance(every, int) and not isinstance(every, bool) and every >= 1, "eval.every_n_tasks", every,
           "an integer >= 1 (evaluate after every N-th task and after the last)")
    which = evaluation.get("tasks", "all")
    _check(which in ("all", "seen_and_next"), "eval.tasks", which, "one of all, seen_and_next")
    keep = cfg.get("checkpoint", {}).get("keep_every_task", False)
    _check(isinstance(keep, bool), "checkpoint.keep_every_task", keep, "true or false")
    requeue = cfg.get("auto_requeue", True)
    _check(isinstance(requeue, bool), "auto_requeue", requeue, "true or false")
    plots = cfg.get("plots", True)
    _check(isinstance(plots, bool), "plots", plots, "true or false")

    scenario = cfg.scenario
    if "train_classes" in scenario:
        _check(scenario.train_classes in ("seen", "current"), "scenario.train_classes", scenario.train_classes,
               "one of seen, current")
    for path in ("method", "model", "scenario", *_targets_below(data, "dataset")):
        if OmegaConf.select(cfg, path) is not None:
            check_arguments(OmegaConf.select(cfg, path), path)
    _build(cfg.method, "method")  # methods validate their own keys (λ ≥ 0, 0 ≤ α ≤ 1, T > 0, …)
    check_optimizer(cfg.optimizer)
    check_accelerator(trainer)
    check_checkpoint(cfg)

    tasks = data.tasks
    _check(isinstance(tasks.n_tasks, int) and tasks.n_tasks >= 1, "dataset.tasks.n_tasks", tasks.n_tasks,
           "an integer >= 1")
    source = _build(data.source, "dataset.source")
    check_folders(cfg, source)
    n_classes = getattr(source, "n_classes", None)
    if "classes_per_task" in tasks:
        cpt = tasks.classes_per_task
        _check(isinstance(cpt, int) and cpt >= 1, "dataset.tasks.classes_per_task", cpt, "an integer >= 1")
        if n_classes is not None:
            _check(n_classes % cpt == 0, "dataset.tasks.classes_per_task", cpt,
                   f"must divide the dataset's {n_classes} classes")
            _check(tasks.n_tasks * cpt <= n_classes, "dataset.tasks.n_tasks", tasks.n_tasks,
                   f"n_tasks × classes_per_task = {tasks.n_tasks * cpt} exceeds the dataset's {n_classes} classes")

    input_shape = getattr(source, "input_shape", None)
    if input_shape is not None and _kept is not None and _kept[0] == _model_key(cfg, input_shape):
        return  # this model was built and checked already (the resume check, then main): it is kept for the run
    if input_shape is not None:
        with torch.random.fork_rng(devices=[]):  # the run's initialisation (see take_validated_backbone)
            torch.default_generator.manual_seed(cfg.seed)  # the CPU generator only: fork_rng restores only it
            seeded = torch.get_rng_state()
            backbone = _build(cfg.model, "model", input_shape=tuple(input_shape))
            after = torch.get_rng_state()
        from src.models.speed import eager  # (imports this module)

        training = backbone.training
        try:
            with torch.no_grad(), eager():  # a shape check, not worth compiling a graph for (model.compile=true)
                backbone.eval()(torch.zeros(1, *input_shape))
        except Exception as err:
            raise ConfigError(
                f"{_choice('model', 'model')} cannot take the input of {_choice('dataset', 'the dataset')} "
                f"(shape {tuple(input_shape)}): {str(err).splitlines()[0]}"
            ) from None
        backbone.train(training)
        _keep(_model_key(cfg, input_shape), backbone, seeded, after)


# The backbone the last validation built, kept for the run: a pretrained backbone is then built, and its weights
# read, once per run (a ViT-B's 330 MB twice before). It is built from the run's seed alone, in a forked RNG; the run
# takes it only where its own build would have started from that same RNG state (right after seeding: the data use
# their own generators), and then leaves the RNG where its own build would have, so runs are bit-identical to
# building it in the run.
_kept = None


def _model_key(cfg: DictConfig, input_shape) -> tuple:
    return OmegaConf.to_yaml(cfg.model, resolve=True), tuple(input_shape), cfg.seed


def _keep(key, backbone, seeded, after) -> None:
    global _kept
    _kept = (key, backbone, seeded, after)


def take_validated_backbone(cfg: DictConfig, input_shape):
    """The backbone validation built for this config (once: it is handed over), or None: build it."""
    global _kept
    if _kept is None:
        return None
    key, backbone, seeded, after = _kept
    _kept = None
    if key != _model_key(cfg, input_shape) or not torch.equal(torch.get_rng_state(), seeded):
        return None
    torch.set_rng_state(after)
    return backbone


def _check_global_batch(cfg: DictConfig) -> None:
    """DDP: dataset.batch_size is the global batch, cut into equal parts for the processes (src/data/global_batch.py);
    the DataModule checks it again with the real world size, and the last batch of every pass, once data are loaded."""
    from src.data.global_batch import check_global_batch, world_size_of

    world = world_size_of(cfg.trainer)
    if world is not None and isinstance(cfg.dataset.batch_size, int):
        check_global_batch(cfg.dataset.batch_size, world)
