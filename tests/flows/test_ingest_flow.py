"""The ingest flow under Prefect's test harness, and its tasks through .fn()."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spectr.pipeline import spectra as spectra_module
from spectr.flows.ingest import compute_spectra, fetch_adapter, ingest, validate_adapter
from spectr.pipeline.basemodel import resolve_base_model
from spectr.registry.spectra_format import spectra_from_bytes
from spectr.pipeline.spectra import exact_spectrum
from spectr.registry.store import Registry
from tests.pipeline.conftest import make_hub_cache


@pytest.fixture()
def spectra_calls(monkeypatch) -> list[str]:
    """Counts the SVD stage's calls (the flow's tasks run in this process)."""
    calls: list[str] = []
    real = spectra_module.adapter_spectra

    def counting(adapter, **kwargs):
        calls.append(adapter.source.name)
        return real(adapter, **kwargs)

    monkeypatch.setattr(spectra_module, "adapter_spectra", counting)
    return calls


def _registry_rows(registry: Registry) -> list[tuple]:
    return [(r["name"], r["version"], r["content_sha256"]) for r in registry.catalog()]


def test_ingest_new_unchanged_and_next_version(prefect_harness, spectr_home, make_adapter, tiny_base_dir, tmp_path, spectra_calls):
    a, b = make_adapter("alpha", seed=1), make_adapter("beta", seed=2)
    first = ingest(sources=[str(a), str(b)], base_model=str(tiny_base_dir))
    assert [(o["name"], o["status"], o["version"]) for o in first] == [("alpha", "new", 1), ("beta", "new", 1)]
    assert sorted(spectra_calls) == ["alpha", "beta"]

    again = ingest(sources=[str(a), str(b)], base_model=str(tiny_base_dir))
    assert [o["status"] for o in again] == ["unchanged", "unchanged"]
    assert sorted(spectra_calls) == ["alpha", "beta"], "a rerun must do no SVD work"

    changed = tmp_path / "alpha"  # same name, other weights
    shutil.copytree(make_adapter("alpha-retrained", seed=3), changed)
    third = ingest(sources=[str(changed)], base_model=str(tiny_base_dir))
    assert [(o["name"], o["status"], o["version"]) for o in third] == [("alpha", "new", 2)]
    registry = Registry()
    assert [v.version for v in registry.versions("alpha")] == [1, 2]
    # The stored blob is the exact spectrum of the adapter's factors.
    blob = spectra_from_bytes(registry.load_spectra_bytes("alpha", 1))
    assert len(blob.modules) == 14 and blob.method == "exact"


def test_rejection_is_an_outcome_and_changes_nothing(prefect_harness, spectr_home, make_adapter, tiny_base_dir, tmp_path):
    good = make_adapter("good", seed=4)
    bad = tmp_path / "dora"
    shutil.copytree(make_adapter("dora-src", seed=5), bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    registry = Registry()

    outcomes = ingest(sources=[str(bad), str(good)], base_model=str(tiny_base_dir))
    assert [o["status"] for o in outcomes] == ["rejected", "new"]
    assert "DoRA" in outcomes[0]["reason"] or "use_dora" in outcomes[0]["reason"]
    assert [r[0] for r in _registry_rows(registry)] == ["good"]
    # The rejected adapter left no blob behind: the only blobs are the good one's spectra and kept files.
    stored = sorted(Path(registry.blobs.root).rglob("*.safetensors"))
    good_blobs = [registry.get_version("good").blob_sha256, *registry.adapter_files("good").values()]
    assert stored == sorted(Path(registry.blobs.path(sha)) for sha in good_blobs) and len(stored) == 3
    runs = registry.get_run(registry_last_run(registry))
    assert (runs["accepted"], runs["rejected"], runs["new_versions"]) == (1, 1, 1)


def test_an_out_of_memory_adapter_gets_a_reason_not_an_empty_memoryerror(prefect_harness, spectr_home, make_adapter,
                                                                          tiny_base_dir, monkeypatch):
    """A failed allocation raises MemoryError with no message; the adapter's line still says what happened and
    what to do, the next adapter is ingested, and the failed one leaves no row and no spectra blob."""
    big, good = make_adapter("big", seed=6), make_adapter("fine", seed=7)
    real = spectra_module.adapter_spectra

    def exhausted(adapter, **kwargs):
        if adapter.source.name == "big":
            raise MemoryError()
        return real(adapter, **kwargs)

    monkeypatch.setattr(spectra_module, "adapter_spectra", exhausted)
    registry = Registry()
    outcomes = ingest(sources=[str(big), str(good)], base_model=str(tiny_base_dir))
    assert [o["status"] for o in outcomes] == ["rejected", "new"]
    reason = outcomes[0]["reason"]
    assert "out of memory" in reason and "MemoryError" in reason and "\n" not in reason, reason
    assert [r[0] for r in _registry_rows(registry)] == ["fine"]
    stored = sorted(Path(registry.blobs.root).rglob("*.safetensors"))
    good_blobs = [registry.get_version("fine").blob_sha256, *registry.adapter_files("fine").values()]
    assert stored == sorted(Path(registry.blobs.path(sha)) for sha in good_blobs), stored


def registry_last_run(registry: Registry) -> str:
    from spectr.registry.catalog import catalog_sql

    _, rows = catalog_sql("select id from ingestion_runs order by started_at desc limit 1", registry)
    return rows[0][0]


def test_spectra_cache_hit_skips_svd_for_a_fresh_registry(prefect_harness, spectr_home, make_adapter, tiny_base_dir, tmp_path, monkeypatch, spectra_calls):
    src = make_adapter("cached", seed=6)
    ingest(sources=[str(src)], base_model=str(tiny_base_dir))
    assert spectra_calls == ["cached"]
    # A new database over the same blob store: the version row is new, the SVD result comes from the cache.
    monkeypatch.setenv("SPECTR_REGISTRY_URL", f"sqlite:///{tmp_path / 'other.db'}")
    outcomes = ingest(sources=[str(src)], base_model=str(tiny_base_dir))
    assert [(o["status"], o["version"]) for o in outcomes] == [("new", 1)]
    assert spectra_calls == ["cached"]
    # With the blob gone, the cached key is not trusted: the SVD runs again and the blob comes back.
    registry = Registry()
    sha = registry.get_version("cached").blob_sha256
    registry.blobs.delete(sha)
    monkeypatch.setenv("SPECTR_REGISTRY_URL", f"sqlite:///{tmp_path / 'third.db'}")
    ingest(sources=[str(src)], base_model=str(tiny_base_dir))
    assert spectra_calls == ["cached", "cached"]
    assert registry.blobs.exists(sha)


def test_hub_source_offline_records_the_commit(prefect_harness, spectr_home, make_adapter, tiny_base_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_hub_cache(cache, "tiny-org/hub-expert", make_adapter("hub-src", seed=7), commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    outcomes = ingest(sources=["tiny-org/hub-expert@main"], base_model=str(tiny_base_dir))
    assert [(o["name"], o["status"]) for o in outcomes] == [("hub-expert", "new")]
    registry = Registry()
    info = registry.get_version("hub-expert")
    assert info.revision == commit and info.source.startswith("tiny-org/hub-expert")
    # Lineage names the repo and the commit "main" resolved to, the run and its Prefect flow run, and the SVD.
    [row] = registry.lineage("hub-expert@1")
    assert (row["source_kind"], row["repo"], row["commit"], row["source"]) == (
        "hub", "tiny-org/hub-expert", commit, "tiny-org/hub-expert@main")
    assert row["ingestion_run_id"] == info.ingestion_run_id is not None
    assert row["flow_run_id"] == registry.get_run(info.ingestion_run_id)["flow_run_id"]
    assert len(row["flow_run_id"]) == 36 and row["svd_method"] == "exact" and row["bundles"] == []
    from spectr.registry.catalog import catalog_sql

    _, rows = catalog_sql("select repo, \"commit\" from lineage where name = 'hub-expert'", registry)
    assert rows == [("tiny-org/hub-expert", commit)]
    # The kept adapter is the snapshot's bytes.
    out = registry.export_adapter("hub-expert", tmp_path / "exported")
    snap = cache / "models--tiny-org--hub-expert" / "snapshots" / commit
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / f).read_bytes() == (snap / f).read_bytes()


def test_base_model_found_in_registry_by_adapter_name(prefect_harness, spectr_home, make_adapter, tiny_base_dir):
    """Without --base-model the adapter's base_model_name_or_path is looked up among registered bases."""
    src = make_adapter("named", seed=8)
    missing = ingest(sources=[str(src)])
    assert missing[0]["status"] == "rejected" and "tiny-org/tiny-llama" in missing[0]["reason"]
    Registry().ensure_base_model(resolve_base_model(tiny_base_dir, name="tiny-org/tiny-llama"))
    assert ingest(sources=[str(src)])[0]["status"] == "new"


def test_tasks_as_plain_functions(spectr_home, make_adapter, tiny_base_dir):
    src = fetch_adapter.fn(str(make_adapter("plain", seed=9)))
    base = resolve_base_model(tiny_base_dir)
    adapter = validate_adapter.fn(src, base)
    registry = Registry()
    result = compute_spectra.fn(adapter, registry.blobs.url)
    spectra = spectra_from_bytes(registry.blobs.get(result["blob_sha256"]))
    module, factors = next(iter(adapter.modules.items()))
    expected = exact_spectrum(factors.A, factors.B, factors.scaling)
    assert result["n_modules"] == len(adapter.modules) == len(spectra.modules)
    assert spectra.modules[module].S.tolist() == expected.S.tolist()


def test_dense_finetune_ingested_by_randomized_svd(prefect_harness, spectr_home, tiny_base_dir, tmp_path):
    from tests.pipeline.test_dense import D1, Q0, _finetune, _low_rank

    updates = {Q0: _low_rank(64, 64, 2, 1), D1: _low_rank(64, 128, 3, 2)}
    folder = _finetune(tmp_path / "tiny-ft", updates)
    outcomes = ingest(sources=[str(folder)], base_model=str(tiny_base_dir), dense=True, rank=4)
    assert [(o["name"], o["status"]) for o in outcomes] == [("tiny-ft", "new")], outcomes
    registry = Registry()
    info = registry.get_version("tiny-ft")
    assert info.method == "randomized" and info.rank == 4
    assert info.files == ()  # a dense expert has no adapter files to keep; `spectr export` says so in one line
    spectra = spectra_from_bytes(registry.load_spectra_bytes("tiny-ft"))
    assert sorted(spectra.modules) == sorted(updates)
    for name, delta in updates.items():
        m = spectra.modules[name]
        rebuilt = m.scaling * (m.U * m.S) @ m.V.T
        assert (rebuilt - delta).norm() / delta.norm() < 1e-4
        assert m.energy > 0.9999


@pytest.mark.parametrize("n, workers", [(1, 1), (6, 2), (200, 2), (1000, 1), (1000, 8), (37, 64)])
def test_batches_shrink_towards_the_end(n, workers):
    from spectr.flows.ingest import MAX_BATCH, MIN_BATCH, batch_sizes

    sizes = batch_sizes(n, workers)
    assert sum(sizes) == n and all(1 <= s <= MAX_BATCH for s in sizes)
    assert sizes == sorted(sizes, reverse=True)  # large first, small last: the workers finish together
    assert sizes[-1] <= MIN_BATCH or len(sizes) == 1
