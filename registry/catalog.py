"""Read-only SQL over the registry: DuckDB over a snapshot of the registry's rows, rebuilt only after the
registry changed (see _stamp), so a query at 10,000 versions does not copy the registry each time."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Integer, select

from spectr.registry.models import Base
from spectr.registry.settings import spectr_home
from spectr.registry.store import Registry

SNAPSHOT_FORMAT = 1  # bump when what a snapshot holds changes

TABLES = ("experts", "lineage", "base_models", "adapters", "adapter_versions", "spectra", "ingestion_runs",
          "ingestion_results", "adapter_files", "aliases", "alias_events", "adapter_tags", "version_tags",
          "bundles", "bundle_experts")
_EXPERT_COLUMNS = [
    ("name", "VARCHAR"), ("version", "BIGINT"), ("base_model", "VARCHAR"), ("rank", "BIGINT"),
    ("alpha", "DOUBLE"), ("modules", "BIGINT"), ("target_modules", "VARCHAR[]"),
    ("content_sha256", "VARCHAR"), ("blob_sha256", "VARCHAR"), ("method", "VARCHAR"), ("energy", "DOUBLE"),
    ("source", "VARCHAR"), ("revision", "VARCHAR"), ("created_at", "TIMESTAMPTZ"),
    ("aliases", "VARCHAR[]"), ("tags", "JSON"), ("adapter_kept", "BOOLEAN"),
]
_LINEAGE_COLUMNS = [
    ("name", "VARCHAR"), ("version", "BIGINT"), ("source_kind", "VARCHAR"), ("source", "VARCHAR"),
    ("repo", "VARCHAR"), ("commit", "VARCHAR"), ("content_sha256", "VARCHAR"), ("ingestion_run_id", "VARCHAR"),
    ("flow_run_id", "VARCHAR"), ("svd_method", "VARCHAR"), ("svd_params", "JSON"), ("energy", "DOUBLE"),
    ("bundles", "VARCHAR[]"), ("created_at", "TIMESTAMPTZ"),
]


def _duck_type(sa_type: Any) -> str:
    # Order matters: BigInteger is an Integer; JSON goes in as text in DuckDB's JSON type.
    for cls, name in ((JSON, "JSON"), (Boolean, "BOOLEAN"), (BigInteger, "BIGINT"), (Integer, "BIGINT"),
                      (Float, "DOUBLE"), (DateTime, "TIMESTAMPTZ")):
        if isinstance(sa_type, cls):
            return name
    impl = getattr(sa_type, "impl", None)
    return _duck_type(impl) if impl is not None else "VARCHAR"


def _tables(registry: Registry) -> Iterator[tuple[str, list[tuple[str, str]], Iterable[list], bool]]:
    """What the catalog holds: every registry table as stored, then the views `experts` (Registry.catalog())
    and `lineage` (Registry.lineage()). The last item: JSON of that table is written with sorted keys."""
    with registry.engine.connect() as sql:
        for table in Base.metadata.sorted_tables:
            columns = [(c.name, _duck_type(c.type)) for c in table.columns]
            yield table.name, columns, (list(r) for r in sql.execute(select(table))), False
    yield "experts", _EXPERT_COLUMNS, ([d[c] for c, _ in _EXPERT_COLUMNS] for d in registry.catalog()), True
    yield "lineage", _LINEAGE_COLUMNS, ([d[c] for c, _ in _LINEAGE_COLUMNS] for d in registry.lineage()), True


def _cell(value: Any, duck_type: str, sort_json: bool) -> Any:
    # JSON goes in as the text json.dumps writes (read as VARCHAR, so DuckDB keeps that text exactly).
    if duck_type == "JSON":
        return None if value is None else json.dumps(value, sort_keys=sort_json)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _load(con: duckdb.DuckDBPyConnection, table: str, columns: list[tuple[str, str]], rows: Iterable[list],
          scratch: Path, sort_json: bool = False) -> None:
    """One table, bulk-loaded through a newline-delimited JSON file: DuckDB's row-at-a-time executemany
    took seconds per thousand rows, read_json takes milliseconds."""
    cols = ", ".join(f'"{c}" {t}' for c, t in columns)
    con.execute(f'CREATE TABLE "{table}" ({cols})')
    path = scratch / f"{table}.jsonl"
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({c: _cell(v, t, sort_json) for (c, t), v in zip(columns, row)}))
            fh.write("\n")
            n += 1
    if n:
        read_as = ", ".join(f"'{c}': '{'VARCHAR' if t == 'JSON' else t}'" for c, t in columns)
        con.execute(f"INSERT INTO \"{table}\" SELECT * FROM read_json(?, format='newline_delimited', "
                    f"columns={{{read_as}}})", [str(path)])
    path.unlink()


def _build(con: duckdb.DuckDBPyConnection, registry: Registry) -> None:
    _utc(con)
    with tempfile.TemporaryDirectory(prefix="spectr-catalog-") as scratch:
        for name, columns, rows, sort_json in _tables(registry):
            _load(con, name, columns, rows, Path(scratch), sort_json)


def _utc(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:  # without ICU timestamps still load; they print in local time
        pass


def _sandbox(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    # The user's query may not touch files or change settings.
    con.execute("SET enable_external_access = false")
    con.execute(f"SET memory_limit = '{os.environ.get('SPECTR_SQL_MEMORY', '2GB')}'")
    con.execute("SET lock_configuration = true")
    return con


# -- the snapshot: a DuckDB file per registry state, so a query only copies the registry after it changed --------
def _sqlite_stamp(database: str) -> str:
    """SQLite's own change markers, read from the files: the header's file change counter (bumped by every
    committed write in rollback-journal mode) and, in WAL mode, the WAL's size and header (frames append;
    a restarted WAL gets new salts). Sizes and mtimes go in too: they only ever add refreshes."""
    parts = []
    for suffix in ("", "-wal"):
        p = database + suffix
        try:
            st = os.stat(p)
            with open(p, "rb") as fh:
                head = fh.read(100 if not suffix else 32)
        except FileNotFoundError:
            parts.append(f"{suffix}:none")
            continue
        marker = head[24:28] + head[92:96] if not suffix else head
        parts.append(f"{suffix}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{marker.hex()}")
    return "|".join(parts)


def _stamp(registry: Registry) -> str | None:
    """A string that changes whenever the registry's data may have changed (None: no cheap way to tell,
    so no snapshot). Read BEFORE the copy: a write racing the copy then changes the stamp, never hides."""
    url = registry.engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        db = url.database
        if not db or db == ":memory:" or db.startswith("file:") or not os.path.isfile(db):
            return None
        return "sqlite|" + _sqlite_stamp(os.path.abspath(db))
    if backend == "postgresql":
        # The current snapshot (xmin:xmax:in-progress xids) moves on with every transaction that writes,
        # anywhere in the cluster; read-only transactions leave it as it is.
        with registry.engine.connect() as sql:
            try:
                snap = sql.exec_driver_sql("SELECT pg_current_snapshot()::text").scalar()
            except Exception:  # PostgreSQL < 13
                sql.rollback()
                snap = sql.exec_driver_sql("SELECT txid_current_snapshot()::text").scalar()
        return f"postgresql|{snap}"
    return None


def _shape() -> str:
    # The snapshot's layout: a new spectr with other tables or columns must not read an old file.
    tables = [(t.name, [(c.name, _duck_type(c.type)) for c in t.columns]) for t in Base.metadata.sorted_tables]
    return json.dumps([SNAPSHOT_FORMAT, tables, _EXPERT_COLUMNS, _LINEAGE_COLUMNS])


def snapshot_dir() -> Path:
    """Where catalog snapshots live: SPECTR_CATALOG_CACHE, default $SPECTR_HOME/cache/catalog."""
    raw = os.environ.get("SPECTR_CATALOG_CACHE")
    return Path(raw).expanduser() if raw else spectr_home() / "cache" / "catalog"


def _snapshot(registry: Registry) -> Path | None:
    """The snapshot file for the registry's current state, built if missing; None when the backend has
    no change marker or the cache folder is not writable (the caller then builds in memory)."""
    stamp = _stamp(registry)
    if stamp is None:
        return None
    key = hashlib.sha256(registry.engine.url.render_as_string(hide_password=False).encode()).hexdigest()[:16]
    state = hashlib.sha256((_shape() + stamp).encode()).hexdigest()[:24]
    folder = snapshot_dir()
    path = folder / f"{key}-{state}.duckdb"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            con = duckdb.connect(str(tmp))
            try:
                _build(con, registry)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            os.replace(tmp, path)  # readers see a whole file or none
        finally:
            for leftover in (tmp, Path(f"{tmp}.wal")):
                if leftover.exists():
                    leftover.unlink()
        for old in folder.glob(f"{key}-*.duckdb"):  # earlier states of this registry
            if old != path:
                try:
                    old.unlink()
                except OSError:
                    pass
    except OSError:
        return None
    return path


def _connect(registry: Registry) -> duckdb.DuckDBPyConnection:
    """A sandboxed DuckDB connection over the registry's tables: the current snapshot, opened read-only,
    or an in-memory copy where no snapshot can be kept."""
    path = _snapshot(registry)
    if path is not None:
        try:
            con = duckdb.connect(str(path), read_only=True)
        except (duckdb.IOException, OSError):  # removed by a newer writer between the check and the open
            path = _snapshot(registry)
            con = duckdb.connect(str(path), read_only=True) if path else None
        if con is not None:
            _utc(con)
            return _sandbox(con)
    con = duckdb.connect(":memory:")
    _build(con, registry)
    return _sandbox(con)


def sql_timeout() -> float:
    """Seconds a catalog query may run; SPECTR_SQL_TIMEOUT overrides the default of 60."""
    return float(os.environ.get("SPECTR_SQL_TIMEOUT", 60))


def _run_bounded(con: duckdb.DuckDBPyConnection, query: str, timeout: float) -> tuple[list[str], list[tuple]]:
    """The query on a worker thread, interrupted through its cursor (DuckDB's way of cancelling) once `timeout`
    passes or on Ctrl-C. DuckDB does not look at signals while it executes (a query on the main thread ran on
    through Ctrl-C), and a KeyboardInterrupt raised while a worker executes killed the worker with the
    connection still busy; so, on the main thread, SIGINT only sets a flag and interrupts the cursor."""
    cur = con.cursor()
    box: dict[str, Any] = {}
    interrupted = threading.Event()

    def work() -> None:
        try:
            cur.execute(query)
            box["result"] = ([d[0] for d in cur.description], cur.fetchall())
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    def on_sigint(_signum: int, _frame: Any) -> None:
        interrupted.set()
        cur.interrupt()

    installed, previous = False, None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        previous, installed = signal.signal(signal.SIGINT, on_sigint), True
    worker = threading.Thread(target=work, name="spectr-catalog-query", daemon=True)
    deadline, timed_out = time.monotonic() + timeout, False
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
            timed_out = timed_out or time.monotonic() > deadline
            if (timed_out or interrupted.is_set()) and worker.is_alive():
                # Again until the worker returns: an interrupt that lands before DuckDB starts executing (a
                # loaded machine) is lost, and the query would then run to its end.
                cur.interrupt()
    finally:
        if installed:  # None: a handler not set from Python; the default is the nearest
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    cur.close()
    if interrupted.is_set():
        raise KeyboardInterrupt
    if "result" in box:  # finished, even if just at the deadline
        return box["result"]
    if timed_out:
        raise ValueError(f"catalog query stopped after {timeout:g} s (SPECTR_SQL_TIMEOUT); "
                         "narrow it or raise the limit")
    raise box["error"]


def catalog_sql(
    query: str, registry: Registry | None = None, timeout: float | None = None
) -> tuple[list[str], list[tuple]]:
    """Run one read-only query (SELECT/WITH/DESCRIBE/SHOW) over the tables in TABLES: `experts` (one row
    per version, as `spectr catalog --json`), `lineage` (as Registry.lineage()) and the registry's own
    tables; stopped after `timeout` seconds (default sql_timeout())."""
    parser = duckdb.connect(":memory:")
    try:
        statements = parser.extract_statements(query)
    except duckdb.Error as e:
        raise ValueError(f"catalog query does not parse: {_first_line(e)}") from None
    finally:
        parser.close()
    if len(statements) != 1:
        raise ValueError(f"catalog query must be exactly one statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise ValueError(f"catalog queries are read-only (SELECT/WITH/DESCRIBE/SHOW); got a {kind.name} statement")
    own = registry is None
    registry = registry or Registry()
    try:
        con = _connect(registry)
    finally:
        if own:
            registry.close()
    try:
        return _run_bounded(con, query, sql_timeout() if timeout is None else timeout)
    except duckdb.CatalogException as e:
        raise ValueError(f"catalog query failed: {_first_line(e)} (tables: {', '.join(TABLES)})") from None
    except duckdb.Error as e:
        raise ValueError(f"catalog query failed: {_first_line(e)}") from None
    finally:
        con.close()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def catalog_page(registry: Registry, limit: int | None, offset: int = 0) -> tuple[list[dict], int]:
    """One page of the `experts` view (name, version order) as Registry.catalog() dicts, and the total count:
    read from the snapshot, so listing page 1 of 10,000 versions does not load the other 9,950."""
    if limit is not None and limit < 0 or offset < 0:
        raise ValueError(f"--limit and --offset must be >= 0, got {limit} and {offset}")
    con = _connect(registry)
    try:
        total = con.execute("SELECT count(*) FROM experts").fetchone()[0]
        cur = con.execute("SELECT * FROM experts ORDER BY name, version LIMIT ? OFFSET ?",
                          [total if limit is None else limit, offset])
        cols = [d[0] for d in cur.description]
        rows = []
        types = dict(_EXPERT_COLUMNS)
        for r in cur.fetchall():
            d = dict(zip(cols, r))
            for c, v in d.items():  # back to what Registry.catalog() hands out
                if v is not None and types.get(c) == "TIMESTAMPTZ":
                    d[c] = v.isoformat()
                elif v is not None and types.get(c) == "JSON":
                    d[c] = json.loads(v)
            rows.append(d)
        return rows, total
    finally:
        con.close()
