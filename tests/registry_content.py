"""What a registry holds, comparable between runs: versions (no timestamps), run results in order, blob names."""
from __future__ import annotations

from pathlib import Path


def registry_content(home: Path, blobs: bool = True) -> dict:
    from spectr.registry import Registry

    with Registry(f"sqlite:///{home / 'registry.db'}", str(home / "blobs")) as reg:
        versions = [{k: v for k, v in d.items() if k != "created_at"} for d in reg.catalog()]
        runs = reg.engine.connect().exec_driver_sql("SELECT id FROM ingestion_runs ORDER BY started_at").scalars().all()
        results = [{k: r[k] for k in ("source", "name", "status", "version", "reason", "warnings")}
                   for run in runs for r in reg.get_run(run)["results"]]
    out = {"versions": versions, "results": results}
    if blobs:
        out["blobs"] = sorted(p.relative_to(home / "blobs").as_posix() for p in (home / "blobs").rglob("*")
                              if p.is_file())
    return out
