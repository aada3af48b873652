"""Engines and migrations: `upgrade(url)` runs `alembic upgrade head` through alembic's command API."""
from __future__ import annotations

import importlib.util
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from spectr.registry.settings import registry_url


def migrations_dir() -> Path:
    """The alembic scripts: `spectr/migrations` inside an installed wheel, the checkout's `alembic/` in an
    editable install (setuptools' editable finder does not resolve that folder: it has no __init__.py, so
    it can never shadow the `alembic` library when a checkout is on sys.path)."""
    spec = importlib.util.find_spec("spectr.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[1] / "alembic"


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for the registry URL; SQLite gets its folder created, foreign keys on, a busy timeout."""
    url = url or registry_url()
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(url, **kwargs)
    if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("connect_args", {}).setdefault("timeout", 30)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


def migration_engine(url: str) -> Engine:
    """An engine for running migrations: the whole upgrade is one transaction that holds the database's
    write lock from its first statement, so a migration killed half-way leaves nothing behind and
    concurrent first uses wait for each other instead of racing to create the same tables.

    SQLite: pysqlite commits before each DDL statement unless it is told to leave transactions alone, so
    the driver goes to autocommit and we issue BEGIN IMMEDIATE ourselves (SQLite's DDL is transactional).
    PostgreSQL: DDL is transactional already; `lock_migrations` takes a transaction-scoped advisory lock.
    """
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _driver_autocommit(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


_PG_MIGRATION_LOCK = 0x5EC7_0001  # any constant shared by every spectr process


def lock_migrations(connection: Any) -> None:
    """Inside the migration transaction, before alembic reads the current version: wait for other migrators."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")


def alembic_config(url: str | None = None):
    """alembic Config for the shipped migrations, pointed at `url` (default: the registry URL)."""
    from alembic.config import Config

    # alembic's default stdout is bound when alembic is imported; a test runner may have closed that stream since.
    cfg = Config(stdout=sys.stdout)
    cfg.set_main_option("script_location", str(migrations_dir()))
    # Passed as an attribute, not an ini option: URLs may hold '%' that configparser would interpolate.
    cfg.attributes["url"] = url or registry_url()
    return cfg


_REVISION = re.compile(r"^(down_revision|revision)\s*(?::[^=]*)?=\s*(?:[\"']([^\"']+)[\"']|None)", re.M)


def head_revisions() -> set[str]:
    """The migration scripts' head revisions, read from their text (importing alembic costs ~0.5 s)."""
    revisions, parents = set(), set()
    for script in (migrations_dir() / "versions").glob("*.py"):
        for key, value in _REVISION.findall(script.read_text(encoding="utf-8")):
            if value:
                (revisions if key == "revision" else parents).add(value)
    return revisions - parents


def is_current(url: str | None = None) -> bool:
    """True when the database at `url` is at the head revision (a quick read, no alembic)."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    engine = make_engine(url or registry_url())
    try:
        with engine.connect() as conn:
            found = {row[0] for row in conn.execute(text("select version_num from alembic_version"))}
    except SQLAlchemyError:  # no database or no alembic_version table yet
        return False
    finally:
        engine.dispose()
    return bool(found) and found == head_revisions()


def ensure_current(url: str | None = None) -> None:
    """Upgrade the database at `url` to head unless it is there already (every Registry() calls this)."""
    if not is_current(url):
        upgrade(url)


MIGRATION_WAIT_S = 600.0  # how long a migrator waits for the others in all (SQLite's busy timeout is 30 s)


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (creating an SQLite file and its folder if needed).

    Concurrent first uses queue on the database's write lock; SQLite gives up on it after its busy timeout
    (30 s), which eight processes starting together on a loaded 2-core box exceeded. The migration is one
    transaction, so a refused attempt left nothing: it is retried, and the retry re-reads the version."""
    from alembic import command
    from sqlalchemy.exc import OperationalError

    url = url or registry_url()
    make_engine(url).dispose()  # creates the SQLite folder
    deadline = time.monotonic() + MIGRATION_WAIT_S
    while True:
        try:
            command.upgrade(alembic_config(url), revision)
            return
        except OperationalError as e:
            if "locked" not in str(e.orig).lower() or time.monotonic() > deadline:
                raise
        time.sleep(random.uniform(0.05, 0.5))


def downgrade(url: str | None = None, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
