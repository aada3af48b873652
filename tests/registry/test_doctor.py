"""`spectr doctor`: crash debris is found, --fix repairs what is safe, and a lost blob is reported, not hidden."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from typer.testing import CliRunner

from spectr.cli import app
from spectr.registry import Registry
from tests.registry.conftest import loaded, spectra_bytes

runner = CliRunner()
OLD = time.time() - 7200  # past the one-hour grace period


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_doctor_finds_and_fixes_crash_debris(spectr_home):
    reg = Registry()
    data = spectra_bytes(1)
    sha = reg.blobs.put(data)
    reg.add_version(loaded("doc", "1"), sha, method="exact", params={}, energy=1.0, n_modules=1, size_bytes=len(data))
    orphan = reg.blobs.put(spectra_bytes(2))  # a blob whose row never committed
    os.utime(reg.blobs.path(orphan), (OLD, OLD))
    run = reg.start_run(["/x"], {})
    tmp = os.path.join(os.path.dirname(reg.blobs.path(sha)), ".tmp-killed")  # after start_run, which sweeps
    open(tmp, "wb").close()
    os.utime(tmp, (OLD, OLD))
    with reg.engine.begin() as c:  # the run's process died without finishing it
        c.exec_driver_sql("UPDATE ingestion_runs SET pid = ? WHERE id = ?", (_dead_pid(), run))
    reg.close()

    found = runner.invoke(app, ["doctor"])
    assert found.exit_code == 1
    kinds = sorted(line.split(":")[1].strip() for line in found.stdout.splitlines())
    assert kinds == ["crashed-run", "orphan-blob", "temp-file"], found.output
    assert os.path.exists(tmp)  # without --fix nothing changes

    fixed = runner.invoke(app, ["doctor", "--fix"])
    assert fixed.exit_code == 0 and all(ln.startswith("fixed:") for ln in fixed.stdout.splitlines()), fixed.output
    clean = runner.invoke(app, ["doctor"])
    assert clean.exit_code == 0 and clean.stdout == "" and "clean" in clean.stderr
    reg = Registry()
    try:
        assert not os.path.exists(tmp) and not reg.blobs.exists(orphan) and reg.blobs.exists(sha)
        assert reg.get_run(run)["status"] == "crashed"
    finally:
        reg.close()


def test_doctor_reports_a_lost_blob_and_leaves_it_to_the_user(spectr_home):
    reg = Registry()
    data = spectra_bytes(3)
    sha = reg.blobs.put(data)
    reg.add_version(loaded("lost", "2"), sha, method="exact", params={}, energy=1.0, n_modules=1, size_bytes=len(data))
    with open(reg.blobs.path(sha), "r+b") as f:
        f.write(b"X")  # corrupt
    reg.close()
    for args in (["doctor"], ["doctor", "--fix"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "corrupt-blob" in result.stdout and "re-ingest" in result.stdout


def test_a_new_ingest_marks_runs_of_dead_processes_crashed(spectr_home):
    reg = Registry()
    try:
        old = reg.start_run(["/x"], {})
        with reg.engine.begin() as c:
            c.exec_driver_sql("UPDATE ingestion_runs SET pid = ? WHERE id = ?", (_dead_pid(), old))
        mine = reg.start_run(["/y"], {})
        assert reg.get_run(old)["status"] == "crashed" and reg.get_run(mine)["status"] == "running"
    finally:
        reg.close()


def test_a_new_ingest_sweeps_stale_temp_blobs(spectr_home):
    reg = Registry()
    try:
        sha = reg.blobs.put(spectra_bytes(4))
        folder = os.path.dirname(reg.blobs.path(sha))
        stale, fresh = os.path.join(folder, ".tmp-old"), os.path.join(folder, ".tmp-now")
        for p in (stale, fresh):
            open(p, "wb").close()
        os.utime(stale, (OLD, OLD))
        reg.start_run(["/z"], {})
        assert not os.path.exists(stale) and os.path.exists(fresh)  # a write in progress is left alone
    finally:
        reg.close()
