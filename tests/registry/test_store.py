from __future__ import annotations

import dataclasses
from datetime import timezone

import pytest
from safetensors.torch import load
from sqlalchemy import event, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from spectr.registry import ImmutableVersionError, Registry
from spectr.registry.models import AdapterVersion, Spectra
from tests.registry.conftest import BASE, loaded, spectra_bytes


def _count(reg: Registry, table: str) -> int:
    with reg.engine.connect() as c:
        return c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_default_location_is_spectr_home(registry, spectr_home):
    assert registry.url == f"sqlite:///{spectr_home / 'registry.db'}"
    assert (spectr_home / "registry.db").is_file()
    assert registry.blobs.root == str(spectr_home / "blobs")


def test_same_content_is_a_no_op_changed_content_is_version_2(registry, add):
    v1, created1 = add("math", "1", seed=1)
    again, created_again = add("math", "1", seed=1)
    v2, created2 = add("math", "2", seed=2)
    assert (v1.version, created1) == (1, True)
    assert (again.version, created_again) == (1, False) and again == v1
    assert (v2.version, created2) == (2, True)
    assert [v.version for v in registry.versions("math")] == [1, 2]
    assert _count(registry, "adapter_versions") == 2 and _count(registry, "spectra") == 2
    assert registry.get_version("math") == v2 and registry.get_version("math", 1) == v1
    assert registry.find_version("math", "1" * 64) == v1
    assert registry.find_version("math", "9" * 64) is None
    assert v1.created_at.tzinfo == timezone.utc and v1.created_at <= v2.created_at
    assert v1.target_modules == ["q_proj", "v_proj"] and v1.base_model == BASE.name


def test_spectra_bytes_round_trip(registry, add):
    add("code", "3", seed=7)
    tensors = load(registry.load_spectra_bytes("code"))
    expected = load(spectra_bytes(7))
    assert set(tensors) == {"m.U", "m.S", "m.V"}
    assert all((tensors[k] == expected[k]).all() for k in expected)


def test_get_version_errors_name_what_exists(registry, add):
    add("math", "1")
    with pytest.raises(KeyError, match="no expert named 'nope'"):
        registry.get_version("nope")
    with pytest.raises(KeyError, match=r"has no version 5 \(versions: 1\)"):
        registry.get_version("math", 5)


def test_missing_blob_writes_nothing(registry):
    with pytest.raises(ValueError, match="not in the blob store"):
        registry.add_version(loaded("math", "1"), "c" * 64, method="exact", params={}, energy=1.0,
                             n_modules=1, size_bytes=1)
    for table in ("base_models", "adapters", "adapter_versions", "spectra"):
        assert _count(registry, table) == 0, table


def test_base_model_conflicts(registry, add):
    add("math", "1")
    other = dataclasses.replace(BASE, name="other-org/other", config_sha256="d" * 64)
    with pytest.raises(ValueError, match="registered for base model 'tiny-org/tiny-llama'"):
        add("math", "2", base=other)
    assert [v.version for v in registry.versions("math")] == [1]
    # The same base name with a different config is a different model: refused.
    with pytest.raises(ValueError, match="different model under the same name"):
        registry.ensure_base_model(dataclasses.replace(BASE, config_sha256="e" * 64))
    registry.ensure_base_model(BASE)  # same again: fine
    assert _count(registry, "base_models") == 1


def test_base_model_config_loose_lookup(registry):
    registry.ensure_base_model(BASE)
    assert registry.base_model_config("tiny-org/tiny-llama") == (BASE.name, BASE.config)
    assert registry.base_model_config("/models/Tiny-Llama/")[0] == BASE.name
    assert registry.base_model_config("TINY-ORG/TINY-LLAMA")[0] == BASE.name
    assert registry.base_model_config("tiny-org/other") is None


def test_versions_are_immutable(registry, add):
    add("math", "1")
    with Session(registry.engine) as s:
        row = s.scalar(select(AdapterVersion))
        row.rank = 99
        with pytest.raises(ImmutableVersionError, match="immutable"):
            s.flush()
        s.rollback()
        s.delete(s.scalar(select(AdapterVersion)))
        with pytest.raises(ImmutableVersionError, match="cannot be deleted"):
            s.flush()
    # Below the ORM, the migration's trigger refuses the UPDATE too.
    with pytest.raises(DBAPIError, match="immutable"):
        with registry.engine.begin() as c:
            c.execute(text("UPDATE adapter_versions SET rank = 99"))
    assert registry.get_version("math", 1).rank == 4


def _race_once(registry, add, content: str) -> list[int]:
    """Before our version INSERT runs, another Registry commits `content` under the same name."""
    other = Registry(migrate=False)
    fired: list[int] = []

    @event.listens_for(registry.engine, "before_cursor_execute")
    def _race(conn, cursor, statement, params, context, many):
        if statement.startswith("INSERT INTO adapter_versions") and not fired:
            fired.append(1)
            add("math", content, reg=other)
            other.close()

    return fired


def test_concurrent_writer_between_read_and_insert(registry, add):
    """Another process takes the next version number first: unique constraint, one retry."""
    add("math", "1")
    fired = _race_once(registry, add, "2")
    info, created = add("math", "3")
    assert fired and created and info.version == 3
    assert [(v.version, v.content_sha256[0]) for v in registry.versions("math")] == [(1, "1"), (2, "2"), (3, "3")]


def test_concurrent_writer_same_content_returns_theirs(registry, add):
    add("math", "1")  # base and adapter rows exist, so only the version insert races
    fired = _race_once(registry, add, "5")
    info, created = add("math", "5")
    assert fired and not created and info.version == 2 and info.content_sha256 == "5" * 64
    assert _count(registry, "adapter_versions") == 2


def test_ingestion_runs_count_results(registry, add):
    run = registry.start_run(["/a/math", "/a/bad"], {"method": "exact"})
    v, _ = add("math", "1", run_id=run)
    registry.record_result(run, source="/a/math", name="math", status="new", version=v.version)
    registry.record_result(run, source="/a/math2", name="math", status="unchanged", version=1)
    registry.record_result(run, source="/a/bad", name=None, status="rejected",
                           reason="bad.safetensors: q_proj lora_A 4x65, expected 4x64", warnings=["w"])
    with pytest.raises(ValueError, match="status must be one of"):
        registry.record_result(run, source="x", name=None, status="maybe")
    with pytest.raises(KeyError):
        registry.record_result("no-such-run", source="x", name=None, status="new")
    registry.finish_run(run, "completed")
    got = registry.get_run(run)
    assert (got["status"], got["accepted"], got["rejected"], got["new_versions"]) == ("completed", 2, 1, 1)
    assert got["finished_at"] is not None and got["results"][2]["warnings"] == ["w"]
    with Session(registry.engine) as s:
        assert s.scalar(select(AdapterVersion.ingestion_run_id)) == run
        assert s.scalar(select(Spectra.params)) == {"dtype": "float64"}


def test_catalog_rows(registry, add):
    add("math", "1")
    add("math", "2", method="randomized", params={"rank": 4, "niter": 4}, energy=0.97)
    add("code", "1", rank=8)
    rows = registry.catalog()
    assert [(r["name"], r["version"]) for r in rows] == [("code", 1), ("math", 1), ("math", 2)]
    assert rows[0]["rank"] == 8 and rows[0]["alpha"] == 16.0 and rows[0]["modules"] == 0
    assert rows[2]["method"] == "randomized" and rows[2]["energy"] == pytest.approx(0.97)
    assert rows[1]["created_at"].endswith("+00:00")
    needed = {"name", "version", "base_model", "rank", "modules", "content_sha256", "blob_sha256",
              "target_modules", "method", "energy", "source", "revision", "created_at", "alpha"}
    assert needed <= set(rows[0])


def test_add_versions_stores_a_batch_in_order_or_nothing(registry):
    """The distributed ingest's writer: a returned batch's versions in one transaction, numbered in order; a
    batch with one unusable item stores none of them (the caller then stores each on its own)."""
    data = spectra_bytes(3)
    blob = registry.blobs.put(data)
    kw = dict(blob=blob, method="exact", params={}, energy=1.0, n_modules=1, size_bytes=len(data))
    bad = [dict(adapter=loaded("early", "1"), **kw), dict(adapter=loaded("late", "2"), **{**kw, "blob": "f" * 64})]
    with pytest.raises(ValueError, match="not in the blob store"):
        registry.add_versions(bad)
    assert _count(registry, "adapter_versions") == 0
    got = registry.add_versions([dict(adapter=loaded("twice", c), **kw) for c in "3434"])
    assert [(v.version, created) for v, created in got] == [(1, True), (2, True), (1, False), (2, False)]


def test_record_results_keeps_their_order(registry):
    run = registry.start_run(["/a/x", "/a/y", "/a/z"], {})
    registry.record_results(run, [dict(source=f"/a/{n}", name=n, status="rejected", reason=n) for n in "zxy"])
    assert [r["source"] for r in registry.get_run(run)["results"]] == ["/a/z", "/a/x", "/a/y"]
    with pytest.raises(ValueError, match="status must be one of"):
        registry.record_results(run, [dict(source="/a/ok", name=None, status="new"), dict(source="x", status="maybe")])
    assert len(registry.get_run(run)["results"]) == 3  # nothing of a refused list
