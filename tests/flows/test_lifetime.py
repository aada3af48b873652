"""Prefect's temporary server dies with the process that started it: a `spectr ingest --workers` killed with
SIGKILL once left it running (re-parented to init, about 240 MB each)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# A child that starts the temporary server the way `ingest --workers` does, reports the server's pid, and waits.
HOLD_SERVER = """
import sys, time
from spectr.flows.lifetime import tied_temporary_server
with tied_temporary_server() as server:
    print(server.server_process.pid, server.api_url, flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False


@pytest.mark.server
def test_temporary_server_dies_with_a_killed_parent(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    child = subprocess.Popen([sys.executable, "-c", HOLD_SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True)
    try:
        line = child.stdout.readline()  # once the server answers its health check
        assert line, child.stderr.read()[-3000:]
        server_pid, url = int(line.split()[0]), line.split()[1]
        assert _alive(server_pid) and url.startswith("http://127.0.0.1:")
        child.send_signal(signal.SIGKILL)
        child.wait(60)
        for _ in range(600):  # the launcher looks at its parent every 0.5 s
            if not _alive(server_pid):
                break
            time.sleep(0.1)
        assert not _alive(server_pid), "the temporary server outlived the process that started it"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        try:
            os.killpg(child.pid, signal.SIGKILL)  # nothing should be left; if something is, do not leak it
        except ProcessLookupError:
            pass


def test_temporary_server_is_skipped_where_one_is_configured(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from spectr.flows.lifetime import tied_temporary_server

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with tied_temporary_server() as server:
            assert server is None


# A process whose multiprocessing child (as Prefect's runner starts a flow run) tethers itself, then waits.
RUNNER_LIKE = """
import multiprocessing as mp, os, sys, time

def flow_run(q):
    from spectr.flows.lifetime import exit_with_parent
    exit_with_parent(0.1)
    q.put(os.getpid())
    time.sleep(600)

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ctx.Process(target=flow_run, args=(q,)).start()
    print(q.get(timeout=300), flush=True)
    time.sleep(600)
"""


def test_a_flow_run_process_exits_when_its_runner_is_killed(tmp_path):
    script = tmp_path / "runner_like.py"
    script.write_text(RUNNER_LIKE)
    runner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        line = runner.stdout.readline()
        assert line, runner.stderr.read()[-3000:]
        run_pid = int(line)
        assert _alive(run_pid)
        runner.send_signal(signal.SIGKILL)
        runner.wait(60)
        for _ in range(600):
            if not _alive(run_pid):
                break
            time.sleep(0.1)
        assert not _alive(run_pid), "the flow run's process outlived its runner"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_process_of_its_own_is_not_tethered():
    from spectr.flows import lifetime

    lifetime.exit_with_parent()  # pytest itself: no multiprocessing parent, nothing started
    assert not lifetime._tethered.is_set()
    assert "spectr-parent-watch" not in {t.name for t in __import__("threading").enumerate()}
