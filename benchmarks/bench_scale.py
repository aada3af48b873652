"""Scale: ingest of generated SmolLM2-shaped rank-8 adapters with 1 and N workers, and catalog latency at
100 / 1,000 / 10,000 versions.

    .venv/bin/python benchmarks/bench_scale.py catalog --sizes 100,1000,10000
    .venv/bin/python benchmarks/bench_scale.py ingest --adapters 1000 --workers 1,2

Catalog: the registry is filled through SQLAlchemy Core with rows shaped as add_version writes them (one
shared spectra blob), then timed through catalog_sql: the first query after a change (builds the snapshot)
and the median of later ones (reuse), for a filter-and-group query and a listing page.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

QUERY = ("SELECT base_model, rank, count(*) AS n, avg(energy) AS energy FROM experts "
         "WHERE energy > 0.5 AND list_contains(target_modules, 'q_proj') GROUP BY ALL ORDER BY n DESC")


def fill(reg, n: int) -> None:
    from sqlalchemy import insert

    from spectr.registry.models import Adapter, AdapterVersion, BaseModelRow, Spectra

    blob = reg.blobs.put(b"spectra placeholder for the catalog benchmark")
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA",
              "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    experts = max(1, n // 4)  # four versions per expert
    with reg.engine.begin() as c:
        c.execute(insert(BaseModelRow), [dict(id=1, name="HuggingFaceTB/SmolLM2-135M-Instruct",
                                              architecture="LlamaForCausalLM", model_type="llama",
                                              config={"hidden_size": 576}, config_sha256="b" * 64, created_at=t0)])
        c.execute(insert(Adapter), [dict(id=i + 1, name=f"expert-{i:05d}", base_model_id=1, created_at=t0)
                                    for i in range(experts)])
        c.execute(insert(AdapterVersion), [dict(
            id=v + 1, adapter_id=v % experts + 1, version=v // experts + 1, source=f"/adapters/expert-{v:05d}",
            revision=None, content_sha256=f"{v:064x}", config=config, rank=8, alpha=16.0,
            target_modules=["q_proj", "v_proj"], modules_to_save=[], n_modules=60, dense=False,
            ingestion_run_id=None, created_at=t0 + timedelta(seconds=v)) for v in range(n)])
        c.execute(insert(Spectra), [dict(
            version_id=v + 1, blob_sha256=blob, method="exact", params={"dtype": "float32"},
            params_sha256="c" * 64, energy=(v % 100) / 100, n_modules=60, size_bytes=1 << 20,
            created_at=t0 + timedelta(seconds=v)) for v in range(n)])


def bench_catalog(sizes: list[int], repeats: int) -> list[dict]:
    from spectr.registry import Registry
    from spectr.registry.catalog import catalog_page, catalog_sql

    out = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            import os

            os.environ["SPECTR_CATALOG_CACHE"] = f"{d}/cache"
            reg = Registry(f"sqlite:///{d}/reg.db", f"{d}/blobs")
            fill(reg, n)
            t = time.perf_counter()
            _, rows = catalog_sql(QUERY, reg)
            first = time.perf_counter() - t
            warm = []
            for _ in range(repeats):
                t = time.perf_counter()
                catalog_sql(QUERY, reg)
                warm.append(time.perf_counter() - t)
            page = []
            for _ in range(repeats):
                t = time.perf_counter()
                catalog_page(reg, 100, 0)
                page.append(time.perf_counter() - t)
            reg.close()
        r = dict(versions=n, groups=len(rows), first_query_s=round(first, 4),
                 query_median_ms=round(1000 * statistics.median(warm), 2),
                 page_median_ms=round(1000 * statistics.median(page), 2))
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("catalog")
    c.add_argument("--sizes", default="100,1000,10000")
    c.add_argument("--repeats", type=int, default=15)
    c.add_argument("--out", type=Path)
    i = sub.add_parser("ingest")
    i.add_argument("--adapters", type=int, default=1000)
    i.add_argument("--workers", default="1,2")
    i.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.what == "catalog":
        res = bench_catalog([int(s) for s in a.sizes.split(",")], a.repeats)
    else:
        res = bench_ingest(a.adapters, [int(w) for w in a.workers.split(",")])
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")


def bench_ingest(n: int, workers: list[int]) -> list[dict]:
    raise SystemExit("ingest benchmark: see below")


if __name__ == "__main__":
    main()
