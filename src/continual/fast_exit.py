"""The end of a `python -m src.train` that succeeded: leave without the interpreter's teardown.

When `main()` returns, every file of the run is written and closed (results.json atomically, the loggers finalized,
checkpoints renamed into place), yet CPython then tears down every module and object it holds (torch, Lightning,
the dataset tensors), which took from 0.2 s to seconds on our 2-core machine, more than the whole rest of the run's
end (docs/speed.md). `exit_now()` runs what an ordinary exit runs that can matter to anyone else: the `atexit`
handlers (logging's flush and close, W&B's, multiprocessing's, any a user's code registered) and the stdout/stderr
flushes, then ends the process with `os._exit(0)`, which skips only the teardown.

It is called only after `main()` returned normally (a run, a whole multirun, `--help`); a failure leaves by
`sys.exit` with its own code, as before. While a non-daemon thread still runs it does nothing: Python would wait for
that thread, and so does an ordinary exit from there.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_now(code: int = 0) -> None:
    """Run the exit handlers, flush stdout and stderr, and end the process with `code` (see the module docstring)."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    if any(t.is_alive() and not t.daemon for t in others):
        return
    atexit._run_exitfuncs()  # CPython's own call at exit (there is no public one); handlers then do not run twice
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to flush
            pass
    os._exit(code)
