"""A scheduled deployment that re-scans configured sources: `spectr serve-flows --cron ...`."""
from __future__ import annotations

from datetime import timedelta

from spectr.flows.ingest import ingest


def serve_ingest(
    sources: list[str],
    *,
    cron: str | None = None,
    interval_seconds: float | None = None,
    base_model: str | None = None,
    name: str = "scheduled-ingest",
) -> None:
    """Register the deployment on the Prefect server at PREFECT_API_URL and run its schedule (blocks).

    Globs are kept as given, so each run picks up adapters added since the last one.
    """
    if (cron is None) == (interval_seconds is None):
        raise ValueError("give exactly one of cron or interval_seconds")
    ingest.serve(
        name=name,
        cron=cron,
        interval=timedelta(seconds=interval_seconds) if interval_seconds is not None else None,
        parameters={"sources": list(sources), "base_model": base_model},
        description="Re-scan the configured adapter sources and ingest what is new.",
        print_starting_message=True,
        limit=1,  # one re-scan at a time: a slow run (a loaded box) no longer piles up runs behind it
    )
