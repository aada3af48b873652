"""Stopping the real processes a test started (servers, schedulers, workers)."""
from __future__ import annotations

import subprocess


def stop_all(procs: list[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM to all, newest first, then SIGKILL whichever has not exited within `timeout` seconds."""
    for p in reversed(procs):
        p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
