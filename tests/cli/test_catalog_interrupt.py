"""Ctrl-C stops `spectr catalog --sql`: DuckDB ignores signals while it executes, so the query runs on a worker
thread and the main thread interrupts it. One line, exit 130 (128 + SIGINT), well before the time limit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HUGE = "select sum(a.range * b.range) from range(100000000) a, range(100000000) b"

# The CLI's own entry, in the main thread of a child; a helper thread sends SIGINT to the process once the
# query's worker thread runs (so the signal lands mid-query, never during start-up).
CTRL_C_MID_QUERY = """
import os, signal, sys, threading, time
from spectr.cli import app

def press_ctrl_c():
    while not any(t.name == "spectr-catalog-query" for t in threading.enumerate()):
        time.sleep(0.01)
    time.sleep(0.3)  # let DuckDB get going
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=press_ctrl_c, daemon=True).start()
sys.exit(app(["catalog", "--sql", sys.argv[1]], standalone_mode=False))
"""


def _env(home: Path) -> dict:
    return {**os.environ, "SPECTR_HOME": str(home), "SPECTR_SQL_TIMEOUT": "3600"}


def test_ctrl_c_stops_a_running_catalog_query(tmp_path):
    done = subprocess.run([sys.executable, "-c", CTRL_C_MID_QUERY, HUGE], capture_output=True, text=True,
                          env=_env(tmp_path / "home"), timeout=120)  # the query alone would run for hours
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["error: catalog query interrupted (Ctrl-C)"], done.stderr[-2000:]


def test_ctrl_c_stops_the_installed_command(tmp_path):
    """The real `spectr` executable and a real SIGINT, sent once the catalog snapshot exists (the query
    starts right after it); wherever the signal lands, the answer is one error line and exit 130."""
    home = tmp_path / "home"
    exe = Path(sys.executable).with_name("spectr")
    proc = subprocess.Popen([str(exe), "catalog", "--sql", HUGE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(home))
    try:
        cache = home / "cache" / "catalog"
        for _ in range(6000):  # up to 60 s for start-up (imports, migration, snapshot)
            if proc.poll() is not None or any(cache.glob("*.duckdb")):
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "interrupted (Ctrl-C)" in lines[0], err[-2000:]
