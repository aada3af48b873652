"""Read-only SQL over the registry through an in-memory DuckDB loaded with the registry's rows."""
from __future__ import annotations

import json
import os
import threading
from datetime import datetime
from typing import Any

import duckdb
from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Integer, select

from spectr.registry.models import Base
from spectr.registry.store import Registry

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


def _cells(d: dict, columns: list[tuple[str, str]]) -> list:
    row = []
    for c, t in columns:
        v = d[c]
        if t == "TIMESTAMPTZ" and v is not None:
            v = datetime.fromisoformat(v)
        elif t == "JSON" and v is not None:
            v = json.dumps(v, sort_keys=True)
        row.append(v)
    return row


def _duck_type(sa_type: Any) -> str:
    # Order matters: BigInteger is an Integer; JSON goes in as text in DuckDB's JSON type.
    for cls, name in ((JSON, "JSON"), (Boolean, "BOOLEAN"), (BigInteger, "BIGINT"), (Integer, "BIGINT"),
                      (Float, "DOUBLE"), (DateTime, "TIMESTAMPTZ")):
        if isinstance(sa_type, cls):
            return name
    impl = getattr(sa_type, "impl", None)
    return _duck_type(impl) if impl is not None else "VARCHAR"


def _load(con: duckdb.DuckDBPyConnection, table: str, columns: list[tuple[str, str]], rows: list[list]) -> None:
    cols = ", ".join(f'"{c}" {t}' for c, t in columns)
    con.execute(f'CREATE TABLE "{table}" ({cols})')
    if rows:
        marks = ", ".join("?" for _ in columns)
        con.executemany(f'INSERT INTO "{table}" VALUES ({marks})', rows)


def _connect(registry: Registry) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:  # without ICU timestamps still load; they print in local time
        pass
    with registry.engine.connect() as sql:
        for table in Base.metadata.sorted_tables:
            columns = [(c.name, _duck_type(c.type)) for c in table.columns]
            json_at = [i for i, (_, t) in enumerate(columns) if t == "JSON"]
            rows = []
            for r in sql.execute(select(table)):
                row = list(r)
                for i in json_at:
                    row[i] = None if row[i] is None else json.dumps(row[i])
                rows.append(row)
            _load(con, table.name, columns, rows)
    _load(con, "experts", _EXPERT_COLUMNS, [_cells(d, _EXPERT_COLUMNS) for d in registry.catalog()])
    _load(con, "lineage", _LINEAGE_COLUMNS, [_cells(d, _LINEAGE_COLUMNS) for d in registry.lineage()])
    # The user's query may not touch files or change settings; the database is a throwaway copy anyway.
    con.execute("SET enable_external_access = false")
    con.execute(f"SET memory_limit = '{os.environ.get('SPECTR_SQL_MEMORY', '2GB')}'")
    con.execute("SET lock_configuration = true")
    return con


def sql_timeout() -> float:
    """Seconds a catalog query may run; SPECTR_SQL_TIMEOUT overrides the default of 60."""
    return float(os.environ.get("SPECTR_SQL_TIMEOUT", 60))


def _run_bounded(con: duckdb.DuckDBPyConnection, query: str, timeout: float) -> tuple[list[str], list[tuple]]:
    """The query, interrupted through its cursor (DuckDB's way of cancelling) once `timeout` passes.
    (DuckDB also notices Ctrl-C while it runs, though not reliably in every run: the time limit is the bound.)"""
    cur = con.cursor()
    done, timed_out = threading.Event(), threading.Event()

    def deadline() -> None:
        if not done.wait(timeout):
            timed_out.set()
            cur.interrupt()

    watcher = threading.Thread(target=deadline, name="spectr-catalog-deadline", daemon=True)
    watcher.start()
    try:
        cur.execute(query)
        return [d[0] for d in cur.description], cur.fetchall()
    except (duckdb.InterruptException, RuntimeError) as e:  # an interrupted query surfaces as either
        if timed_out.is_set():
            raise ValueError(f"catalog query stopped after {timeout:g} s (SPECTR_SQL_TIMEOUT); "
                             "narrow it or raise the limit") from None
        if "interrupt" in str(e).lower():
            raise KeyboardInterrupt from None
        raise
    finally:
        done.set()
        watcher.join()
        cur.close()


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
