"""Preloaded into every worker of the local Dask cluster that `spectr ingest --workers N` starts (Dask's
worker `preload`): as each worker process starts, a thread imports what an ingest batch needs (Prefect's task
engine, torch and the validation, SVD and blob code, this flow module), so those imports run while the
flow's process is still creating its Prefect flow run, instead of after the first batch arrives.

At exit (the cluster closing it: the worker has closed, its results are delivered) the process ends
without the interpreter's teardown of torch, Prefect and the rest, which took ~0.5-1 s per worker and
held up the end of every run.

This module itself stays light (Dask imports it before the worker connects to its scheduler); the worker
registers at once and answers its scheduler while the thread imports. A batch that arrives before the
imports are done waits on Python's import lock for the modules still loading, never imports them twice.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Any

# When this worker's imports were first done (time.time()), or None: batches report it (flows/ingest.py), so
# the driver's DriverTimes shows whether a worker's first batch waited for them. A later call (an existing
# cluster's warm-up at every flow run) finds them done and leaves it as it was.
WARMED_AT: float | None = None


def warm_imports() -> None:
    global WARMED_AT
    import prefect.task_engine  # noqa: F401
    import spectr.flows.ingest  # noqa: F401  (the batch task's module: unpickling it imports this)
    import spectr.pipeline.persist  # noqa: F401
    import spectr.pipeline.spectra  # noqa: F401
    import spectr.pipeline.validate  # noqa: F401
    if WARMED_AT is None:
        WARMED_AT = time.time()


def _warm() -> None:
    try:
        warm_imports()
    except Exception:  # a broken install shows in the first batch's own import, with its reason
        pass


def _exit_now() -> None:
    """Runs after the atexit handlers registered later (Prefect's log and event flushes, ...): the worker
    closed, multiprocessing has flushed its queues to the nanny; logs are flushed here, then the process
    ends, skipping the module teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


def dask_setup(worker: Any) -> None:
    atexit.register(_exit_now)  # here, not at import: only workers that preload this module end this way
    threading.Thread(target=_warm, name="spectr-warm-imports", daemon=True).start()
