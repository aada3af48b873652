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
