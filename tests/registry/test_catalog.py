from __future__ import annotations

import pytest

from spectr.registry import Registry
from spectr.registry.catalog import TABLES, catalog_sql
from tests.registry.conftest import loaded, spectra_bytes


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """One registry for the module's read-only queries (keeps the file fast)."""
    root = tmp_path_factory.mktemp("catalog")
    reg = Registry(f"sqlite:///{root / 'reg.db'}", str(root / "blobs"))
    for name, content, rank, method, params, energy in [
        ("math", "1", 4, "exact", {}, 1.0),
        ("math", "2", 4, "randomized", {"rank": 4, "niter": 2}, 0.9),
        ("code", "3", 8, "exact", {}, 1.0),
    ]:
        data = spectra_bytes(rank)
        reg.add_version(loaded(name, content, rank=rank), reg.blobs.put(data), method=method, params=params,
                        energy=energy, n_modules=1, size_bytes=len(data))
    run = reg.start_run(["/a"], {})
    reg.record_result(run, source="/a/bad", name=None, status="rejected", reason="bad shapes")
    reg.finish_run(run, "failed")
    yield reg
    reg.close()


def test_group_by_over_experts(filled):
    cols, rows = catalog_sql(
        "SELECT name, count(*) AS n, max(version) AS latest, min(energy) AS worst "
        "FROM experts GROUP BY name ORDER BY name", filled)
    assert cols == ["name", "n", "latest", "worst"]
    assert rows == [("code", 1, 1, 1.0), ("math", 2, 2, 0.9)]


def test_joins_lists_and_json_over_raw_tables(filled):
    _, rows = catalog_sql(
        "WITH v AS (SELECT a.name, av.version, s.method, s.params->>'niter' AS niter "
        "FROM adapter_versions av JOIN adapters a ON a.id = av.adapter_id "
        "JOIN spectra s ON s.version_id = av.id) SELECT * FROM v WHERE method = 'randomized'", filled)
    assert rows == [("math", 2, "randomized", "2")]
    _, rows = catalog_sql("SELECT DISTINCT name FROM experts WHERE list_contains(target_modules, 'q_proj') "
                          "ORDER BY name", filled)
    assert rows == [("code",), ("math",)]
    _, rows = catalog_sql("SELECT status, rejected, accepted FROM ingestion_runs", filled)
    assert rows == [("failed", 1, 0)]


def test_experts_view_matches_catalog(filled):
    cols, rows = catalog_sql("SELECT * FROM experts ORDER BY name, version", filled)
    expected = filled.catalog()
    assert [dict(zip(cols, r))["content_sha256"] for r in rows] == [e["content_sha256"] for e in expected]
    assert set(cols) == set(expected[0])
    _, shown = catalog_sql("SHOW TABLES", filled)
    assert {r[0] for r in shown} == set(TABLES)
    cols, _ = catalog_sql("DESCRIBE experts", filled)
    assert cols[0] == "column_name"


@pytest.mark.parametrize("query, message", [
    ("DELETE FROM experts", "read-only"),
    ("CREATE TABLE x AS SELECT 1", "read-only"),
    ("ATTACH 'other.db'", "read-only"),
    ("SELECT 1; DROP TABLE experts", "exactly one statement"),
    ("SELEC name FROM experts", "does not parse"),
    ("SELECT * FROM read_text('/etc/hostname')", "catalog query failed"),
    ("SELECT * FROM nope", "tables: experts"),
])
def test_refused_queries(filled, query, message):
    with pytest.raises(ValueError, match=message):
        catalog_sql(query, filled)


def test_default_registry_from_environment(spectr_home, add):
    add("math", "1")
    _, rows = catalog_sql("SELECT name, version FROM experts")  # opens Registry() at SPECTR_HOME
    assert rows == [("math", 1)]


HUGE = "select sum(a.range * b.range) from range(100000000) a, range(100000000) b"


def test_a_runaway_query_is_stopped_at_its_time_limit(filled):
    with pytest.raises(ValueError, match=r"catalog query stopped after 0.5 s \(SPECTR_SQL_TIMEOUT\)"):
        catalog_sql(HUGE, registry=filled, timeout=0.5)
    assert catalog_sql("select count(*) from experts", registry=filled)[1] == [(3,)]  # the registry is fine


def _reference(reg) -> dict[str, list[tuple]]:
    """Every table as the catalog showed it before snapshots: rows inserted one by one into an in-memory
    DuckDB straight from the registry (the old loader), then read back in a fixed order."""
    import json
    from datetime import datetime

    import duckdb
    from sqlalchemy import select

    from spectr.registry.catalog import _EXPERT_COLUMNS, _LINEAGE_COLUMNS, _duck_type
    from spectr.registry.models import Base

    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")

    def load(table, columns, rows):
        con.execute(f'CREATE TABLE "{table}" ({", ".join(f"{chr(34)}{c}{chr(34)} {t}" for c, t in columns)})')
        if rows:
            con.executemany(f'INSERT INTO "{table}" VALUES ({", ".join("?" for _ in columns)})', rows)

    with reg.engine.connect() as sql:
        for table in Base.metadata.sorted_tables:
            columns = [(c.name, _duck_type(c.type)) for c in table.columns]
            rows = [[json.dumps(v) if t == "JSON" and v is not None else v for v, (_, t) in zip(r, columns)]
                    for r in sql.execute(select(table))]
            load(table.name, columns, rows)
    def cells(d, columns):  # as the old loader converted the Registry's dicts
        return [datetime.fromisoformat(d[c]) if t == "TIMESTAMPTZ" and d[c] is not None
                else json.dumps(d[c], sort_keys=True) if t == "JSON" and d[c] is not None else d[c]
                for c, t in columns]

    load("experts", _EXPERT_COLUMNS, [cells(d, _EXPERT_COLUMNS) for d in reg.catalog()])
    load("lineage", _LINEAGE_COLUMNS, [cells(d, _LINEAGE_COLUMNS) for d in reg.lineage()])
    return {t: con.execute(f'SELECT * FROM "{t}" ORDER BY ALL').fetchall() for t in TABLES}


def test_snapshot_answers_the_same_rows_as_the_old_copy(filled):
    want = _reference(filled)
    for table in TABLES:
        cols, got = catalog_sql(f'SELECT * FROM "{table}" ORDER BY ALL', filled)
        assert got == want[table], table
        _, types = catalog_sql(f'DESCRIBE "{table}"', filled)
        assert len(types) == len(cols)
    assert sum(len(v) for v in want.values()) > 10


def test_snapshot_is_reused_until_the_registry_changes(tmp_path, monkeypatch):
    from spectr.registry.catalog import snapshot_dir

    monkeypatch.setenv("SPECTR_CATALOG_CACHE", str(tmp_path / "cache"))
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "blobs"))
    try:
        def add(name, content):
            data = spectra_bytes(4)
            reg.add_version(loaded(name, content), reg.blobs.put(data), method="exact", params={}, energy=1.0,
                            n_modules=1, size_bytes=len(data))

        add("math", "1")
        assert catalog_sql("SELECT name, version FROM experts", reg)[1] == [("math", 1)]
        first = list(snapshot_dir().glob("*.duckdb"))
        assert len(first) == 1
        inode = first[0].stat().st_ino
        assert catalog_sql("SELECT count(*) FROM experts", reg)[1] == [(1,)]
        assert [p.stat().st_ino for p in snapshot_dir().glob("*.duckdb")] == [inode]  # not rebuilt

        add("math", "2")  # a new row
        assert catalog_sql("SELECT name, version FROM experts ORDER BY version", reg)[1] == [("math", 1), ("math", 2)]
        run = reg.start_run(["/a"], {})
        assert catalog_sql("SELECT status FROM ingestion_runs", reg)[1] == [("running",)]
        reg.finish_run(run, "ok")  # an update in place: same row count, same file size
        assert catalog_sql("SELECT status FROM ingestion_runs", reg)[1] == [("ok",)]
        assert len(list(snapshot_dir().glob("*.duckdb"))) == 1  # older states are removed
    finally:
        reg.close()


def test_unwritable_cache_falls_back_to_an_in_memory_copy(filled, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SPECTR_CATALOG_CACHE", str(blocker / "cache"))
    assert catalog_sql("SELECT count(*) FROM experts", filled)[1] == [(3,)]


def test_cli_catalog_pages_and_json_matches_the_registry(spectr_home, registry, add):
    import json

    from typer.testing import CliRunner

    from spectr.cli import app

    for i, c in enumerate("123456789a"):
        add(f"e{i % 4}", c)
    runner = CliRunner()
    full = runner.invoke(app, ["catalog", "--json"])
    assert full.exit_code == 0, full.output
    assert json.loads(full.output) == registry.catalog()  # same dicts, same order as before the snapshot
    page = json.loads(runner.invoke(app, ["catalog", "--json", "--limit", "3", "--offset", "4"]).output)
    assert page == registry.catalog()[4:7]
    table = runner.invoke(app, ["catalog", "--limit", "4"])
    assert table.exit_code == 0 and "10 expert versions (showing 1-4; --offset 4 for more)" in table.output
    last = runner.invoke(app, ["catalog", "--limit", "4", "--offset", "8"])
    assert "(showing 9-10)" in last.output and "--offset" not in last.output
    bad = runner.invoke(app, ["catalog", "--limit", "-1"])
    assert bad.exit_code == 2 and "--limit and --offset must be >= 0" in bad.output
