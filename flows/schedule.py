"""A scheduled deployment that re-scans configured sources: `spectr serve-flows --cron ...`."""
from __future__ import annotations

from datetime import timedelta

from prefect import flow

from spectr.flows.ingest import ingest, ingest_on_dask


@flow(name="spectr-ingest-on-dask")
def ingest_on_dask_flow(
    sources: list[str], base_model: str | None = None, dask_address: str | None = None, workers: int | None = None,
) -> list[dict]:
    """The scheduled ingest on Dask: the distributed flow as a subflow with a Dask task runner built here, at
    run time. A served flow run loads its flow from the entrypoint in a new process, so a task runner set
    with with_options() where `serve` was called would not reach it; parameters do."""
    return ingest_on_dask(list(sources), address=dask_address, workers=workers, base_model=base_model)


def serve_ingest(
    sources: list[str],
    *,
    cron: str | None = None,
    interval_seconds: float | None = None,
    base_model: str | None = None,
    name: str = "scheduled-ingest",
    dask_address: str | None = None,
    workers: int | None = None,
) -> None:
    """Register the deployment on the Prefect server at PREFECT_API_URL and run its schedule (blocks).

    Globs are kept as given, so each run picks up adapters added since the last one. dask_address (an
    existing scheduler) or workers (a local cluster started by each run) put each run's adapters on Dask.
    """
    if (cron is None) == (interval_seconds is None):
        raise ValueError("give exactly one of cron or interval_seconds")
    parameters: dict = {"sources": list(sources), "base_model": base_model}
    # One run at a time: a slow run (a loaded box) would otherwise overlap the next, and on Dask each run
    # starts its own cluster (--interval 5 piled up a dozen local clusters on the 2-core box).
    served = ingest
    if dask_address or workers:
        served = ingest_on_dask_flow
        parameters.update(dask_address=dask_address, workers=workers)
    served.serve(
        name=name,
        cron=cron,
        interval=timedelta(seconds=interval_seconds) if interval_seconds is not None else None,
        parameters=parameters,
        description="Re-scan the configured adapter sources and ingest what is new.",
        print_starting_message=True,
        limit=1,
    )
