"""The distributed ingest's single writer stores results as batches come back, in any order, and still writes
the registry a plain run writes (an expert's versions in the sources' order). No Dask here: a compute_all
that runs compute_job in this process and hands the results back last batch first."""
from __future__ import annotations

import shutil

from spectr.pipeline import ingest as pipeline_ingest
from spectr.pipeline.ingest import Steps, compute_job, ingest_sources
from tests.registry_content import registry_content


def _reversed_batches(jobs, times, size=2):
    batches = [list(range(i, min(i + size, len(jobs)))) for i in range(0, len(jobs), size)]
    for batch in reversed(batches):  # the last batch returns first
        yield [(j, compute_job(jobs[j])) for j in batch]


def test_results_stored_in_any_order_write_what_a_plain_run_writes(tmp_path, make_adapter, tiny_base_dir):
    # Two sources named "twice" (different content, then the first's content again), a rejected one between.
    folders = []
    for i, (parent, name, seed) in enumerate([("a", "twice", 70), ("a", "one", 71), ("b", "twice", 72),
                                              ("c", "two", 73), ("d", "twice", 70)]):
        folder = tmp_path / "src" / parent / name
        shutil.copytree(make_adapter(f"order-{seed}", seed=seed), folder, dirs_exist_ok=True)
        folders.append(folder)
    broken = tmp_path / "src" / "e" / "broken"
    shutil.copytree(make_adapter("order-70", seed=70), broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    sources = [str(f) for f in folders[:2]] + [str(broken)] + [str(f) for f in folders[2:]]

    homes = {}
    for how, steps in (("plain", None), ("reversed", Steps(compute_all=_reversed_batches))):
        home = tmp_path / how
        kw = dict(base_model=str(tiny_base_dir), registry_url=f"sqlite:///{home / 'registry.db'}",
                  blob_url=str(home / "blobs"), steps=steps)
        outcomes = ingest_sources(sources, **kw)
        assert [(o.name, o.status, o.version) for o in outcomes] == [
            ("twice", "new", 1), ("one", "new", 1), ("broken", "rejected", None), ("twice", "new", 2),
            ("two", "new", 1), ("twice", "unchanged", 1)]
        homes[how] = registry_content(home, blobs=False)
    assert homes["reversed"] == homes["plain"]
    times = pipeline_ingest.LAST_DRIVER_TIMES  # the reversed run's: every batch came back and was stored
    assert {"planned", "first_result", "computed", "finished"} <= set(times.marks) and times.seconds["store"] > 0
