"""Distributed ingest: Prefect's Dask task runner on a local 2-worker cluster writes the same registry as the
plain in-process run."""
from __future__ import annotations

import shutil

import pytest

from tests.processes import stop_all
from tests.registry_content import registry_content

pytest.importorskip("prefect_dask", reason="the dask extra (pip install 'spectr[dask]') is not installed")


def test_local_two_worker_cluster_matches_the_default_runner(prefect_harness, tmp_path, monkeypatch, make_adapter,
                                                             tiny_base_dir):
    from spectr.orchestration import run_ingest

    folder = tmp_path / "adapters"
    folder.mkdir()
    for i, name in enumerate(["d-alpha", "d-beta", "d-gamma", "d-delta"]):
        shutil.copytree(make_adapter(name, seed=40 + i, r=4 + 2 * (i % 2)), folder / name)
    shutil.copytree(make_adapter("d-epsilon", seed=49), folder / "d-epsilon")
    bad = folder / "d-broken"
    shutil.copytree(make_adapter("d-broken-src", seed=48), bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    sources = [str(p) for p in sorted(folder.iterdir())]

    homes = {}
    for how in ("default", "dask"):
        home = tmp_path / how
        monkeypatch.setenv("SPECTR_HOME", str(home))
        monkeypatch.delenv("SPECTR_REGISTRY_URL", raising=False)
        monkeypatch.delenv("SPECTR_BLOB_URL", raising=False)
        kw = {"workers": 2} if how == "dask" else {}
        outcomes = run_ingest(sources, base_model=str(tiny_base_dir), **kw)
        assert [o.status for o in outcomes].count("new") == 5 and [o.status for o in outcomes].count("rejected") == 1
        again = run_ingest(sources[:2], base_model=str(tiny_base_dir), **kw)  # known content: unchanged
        assert [o.status for o in again] == ["unchanged", "unchanged"]
        homes[how] = registry_content(home)
    assert homes["dask"] == homes["default"]
    from spectr.pipeline import ingest as pipeline_ingest

    # The local workers ran torch on one thread each, as a 1-worker run does.
    assert pipeline_ingest.LAST_DRIVER_TIMES.summary()["workers"]["torch_threads_per_worker"] == [1]
    versions, blobs = homes["default"]["versions"], homes["default"]["blobs"]
    assert len(versions) == 5 and all(v["adapter_kept"] for v in versions)  # files kept, as a plain run
    assert {f"sha256/{v['blob_sha256'][:2]}/{v['blob_sha256'][2:]}.safetensors" for v in versions} <= set(blobs)


def test_a_local_cluster_the_flow_never_used_is_closed(prefect_harness, tmp_path, monkeypatch, tiny_base_dir):
    """The local cluster starts as the call comes, before Prefect validates the flow's parameters: a run
    that fails there closes it too, leaving no worker processes behind."""
    import psutil

    from spectr.flows.ingest import LAST_CALL_TIMES, ingest_on_dask

    monkeypatch.setenv("SPECTR_HOME", str(tmp_path / "home"))
    with pytest.raises(Exception):
        ingest_on_dask([str(tmp_path)], workers=2, base_model=str(tiny_base_dir), niter="not a number")
    assert "cluster_ready" in LAST_CALL_TIMES and "body" not in LAST_CALL_TIMES  # up, never used
    workers = [p for p in psutil.Process().children(recursive=True) if "spawn_main" in _cmdline(p)]
    _, alive = psutil.wait_procs(workers, timeout=10)  # closed: at most still exiting
    assert not alive, f"worker processes left running: {[p.pid for p in alive]}"


@pytest.mark.parametrize("args, message", [
    (["--dask", "tcp://127.0.0.1:8786", "--workers", "2"], "--dask and --workers exclude each other"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
])
def test_dask_option_mistakes_are_one_line(spectr_home, make_adapter, args, message):
    from typer.testing import CliRunner

    from spectr.cli import app

    r = CliRunner().invoke(app, ["ingest", str(make_adapter("d-opt", seed=50)), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (spectr_home / "registry.db").exists()  # nothing recorded


@pytest.mark.parametrize("args, message", [
    (["--dask", "tcp://127.0.0.1:8786", "--workers", "2"], "--dask and --workers exclude each other"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
])
def test_serve_flows_dask_option_mistakes_are_one_line(spectr_home, args, message):
    from typer.testing import CliRunner

    from spectr.cli import app

    r = CliRunner().invoke(app, ["serve-flows", "/nowhere/*", "--interval", "5", *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("verb", ["ingest", "serve-flows"])
def test_a_dask_address_nobody_answers_or_malformed_is_one_line_before_anything_starts(spectr_home, make_adapter, verb,
                                                                                        monkeypatch):
    import dask
    import distributed
    from typer.testing import CliRunner

    from spectr.cli import app

    # The probe makes no Client: one whose connect timed out could stay half-open until the collector closed it
    # under distributed's class-wide loop lock, which deadlocked the next Client this process made (CI, session 10).
    made = []
    real_init = distributed.Client.__init__
    monkeypatch.setattr(distributed.Client, "__init__",
                        lambda self, *a, **kw: made.append(a) or real_init(self, *a, **kw))
    address = f"tcp://127.0.0.1:{_free_port()}"
    args = [str(make_adapter("d-none", seed=51))] if verb == "ingest" else ["/nowhere/*", "--interval", "5"]
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        r = CliRunner().invoke(app, [verb, *args, "--dask", address])
    assert made == []
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"error: no Dask scheduler answered at {address} within 2s" in r.output
    assert not (spectr_home / "registry.db").exists() and not (spectr_home / "blobs").exists()
    r = CliRunner().invoke(app, [verb, *args, "--dask", "tcp://host:port"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "error: --dask 'tcp://host:port' is not a Dask scheduler address" in r.output
    assert not (spectr_home / "registry.db").exists() and not (spectr_home / "blobs").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def dask_cluster(tmp_path):
    """A separately started `dask scheduler` and two `dask worker` processes on loopback; its address. One
    worker preloads flows/dask_worker.py (as benchmarks/device_scale.sh starts them), the other does not."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from distributed import Client

    dask = str(Path(sys.executable).parent / "dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT)]
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                 "--name", f"w{i}", "--local-directory", str(tmp_path / f"w{i}"),
                 *(["--preload", "spectr.flows.dask_worker"] if i == 0 else [])],
                stdout=open(logs / f"worker{i}.log", "w"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        with Client(address, timeout=60) as client:
            while len(client.scheduler_info()["workers"]) < 2:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise AssertionError("the dask scheduler and 2 workers did not come up: "
                                         + "".join(f.read_text()[-1500:] for f in sorted(logs.iterdir())))
                time.sleep(0.5)
        yield address
    finally:
        stop_all(procs)


def test_existing_scheduler_matches_the_default_runner(prefect_harness, tmp_path, monkeypatch, make_adapter,
                                                       tiny_base_dir, dask_cluster):
    """`--dask tcp://HOST:PORT`: the batches run on workers that this process did not start, and the registry
    ends up as the default runner's."""
    from distributed import Client

    from spectr.orchestration import reach_scheduler, run_ingest

    folder = tmp_path / "adapters"
    folder.mkdir()
    for i, name in enumerate(["x-alpha", "x-beta", "x-gamma"]):
        shutil.copytree(make_adapter(name, seed=60 + i, r=4 + 2 * (i % 2)), folder / name)
    sources = [str(p) for p in sorted(folder.iterdir())]
    homes = {}
    for how in ("default", "address"):
        home = tmp_path / how
        monkeypatch.setenv("SPECTR_HOME", str(home))
        monkeypatch.delenv("SPECTR_REGISTRY_URL", raising=False)
        monkeypatch.delenv("SPECTR_BLOB_URL", raising=False)
        kw = {"dask_address": dask_cluster} if how == "address" else {}
        assert [o.status for o in run_ingest(sources, base_model=str(tiny_base_dir), **kw)] == ["new"] * 3
        homes[how] = registry_content(home)
    assert homes["address"] == homes["default"] and len(homes["default"]["versions"]) == 3
    with Client(dask_cluster) as client:  # the work went through that scheduler, onto its workers
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        worker = next(iter(client.scheduler_info()["workers"]))
    assert prefixes, "no task ever ran on the external scheduler"
    reach_scheduler(dask_cluster)  # the --dask probe accepts the scheduler
    with pytest.raises(ValueError, match=f"--dask {worker}: a Dask Worker answered there, not a scheduler"):
        reach_scheduler(worker)


# A runner-like parent (as `spectr serve-flows` starts a scheduled run: a multiprocessing child) whose child runs
# the served Dask flow with a local 2-worker cluster on a hub source whose endpoint accepts and never answers:
# the run holds its cluster while it waits on the hub (up to SPECTR_HUB_TIMEOUT).
RUNNER_WITH_DASK = """
import multiprocessing as mp, os, sys, time

def flow_run(source, base):
    from spectr.flows.schedule import ingest_on_dask_flow
    ingest_on_dask_flow(sources=[source], base_model=base, workers=2)

if __name__ == "__main__":
    child = mp.get_context("spawn").Process(target=flow_run, args=(sys.argv[1], sys.argv[2]))
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
"""


def _cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone meanwhile
        return ""


def test_a_killed_runner_leaves_no_dask_workers(prefect_harness, tmp_path, tiny_base_dir):
    """`serve-flows --workers N` killed mid-run: the run's process and its local Dask workers end with it
    (they once lived on, orphaned, until the run was over)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import psutil
    from prefect.settings import PREFECT_API_URL

    silent = socket.socket()  # the kernel accepts connections into the backlog; nothing ever answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    script = tmp_path / "runner_with_dask.py"
    script.write_text(RUNNER_WITH_DASK)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "SPECTR_HOME": str(tmp_path / "home"),
           "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}", "HF_HUB_OFFLINE": "0",
           "SPECTR_HUB_TIMEOUT": "600"}
    runner = subprocess.Popen([sys.executable, str(script), "org/never-answers", str(tiny_base_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    seen: list[psutil.Process] = []
    try:
        line = runner.stdout.readline()
        assert line, "the runner-like parent did not start its run"
        run = psutil.Process(int(line))
        deadline = time.monotonic() + 300
        while True:  # the run's cluster is up: two Dask worker processes under the run's process
            workers = [p for p in run.children(recursive=True) if "spawn_main" in _cmdline(p)]
            if len(workers) >= 2:
                break
            assert run.is_running() and time.monotonic() < deadline, "the run's 2 Dask workers never started"
            time.sleep(0.5)
        seen = [run, *run.children(recursive=True)]
        runner.send_signal(signal.SIGKILL)
        runner.wait(60)
        gone, alive = psutil.wait_procs(seen, timeout=60)
        assert not alive, f"outlived the killed runner: {[(p.pid, _cmdline(p)[:90]) for p in alive]}"
    finally:
        for p in [*seen]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        silent.close()
