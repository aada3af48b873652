"""Distributed ingest: Prefect's Dask task runner on a local 2-worker cluster writes the same registry as the
plain in-process run."""
from __future__ import annotations

import shutil

import pytest

pytest.importorskip("prefect_dask", reason="the dask extra (pip install 'spectr[dask]') is not installed")


def _content(home) -> dict:
    from spectr.registry import Registry

    with Registry(f"sqlite:///{home / 'registry.db'}", str(home / "blobs")) as reg:
        versions = [{k: v for k, v in d.items() if k != "created_at"} for d in reg.catalog()]
        runs = reg.engine.connect().exec_driver_sql("SELECT id FROM ingestion_runs ORDER BY started_at").scalars().all()
        results = [{k: r[k] for k in ("source", "name", "status", "version", "reason", "warnings")}
                   for run in runs for r in reg.get_run(run)["results"]]
        blobs = sorted(p.relative_to(home / "blobs").as_posix() for p in (home / "blobs").rglob("*") if p.is_file())
    return {"versions": versions, "results": results, "blobs": blobs}


def test_local_two_worker_cluster_matches_the_default_runner(prefect_harness, tmp_path, monkeypatch, make_adapter,
                                                             tiny_base_dir):
    from spectr.orchestration import run_ingest

    folder = tmp_path / "adapters"
    folder.mkdir()
    for i, name in enumerate(["d-alpha", "d-beta", "d-gamma", "d-delta"]):
        shutil.copytree(make_adapter(name, seed=40 + i, r=4 + 2 * (i % 2)), folder / name)
    shutil.copytree(make_adapter("d-epsilon", seed=49), folder / "d-epsilon")
    bad = folder / "d-broken"
    shutil.copytree(make_adapter("d-broken-src", seed=48), bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    sources = [str(p) for p in sorted(folder.iterdir())]

    homes = {}
    for how in ("default", "dask"):
        home = tmp_path / how
        monkeypatch.setenv("SPECTR_HOME", str(home))
        monkeypatch.delenv("SPECTR_REGISTRY_URL", raising=False)
        monkeypatch.delenv("SPECTR_BLOB_URL", raising=False)
        kw = {"workers": 2} if how == "dask" else {}
        outcomes = run_ingest(sources, base_model=str(tiny_base_dir), **kw)
        assert [o.status for o in outcomes].count("new") == 5 and [o.status for o in outcomes].count("rejected") == 1
        again = run_ingest(sources[:2], base_model=str(tiny_base_dir), **kw)  # known content: unchanged
        assert [o.status for o in again] == ["unchanged", "unchanged"]
        homes[how] = _content(home)
    assert homes["dask"] == homes["default"]
    versions, blobs = homes["default"]["versions"], homes["default"]["blobs"]
    assert len(versions) == 5 and all(v["adapter_kept"] for v in versions)  # files kept, as a plain run
    assert {f"sha256/{v['blob_sha256'][:2]}/{v['blob_sha256'][2:]}.safetensors" for v in versions} <= set(blobs)


@pytest.mark.parametrize("args, message", [
    (["--dask", "tcp://127.0.0.1:8786", "--workers", "2"], "--dask and --workers exclude each other"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
])
def test_dask_option_mistakes_are_one_line(spectr_home, make_adapter, args, message):
    from typer.testing import CliRunner

    from spectr.cli import app

    r = CliRunner().invoke(app, ["ingest", str(make_adapter("d-opt", seed=50)), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (spectr_home / "registry.db").exists()  # nothing recorded
