"""matplotlib, as the plots at the end of a run import it, for the forkserver of a parallel sweep
(src/continual/sweep_workers.py) to import once."""

from src.continual.plots import pyplot

pyplot()
