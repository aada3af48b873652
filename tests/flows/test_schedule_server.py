"""The scheduled deployment on a real `prefect server start` on loopback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from spectr.registry.store import Registry
from tests.cli.test_crash_trials import _survivors
from tests.processes import stop_all

pytestmark = pytest.mark.server
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args[:3]} exited with {p.returncode} while waiting for {what}")
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _stop(p: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the runner is still shutting down a minute later (a busy shared box); then
    whatever it had started that is still there (a killed flow run's Dask nanny and worker processes
    outlive it)."""
    import psutil

    try:
        tree = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    p.terminate()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def test_scheduled_ingest_runs_on_a_real_server(make_adapter, tiny_base_dir, tmp_path):
    drop = tmp_path / "drop"  # the scheduled source: a glob over this folder
    drop.mkdir()
    (drop / "sched").symlink_to(make_adapter("sched-src", seed=11), target_is_directory=True)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect-server"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        SPECTR_HOME=str(tmp_path / "spectr-home"),
    )
    env.pop("PREFECT_API_URL", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    procs = [server]
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, 120, "the Prefect server", procs)
        served = subprocess.Popen(
            [str(BIN / "spectr"), "serve-flows", f"{drop}/*", "--interval", "5",
             "--base-model", str(tiny_base_dir), "--name", "test-schedule"],
            env=dict(env, PREFECT_API_URL=api), cwd=REPO,
            stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(served)

        def completed_runs() -> list[dict]:
            r = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}, timeout=60)
            return [run for run in r.json() if run.get("deployment_id")]

        try:  # a busy shared box makes the server slow to answer: API calls wait up to a minute
            _wait(lambda: len(completed_runs()) >= 1, 240, "a scheduled flow run to complete", procs)
        except AssertionError:
            print((logs / "serve.log").read_text()[-4000:])
            raise
        deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=60).json()
        assert [d["name"] for d in deployments] == ["test-schedule"]
        assert deployments[0]["schedules"], "the deployment carries its schedule"
        registry = Registry(f"sqlite:///{tmp_path / 'spectr-home' / 'registry.db'}", str(tmp_path / "spectr-home" / "blobs"))
        assert [(v.name, v.version) for v in registry.versions()] == [("sched", 1)]

        # `spectr ingest` with the server configured: a flow run with its task runs there, one line per
        # adapter on stdout, and Prefect's own logs on stderr only with --verbose.
        served.terminate()  # its schedule no longer competes for the server's database
        served.wait(timeout=120)
        # Its flow runs ran in child processes: none outlives it (they once kept running, orphaned).
        assert _survivors(served.pid) == [], "flow-run processes outlived `spectr serve-flows`"
        procs.remove(served)
        cli_env = dict(env, PREFECT_API_URL=api)
        for verbose, name in ((False, "cli-quiet"), (True, "cli-verbose")):
            done = subprocess.run(
                [str(BIN / "spectr"), *(["--verbose"] if verbose else []), "ingest",
                 str(make_adapter(name, seed=12 + verbose)), "--base-model", str(tiny_base_dir)],
                env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines()[0] == f"accepted {name} v1"
            summary = "1 adapters: 1 new versions, 0 unchanged, 0 rejected"
            if verbose:
                assert "Finished in state Completed" in done.stderr and summary in done.stderr.splitlines()
                assert "httpx" not in done.stderr
            else:
                assert done.stderr.splitlines() == [summary], done.stderr
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=60).json()
        direct = [r for r in runs if not r.get("deployment_id")]
        assert len(direct) == 2 and all(r["state_type"] == "COMPLETED" for r in direct)
        tasks = httpx.post(f"{api}/task_runs/filter", json={}, timeout=60).json()
        assert {t["name"].split(" ")[0] for t in tasks if t["flow_run_id"] == direct[0]["id"]} >= {"fetch", "validate", "spectra"}

        # The scheduled deployment on Dask: each run starts a local 2-worker cluster and ingests through it
        # (one run at a time: the deployment's limit).
        drop_dask = tmp_path / "drop-dask"
        drop_dask.mkdir()
        for i, name in enumerate(["sched-dask-a", "sched-dask-b"]):
            (drop_dask / name).symlink_to(make_adapter(f"{name}-src", seed=20 + i), target_is_directory=True)
        served = subprocess.Popen(
            [str(BIN / "spectr"), "serve-flows", f"{drop_dask}/*", "--interval", "5", "--workers", "2",
             "--base-model", str(tiny_base_dir), "--name", "test-schedule-dask"],
            env=cli_env, cwd=REPO, stdout=open(logs / "serve-dask.log", "w"), stderr=subprocess.STDOUT,
        )
        procs.append(served)

        def dask_deployment_runs() -> list[dict]:
            deps = httpx.post(f"{api}/deployments/filter", json={}, timeout=60).json()
            ids = {d["id"] for d in deps if d["name"] == "test-schedule-dask"}
            return [r for r in completed_runs() if r["deployment_id"] in ids]

        try:
            _wait(lambda: len(dask_deployment_runs()) >= 1, 300, "a scheduled Dask flow run to complete", procs)
        except AssertionError:
            print((logs / "serve-dask.log").read_text()[-4000:])
            raise
        run = dask_deployment_runs()[0]  # read before the runner stops (its deployment goes with it)
        _stop(served)
        procs.remove(served)
        got = {(v.name, v.version) for v in registry.versions()}
        assert {("sched-dask-a", 1), ("sched-dask-b", 1)} <= got
        flow_runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=60).json()
        tasks = httpx.post(f"{api}/task_runs/filter", json={}, timeout=60).json()
        in_run = {t["id"] for t in tasks if t["flow_run_id"] == run["id"]}  # the subflow's parent task run
        sub = {r["id"] for r in flow_runs if r.get("parent_task_run_id") in in_run}
        batches = [t for t in tasks if t["flow_run_id"] in sub and t["name"].startswith("process ")]
        assert batches and all(t["state_type"] == "COMPLETED" for t in batches), "the batches ran in its subflow"
    finally:
        stop_all(procs)
