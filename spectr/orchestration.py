"""Where an ingest runs: as the Prefect flow on a configured server, else the same pipeline in-process.

Without a server, Prefect would start a temporary one for every command (about 20 s on the shared 2-core
box) only to record runs nobody can look at; with one, every run and task run is recorded there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from spectr.registry.settings import spectr_home


def prefect_home() -> Path:
    """PREFECT_HOME, default $SPECTR_HOME/prefect (flows/__init__.py sets the same default for Prefect)."""
    return Path(os.environ.get("PREFECT_HOME") or spectr_home() / "prefect").expanduser()


def prefect_server_configured() -> bool:
    """PREFECT_API_URL in the environment or in the active Prefect profile (read without importing prefect)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    profiles = prefect_home() / "profiles.toml"
    if not profiles.is_file():
        return False
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: no TOML reader in the standard library
        return "PREFECT_API_URL" in profiles.read_text()
    data = tomllib.loads(profiles.read_text())
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return bool(data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"))


def require_dask() -> None:
    """ValueError (one line, what to install) when Prefect's Dask task runner is missing."""
    try:
        import prefect_dask  # noqa: F401
    except ImportError:
        raise ValueError("--dask/--workers need Prefect's Dask task runner: pip install 'spectr[dask]'") from None


def reach_scheduler(address: str) -> None:
    """ValueError (one line) when no Dask scheduler answers at address within Dask's own connect timeout
    (distributed.comm.timeouts.connect, e.g. DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s), so a wrong --dask
    fails before a flow run starts instead of inside it.

    One comm and an identity request, not a Client: a Client whose connect timed out stays half-open until the
    garbage collector closes it, and that close takes distributed's class-wide loop lock, so it deadlocked the
    next Client made in this process when the collection happened while that one held the lock."""
    import asyncio

    import dask
    from distributed.comm import connect, parse_address
    from distributed.comm.addressing import parse_host_port

    timeout = dask.config.get("distributed.comm.timeouts.connect")
    try:
        _, location = parse_address(address, strict=True)
        parse_host_port(location)
    except ValueError:
        raise ValueError(f"--dask {address!r} is not a Dask scheduler address; expected e.g. tcp://HOST:8786") from None

    async def identity() -> Any:
        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            await comm.close()

    try:
        info = asyncio.run(identity())
    except Exception as exc:  # refused, timed out, or something else answered with bytes dask cannot read
        raise ValueError(f"no Dask scheduler answered at {address} within {timeout} ({type(exc).__name__}): "
                         "start one (dask scheduler) or fix --dask") from None
    if not isinstance(info, dict) or info.get("type") != "Scheduler":
        kind = info.get("type") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"--dask {address}: a Dask {kind} answered there, not a scheduler; give the scheduler's "
                         "address (dask scheduler prints it)")


def run_ingest(sources: list[str], on_outcome: Callable[[Any], None] | None = None, *,
               dask_address: str | None = None, workers: int | None = None, **args: Any) -> list[Any]:
    """Ingest through the flow (a server is configured) or directly; returns pipeline.ingest.Outcome objects.

    dask_address (an existing Dask scheduler) or workers (a local Dask cluster) run the distributed flow on
    Prefect's Dask task runner (Prefect starts a temporary server for it when none is configured).
    on_outcome sees each outcome as it is decided in-process, or all of them when the flow run returns.
    """
    from spectr.pipeline.ingest import Outcome, ingest_sources

    if dask_address or workers:
        require_dask()
        from spectr.flows.ingest import ingest_on_dask

        dicts = ingest_on_dask(list(sources), address=dask_address, workers=workers, **args)
    elif not prefect_server_configured():
        return ingest_sources(list(sources), on_outcome=on_outcome, **args)
    else:
        from spectr.flows.ingest import ingest as ingest_flow

        dicts = ingest_flow(sources=list(sources), **args)
    outcomes = [Outcome(**o) for o in dicts]
    for o in outcomes:
        if on_outcome is not None:
            on_outcome(o)
    return outcomes
