"""The real config composed in-process, exactly as `python -m src.train` composes it (for benchmarks and tests)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compose_config(*overrides: str, run_dir: Path | None = None):
    """`conf/train.yaml` with `overrides`, with `${hydra:…}` resolvable as in a real run (run folder `run_dir`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import src.train  # noqa: F401  (registers the `resume_or` resolver that conf/hydra uses)

    GlobalHydra.instance().clear()
    extra = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*extra, *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir) if run_dir is not None else cfg.hydra.run.dir
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run: `${hydra:…}` resolves from HydraConfig, the job config has no hydra node
    return cfg
