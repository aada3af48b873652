"""Migrations are one transaction and one migrator at a time: a kill half-way leaves nothing behind, and
several processes using a new registry at once all succeed (SQLite here; PostgreSQL where CI starts one)."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest
from alembic.script import ScriptDirectory

from spectr.registry import db
from spectr.registry.models import Base
from tests.registry.test_migrations import _tables

# Runs in a child: the real upgrade, except that the process is SIGKILLed right after the second CREATE TABLE.
KILL_HALF_WAY = """
import os, signal, sys
from alembic.ddl.impl import DefaultImpl
from spectr.registry import db

real, made = DefaultImpl.create_table, []

def create_then_die(self, table, **kw):
    real(self, table, **kw)
    made.append(table.name)
    if len(made) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

DefaultImpl.create_table = create_then_die
db.upgrade(sys.argv[1])
"""


def _head(url: str) -> str:
    return ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()


def test_migration_killed_half_way_leaves_nothing_and_the_next_start_works(tmp_path):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    child = subprocess.run([sys.executable, "-c", KILL_HALF_WAY, url], capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert _tables(url) == set() and db.current_revision(url) is None  # rolled back, not wedged
    db.upgrade(url)
    assert _tables(url) == set(Base.metadata.tables) and db.current_revision(url) == _head(url)


def test_no_other_connection_sees_a_partly_migrated_registry(tmp_path, monkeypatch):
    """From the version read to the last migration, one transaction: while 0003 runs, another connection still
    sees an empty database. (Alembic commits after each migration on SQLite unless told its DDL is
    transactional; then a second migrator could take the lock between two steps, read the newer version and
    run a step the first one runs again: 'duplicate column name: host'.)"""
    import sqlite3

    from alembic.ddl.impl import DefaultImpl

    url = f"sqlite:///{tmp_path / 'reg.db'}"
    real, seen = DefaultImpl.add_column, []

    def look_then_add(self, *args, **kw):
        other = sqlite3.connect(tmp_path / "reg.db", timeout=5)
        try:
            seen.append(other.execute("select name from sqlite_master where type='table'").fetchall())
        finally:
            other.close()
        return real(self, *args, **kw)

    monkeypatch.setattr(DefaultImpl, "add_column", look_then_add)
    db.upgrade(url)
    assert seen and all(tables == [] for tables in seen), seen
    assert db.current_revision(url) == _head(url)


def _upgrade_after(barrier, url: str, errors) -> None:
    try:
        barrier.wait()
        db.upgrade(url)
    except BaseException:  # handed to the parent, so a failure says why
        import traceback

        errors.put(traceback.format_exc()[-3000:])
        raise


class Race(list):
    """The children's exit codes; .errors holds the tracebacks of those that failed."""
    errors: list[str]


def _race_first_use(url: str, n: int = 8) -> Race:
    ctx = mp.get_context("spawn")
    barrier, errors = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_upgrade_after, args=(barrier, url, errors)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(900)  # a bound against a hang; 8 imports and migrations on a loaded 2-core box take minutes
    race = Race(p.exitcode for p in procs)
    race.errors = []
    while not errors.empty():
        race.errors.append(errors.get(timeout=5))
    return race


def test_eight_processes_first_use_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'race.db'}"
    race = _race_first_use(url)
    assert race == [0] * 8, race.errors
    assert _tables(url) == set(Base.metadata.tables) and db.current_revision(url) == _head(url)


@pytest.mark.postgres
def test_eight_processes_first_use_postgres():
    url = os.environ.get("SPECTR_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("SPECTR_TEST_POSTGRES_URL is not set")
    db.downgrade(url, "base")
    try:
        race = _race_first_use(url)
        assert race == [0] * 8, race.errors
        assert _tables(url) == set(Base.metadata.tables) and db.current_revision(url) == _head(url)
    finally:
        db.downgrade(url, "base")


def test_a_migrator_that_waits_past_the_busy_timeout_retries(tmp_path, monkeypatch):
    """SQLite gives up on a held write lock after its busy timeout (30 s; 0.2 s here): the migration, one
    transaction that left nothing, is tried again until the holder lets go, and then succeeds."""
    import sqlite3
    import threading

    url = f"sqlite:///{tmp_path / 'held.db'}"
    real = db.make_engine
    monkeypatch.setattr(db, "make_engine", lambda u=None, **kw: real(u, connect_args={"timeout": 0.2}, **kw))
    holder = sqlite3.connect(tmp_path / "held.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction, held for a while
    refused = []
    from alembic import command

    real_command = command.upgrade

    def counting(cfg, rev):
        try:
            return real_command(cfg, rev)
        except Exception as e:
            refused.append(type(e).__name__)
            raise

    monkeypatch.setattr(command, "upgrade", counting)
    box: dict = {}
    worker = threading.Thread(target=lambda: box.setdefault("done", db.upgrade(url) or True))
    worker.start()
    for _ in range(600):  # until the migrator has been refused at least twice
        if len(refused) >= 2:
            break
        threading.Event().wait(0.05)
    holder.execute("COMMIT")
    holder.close()
    worker.join(120)
    assert not worker.is_alive() and box.get("done"), refused
    assert refused and set(refused) == {"OperationalError"}
    assert db.current_revision(url) == _head(url)
