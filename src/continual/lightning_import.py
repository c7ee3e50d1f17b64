"""Lightning, imported without the packages torchmetrics would load for metrics this project never uses.

Lightning imports torchmetrics, whose `__init__` imports every metric it has, each with its optional package when
that is installed: the text metrics import `transformers`, the audio ones `scipy.signal`, and `Metric` itself
imports `matplotlib.pyplot` (for `Metric.plot`). This project uses one torchmetrics class, `MulticlassAccuracy`,
which needs none of them, yet they were about half of Lightning's import time and a third of the default run's
start-up (docs/speed.md, "Start-up").

`import_lightning()` imports torchmetrics while those packages look absent to it (a finder first on `sys.meta_path`
reports them missing, to `import` and to `importlib.metadata` alike, which are the switches torchmetrics checks),
then removes the finder and imports Lightning. Afterwards the packages import normally on first use, by our plots,
Hugging Face backbones, Optuna or a user's code; only torchmetrics' own optional parts (text, audio, image-quality
metrics and `Metric.plot`) keep saying that their package is missing in this process. A package that is already
imported when this runs is not hidden. Only `python -m src.train` imports Lightning this way; tests and library use
import it as usual.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from contextlib import contextmanager
from importlib.abc import MetaPathFinder

# What torchmetrics' `__init__` imports for metrics we never use (measured with `python -X importtime`)
UNUSED_BY_TORCHMETRICS_HERE = ("scipy", "transformers", "matplotlib")


def _normalized(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


class PackagesLookAbsent(MetaPathFinder):
    """A meta-path finder for which `packages` are not installed: their imports raise ModuleNotFoundError and their
    distributions are not found, as if they had never been installed."""

    def __init__(self, packages):
        self.packages = frozenset(packages)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.packages:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)
        if name is not None and _normalized(name) in self.packages:
            raise importlib.metadata.PackageNotFoundError(name)
        return iter(())


@contextmanager
def packages_absent(packages):
    """Within the block, those of `packages` not yet imported look uninstalled."""
    finder = PackagesLookAbsent(p for p in packages if p not in sys.modules)
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        _forget_lookups()


def _forget_lookups() -> None:
    """lightning_utilities caches `find_spec` answers: drop the ones given while packages looked absent."""
    imports = sys.modules.get("lightning_utilities.core.imports")
    if imports is not None:
        imports.package_available.cache_clear()
        imports.module_available.cache_clear()


def import_lightning():
    """`lightning`, with torchmetrics imported first without `UNUSED_BY_TORCHMETRICS_HERE` (the module docstring)."""
    if "torchmetrics" not in sys.modules:
        with packages_absent(UNUSED_BY_TORCHMETRICS_HERE):
            importlib.import_module("torchmetrics")
    return importlib.import_module("lightning")
