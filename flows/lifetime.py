"""Processes that Prefect starts for spectr end with the process that needs them (none outlives the CLI).

exit_with_parent(): a flow run that Prefect's runner (`spectr serve-flows`) started in a child process exits
when the runner is gone; such runs outlived a stopped serve-flows before, still talking to a dead server.
Both the plain and the Dask ingest call it: a run's local Dask cluster (`--workers N`) lives in the run's
process, and its worker processes exit when that process is gone (distributed watches a pipe to the parent),
so tethering the run takes its workers down too. A killed serve-flows once left a Dask run, its scheduler and
workers running until the run was over.

tied_temporary_server(): Prefect's temporary API server, tied to the process that started it.

Without a configured server (PREFECT_API_URL), a flow run makes Prefect start a temporary one: uvicorn in a
child process, stopped at exit. A `spectr ingest --workers N` killed with SIGKILL never reaches its exit, and
the server lived on (re-parented to init, about 240 MB each). Here the same server runs under a launcher that
exits as soon as its parent is gone, and its start-up gets longer than Prefect's 20 s, which a loaded 2-core
box exceeded.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from prefect.server.api.server import SubprocessASGIServer

STARTUP_S = 120.0  # at least this long to start (Prefect's own setting wins when larger)

# Runs uvicorn in this process after starting a thread that exits the process once its parent is gone
# (os.getppid() changes when the parent dies: the orphan is re-parented).
_LAUNCHER = """
import os, runpy, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, name="spectr-parent-watch", daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


class TiedServer(SubprocessASGIServer):
    """SubprocessASGIServer whose uvicorn exits with its parent (same command, same environment)."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        import prefect
        from prefect.settings import get_current_settings

        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        args = ["--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        return subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(os.getpid()), *args], env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tied_temporary_server() -> Iterator[TiedServer | None]:
    """Where no Prefect server is configured: a TiedServer for the flow runs inside (Prefect finds it as its
    default temporary server, the way prefect_test_harness registers its own), stopped on the way out.
    With a server configured: nothing to do (None)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    server = TiedServer(port=_free_port())
    prior = SubprocessASGIServer._instances.get(None)
    SubprocessASGIServer._instances[None] = server
    try:
        server.start(timeout=int(max(STARTUP_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())))
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        server.stop()
        if prior is None:
            SubprocessASGIServer._instances.pop(None, None)
        else:
            SubprocessASGIServer._instances[None] = prior


_tethered = threading.Event()


def exit_with_parent(poll_s: float = 0.5) -> None:
    """In a child that multiprocessing started (a flow run of Prefect's runner): exit as soon as the parent
    is gone. Nothing in a process of its own (`spectr ingest` may rightly outlive its shell)."""
    import multiprocessing

    if multiprocessing.parent_process() is None or _tethered.is_set():
        return
    _tethered.set()
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="spectr-parent-watch", daemon=True).start()
