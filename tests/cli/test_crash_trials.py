"""kill -9 at random points of `spectr ingest` (inside the first migration, inside a blob write, before a
commit, or after a random delay); afterwards, once the grace period has passed and a fresh ingest has swept
by design, `spectr doctor` is clean and the registry holds each expert exactly once.

Two trials run by default (one inside the migration, one inside a blob write); the slow tier
(`pytest -m slow tests/cli/test_crash_trials.py`) runs SPECTR_CRASH_TRIALS (default 24) trials at random
points. The seed is printed (and SPECTR_CRASH_SEED replays it) so a failing trial can be reproduced.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spectr.cli import app
from tests.pipeline.conftest import clone

NAMES = ("crash-a", "crash-b", "crash-c")
POINTS = ("migration", "blob-write", "commit", "time")
AGE_S = 2 * 3600  # past doctor's and the sweep's one-hour grace period

# The child: the real CLI entry, with a SIGKILL planted at the n-th call of one internal step.
CHILD = """
import os, signal, sys
point, n = sys.argv[1], int(sys.argv[2])
calls = []

def maybe_die():
    calls.append(1)
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)

if point == "migration":  # between two CREATE TABLEs of the first migration
    from alembic.ddl.impl import DefaultImpl
    real_create = DefaultImpl.create_table
    def create_table(self, table, **kw):
        real_create(self, table, **kw)
        maybe_die()
    DefaultImpl.create_table = create_table
elif point == "blob-write":  # the temp file is written and synced, not yet renamed into place
    import spectr.registry.blobs as blobs
    real_replace = os.replace
    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)
        @staticmethod
        def replace(src, dst):
            maybe_die()
            return real_replace(src, dst)
    blobs.os = _Os()
elif point == "commit":  # just before the n-th COMMIT reaches the database
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    event.listen(Engine, "commit", lambda conn: maybe_die())
from spectr.cli import app
sys.exit(app(sys.argv[3:], prog_name="spectr", standalone_mode=False))
"""


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _survivors(sid: int) -> list[str]:
    """Live processes of the session the ingest led (started with start_new_session: sid = its pid),
    after a bounded wait for re-parented children to notice and exit."""
    found: list[str] = []
    for _ in range(100):
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
                found.append(stat.parent.name)
        if not found:
            return []
        time.sleep(0.1)
    return found


def _age(home: Path) -> None:
    """Let the grace period pass for everything the killed process left (blobs and temp files)."""
    old = time.time() - AGE_S
    for p in _files(home / "blobs"):
        os.utime(p, (old, old))


def trial(rng: random.Random, point: str, home: Path, adapters: list[Path], base: Path, monkeypatch) -> str:
    """One kill -9 and the recovery; returns what happened, for the log."""
    n = {"migration": rng.randint(1, 6), "blob-write": rng.randint(1, 6), "commit": rng.randint(1, 12)}.get(point, 0)
    args = ["ingest", *map(str, adapters), "--base-model", str(base)]
    env = {**os.environ, "SPECTR_HOME": str(home)}
    env.pop("SPECTR_REGISTRY_URL", None)
    env.pop("SPECTR_BLOB_URL", None)
    child = subprocess.Popen([sys.executable, "-c", CHILD, point, str(n), *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    if point == "time":
        delay = rng.uniform(0.5, 12.0)
        try:
            child.wait(delay)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
        what = f"time {delay:.2f} s"
    else:
        what = f"{point} #{n}"
    _, err = child.communicate(timeout=600)
    killed = child.returncode == -signal.SIGKILL
    assert killed or child.returncode == 0, (what, child.returncode, err.decode()[-2000:])
    assert _survivors(child.pid) == [], (what, "processes outlived the killed ingest")

    _age(home)
    monkeypatch.setenv("SPECTR_HOME", str(home))
    runner = CliRunner()
    again = runner.invoke(app, args)  # the fresh ingest: sweeps stale temp files, marks the dead run crashed
    assert again.exit_code == 0, (what, again.output)
    assert not [p for p in _files(home / "blobs") if p.name.startswith(".tmp-")], what
    doctor = runner.invoke(app, ["doctor"])
    assert doctor.exit_code == 0 and doctor.stdout == "" and "clean" in doctor.stderr, (what, doctor.output)

    from spectr.registry import Registry

    reg = Registry()
    try:
        versions = sorted((v["name"], v["version"]) for v in reg.catalog())
        assert versions == [(name, 1) for name in NAMES], (what, versions)
        with reg.engine.connect() as c:  # the killed run is marked crashed; the fresh one finished
            statuses = [r[0] for r in c.exec_driver_sql("SELECT status FROM ingestion_runs ORDER BY started_at")]
        assert statuses[-1] == "completed", (what, statuses)
        assert statuses[:-1] in ([], ["crashed"]) if killed else statuses[:-1] == ["completed"], (what, statuses)
    finally:
        reg.close()
    return f"{what}: {'killed' if killed else 'finished first'}"


@pytest.fixture(scope="module")
def crash_inputs(make_adapter, tiny_base_dir, tmp_path_factory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("crash-adapters")
    adapters = [clone(make_adapter(name, seed=200 + i), root / name) for i, name in enumerate(NAMES)]
    return adapters, tiny_base_dir


def _seed() -> int:
    seed = int(os.environ.get("SPECTR_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"crash trials: SPECTR_CRASH_SEED={seed}")
    return seed


@pytest.mark.parametrize("point", ["migration", "blob-write"])
def test_kill_9_then_doctor_is_clean_and_each_expert_once(point, crash_inputs, tmp_path, monkeypatch):
    seed = _seed()
    adapters, base = crash_inputs
    print(trial(random.Random(seed), point, tmp_path / "home", adapters, base, monkeypatch))


@pytest.mark.slow
def test_kill_9_at_random_points_slow_tier(crash_inputs, tmp_path, monkeypatch):
    seed = _seed()
    rng = random.Random(seed)
    adapters, base = crash_inputs
    n = int(os.environ.get("SPECTR_CRASH_TRIALS", "24"))
    log = []
    for i in range(n):
        point = POINTS[i % len(POINTS)] if i < len(POINTS) else rng.choice(POINTS)  # every point at least once
        log.append(trial(rng, point, tmp_path / f"home-{i}", adapters, base, monkeypatch))
        print(f"trial {i}: {log[-1]}")
    assert len(log) >= 20 and sum("killed" in t for t in log) >= len(log) // 2, log
