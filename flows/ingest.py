"""The `ingest` flow: pipeline.ingest.ingest_sources with its per-adapter steps as Prefect tasks.

Retries cover fetching (hub hiccups). A rejected adapter is an outcome, not a failed task: the tasks return
the AdapterError instead of raising it. The spectra task is cached by content hash with a JSON result (the
blob's sha256), so a rerun of the same adapter does no SVD work and nothing is ever unpickled. Outcomes
are logged through the run logger, so they show in Prefect's UI.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from spectr.pipeline import ingest as pipeline_ingest
from spectr.pipeline.fetch import fetch
from spectr.pipeline.types import AdapterError, AdapterSource, BaseModelInfo, LoadedAdapter, failure_reason


@task(
    retries=3,
    retry_delay_seconds=[1, 2, 4],
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name="fetch {spec}",
)
def fetch_adapter(spec: str) -> AdapterSource | AdapterError:
    try:
        return fetch(spec)
    except AdapterError as exc:  # a rejection: no retry, not a failure
        return exc


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="validate {src.name}")
def validate_adapter(
    src: AdapterSource, base: BaseModelInfo, dense_base_dir: str | None = None, rank: int | None = None,
    config: dict | None = None, content_sha256: str | None = None,
) -> LoadedAdapter | AdapterError:
    try:
        return pipeline_ingest.validate(src, base, dense_base_dir, rank, config, content_sha256)
    except AdapterError as exc:
        return exc


def _spectra_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    adapter: LoadedAdapter = parameters["adapter"]
    return "spectr-spectra-{}-{}-{}-{}-{}".format(
        adapter.content_sha256,
        adapter.base.config_sha256[:16],
        parameters.get("method"),
        parameters.get("rank"),
        parameters.get("niter"),
    )


@task(
    cache_key_fn=_spectra_cache_key,
    persist_result=True,
    result_serializer="json",
    task_run_name="spectra {adapter.source.name}",
)
def compute_spectra(
    adapter: LoadedAdapter,
    blob_url: str,
    method: str = "exact",
    rank: int | None = None,
    niter: int = 4,
    device: str | None = None,
) -> dict:
    return pipeline_ingest.compute_and_write(adapter, blob_url, method, rank, niter, device)


def _fetch_all(specs: list[str]) -> list[AdapterSource | Exception]:
    futures = [fetch_adapter.submit(spec) for spec in specs]
    out: list[AdapterSource | Exception] = []
    for spec, future in zip(specs, futures):
        try:
            out.append(future.result())
        except Exception as exc:  # retries exhausted
            out.append(AdapterError(f"{spec}: fetch failed: {exc}"))
    return out


def _spectra(**args: Any) -> dict:
    from spectr.registry.blobs import BlobStore

    blob = compute_spectra(**args)
    if not BlobStore(args["blob_url"]).exists(blob["blob_sha256"]):  # a cached result whose blob was removed
        blob = compute_spectra.with_options(refresh_cache=True)(**args)
    return blob


STEPS = pipeline_ingest.Steps(fetch_all=_fetch_all, validate=validate_adapter, spectra=_spectra)


@flow(name="spectr-ingest", validate_parameters=True)
def ingest(
    sources: list[str],
    base_model: str | None = None,
    base_name: str | None = None,
    dense: bool = False,
    rank: int | None = None,
    niter: int = 4,
    device: str | None = None,
    registry_url: str | None = None,
    blob_url: str | None = None,
    spectra_only: bool = False,
) -> list[dict]:
    """Ingest adapter folders, globs and hub ids into the registry; returns one dict per source.

    The ingestion run records this flow run's id (lineage); each version keeps its adapter unless spectra_only."""
    from spectr.flows.lifetime import exit_with_parent

    exit_with_parent()  # a scheduled run in a runner's child process ends with the runner
    outcomes = pipeline_ingest.ingest_sources(
        sources, base_model=base_model, base_name=base_name, dense=dense, rank=rank, niter=niter, device=device,
        registry_url=registry_url, blob_url=blob_url, steps=STEPS, logger=get_run_logger(),
        spectra_only=spectra_only, flow_run_id=_flow_run_id(),
    )
    return [o.to_dict() for o in outcomes]


def _flow_run_id() -> str | None:
    """The Prefect flow run this ingest runs in, or None outside one."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


# -- distributed: batches of adapters (hash + validate + SVD + blob writes) as tasks on the flow's task runner --
class Batch:
    """Jobs for one task as one opaque value. Prefect walks dataclasses and lists in a task's parameters
    looking for futures, and Dask tokenizes them to name the task: both costs grew with every job's base
    model table. A plain object is a leaf to Prefect, and Dask takes its token from __dask_tokenize__.
    (prefect's quote() does not survive Dask: it arrives as a plain tuple.)"""

    def __init__(self, jobs: list[pipeline_ingest.Job]) -> None:
        self.jobs = jobs
        self.token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:
        return self.token


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="process {label}")
def process_batch(batch: Batch, label: str) -> dict[str, Any]:
    import torch

    from spectr.flows import dask_worker

    started = time.time()
    results = pipeline_ingest.compute_jobs(batch.jobs)
    return {"results": results, "worker": f"{socket.gethostname()}:{os.getpid()}", "started": started,
            "ended": time.time(), "warmed": dask_worker.WARMED_AT, "threads": torch.get_num_threads()}


MAX_BATCH = 32  # adapters per task at most
MIN_BATCH = 4  # ... and at least (but never more than there are)


def batch_sizes(n_jobs: int, workers: int | None) -> list[int]:
    """Adapters per task, in submission order: each task takes an even share of what is left spread over
    twice the workers, between MIN_BATCH and MAX_BATCH, so tasks shrink towards the end and the workers
    finish together (the last task is small), while the first ones are large: a task costs the flow's
    process about 0.1 s (2-core box: ~0.7 s) of Prefect's per-task work whatever its size."""
    spread, left, sizes = 2 * max(1, workers or 1), n_jobs, []
    while left > 0:
        size = min(left, max(MIN_BATCH, min(MAX_BATCH, -(-left // spread))))
        sizes.append(size)
        left -= size
    return sizes


def _compute_all(jobs: list[pipeline_ingest.Job], workers: int | None,
                 times: pipeline_ingest.DriverTimes) -> Iterator[list[tuple[int, Any]]]:
    from prefect.futures import as_completed

    batches, start = [], 0
    for size in batch_sizes(len(jobs), workers):
        batches.append(range(start, start + size))
        start += size
    # All batches are submitted at once, largest first: the runner hands them to its workers in this order.
    futures = {}
    for batch in batches:
        first, last = jobs[batch[0]], jobs[batch[-1]]
        label = f"{first.src.name}..{last.src.name}"
        futures[process_batch.submit(Batch([jobs[j] for j in batch]), label=label)] = batch
    times.mark("submitted")
    for future in as_completed(list(futures)):
        batch = futures[future]
        try:
            done = future.result()
            results = done["results"]
            times.batches.append({"n": len(batch), "worker": done["worker"], "started": done["started"],
                                  "ended": done["ended"], "returned": time.time(), "warmed": done.get("warmed"),
                                  "threads": done.get("threads")})
        except Exception as exc:  # a worker lost, a task crashed: that batch's adapters are rejected
            results = [AdapterError(f"{jobs[j].spec}: {failure_reason(exc)}") for j in batch]
        yield list(zip(batch, results))


def distributed_steps(workers: int | None = None) -> pipeline_ingest.Steps:
    # Fetching stays a plain loop in the flow's process: a task per local folder cost ~0.2 s of scheduling
    # and API calls each (measured: 1,000 fetch tasks alone took minutes on 2 cores), more than its work.
    return pipeline_ingest.Steps(compute_all=lambda jobs, times: _compute_all(jobs, workers, times))


@flow(name="spectr-ingest-distributed", validate_parameters=True)
def ingest_distributed(
    sources: list[str],
    base_model: str | None = None,
    base_name: str | None = None,
    dense: bool = False,
    rank: int | None = None,
    niter: int = 4,
    device: str | None = None,
    registry_url: str | None = None,
    blob_url: str | None = None,
    spectra_only: bool = False,
    workers: int | None = None,
) -> list[dict]:
    """As `ingest`, with batches of adapters as tasks on the flow's task runner (Dask: see dask_runner);
    this process alone writes the registry, each batch as it returns and each expert's versions in the
    sources' order, so versions match a plain run.
    workers sizes the batches (None: an existing cluster's, asked of the runner's client)."""
    _mark("body")
    if not workers:  # an existing cluster: its workers import what a batch needs now (a local one preloads)
        _warm_workers()
    outcomes = pipeline_ingest.ingest_sources(
        sources, base_model=base_model, base_name=base_name, dense=dense, rank=rank, niter=niter, device=device,
        registry_url=registry_url, blob_url=blob_url, steps=distributed_steps(workers or _cluster_workers()),
        logger=get_run_logger(), spectra_only=spectra_only, flow_run_id=_flow_run_id(),
    )
    _mark("body_end")
    return [o.to_dict() for o in outcomes]


# When the last ingest_on_dask call in this process reached each point of its start and end (time.time()):
# called, cluster_ready (a local cluster up: scheduler and workers registered), body (the flow's body began),
# body_end, returned (flow run finished, cluster closed). Benchmarks read it.
LAST_CALL_TIMES: dict[str, float] = {}


def _mark(point: str) -> None:
    LAST_CALL_TIMES.setdefault(point, time.time())


async def _warm_worker() -> None:
    """What a worker's first batch would import (torch, the validation, SVD and blob code, Prefect's task
    engine), done while the flow's process plans and submits: ~2-5 s per worker that otherwise came after.
    In a thread: the worker's event loop keeps answering its scheduler."""
    import asyncio

    from spectr.flows.dask_worker import warm_imports

    await asyncio.to_thread(warm_imports)


def _warm_workers() -> None:
    """_warm_worker on every worker of the existing Dask cluster this flow runs on, without waiting for it:
    from a thread, because even with wait=False the call returns only once every worker has unpickled the
    function, which imports this module and Prefect there (on the 16-core host, ~4.6 s of a run's start
    went there, read from its logs)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    client = getattr(getattr(ctx, "task_runner", None), "client", None)
    if client is None:  # not on a Dask runner: nothing to warm
        return

    def warm() -> None:
        try:
            client.run(_warm_worker, wait=False)
        except Exception:  # a cluster closing early, a worker lost: the batches import what they need anyway
            pass

    threading.Thread(target=warm, name="spectr-warm-workers", daemon=True).start()


def _cluster_workers() -> int | None:
    """Workers of the Dask cluster this flow runs on (an existing scheduler's), or None."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    try:
        return len(ctx.task_runner.client.scheduler_info().get("workers", {})) or None
    except Exception:  # not on a Dask runner
        return None


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """A local cluster of `workers` single-threaded processes (Dask sets each worker's OMP/MKL threads to 1,
    so 1 and N workers run the same threads per worker), each preloading flows/dask_worker.py."""
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "preload": ["spectr.flows.dask_worker"]}


class EarlyCluster:
    """A local Dask cluster started in a thread as soon as the ingest is called, while Prefect creates the
    flow run (and --base-model resolves, in its own thread): the workers spawn and import what a batch
    needs meanwhile. Prefect's DaskTaskRunner takes `take` as its `cluster_class` (a callable that returns the
    cluster) when the flow first submits, and closes it when the flow run ends; a flow that ends before
    asking for it (a Prefect error) leaves it to close_unused."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.cluster: Any = None
        self.error: BaseException | None = None
        self.taken = False
        self._ready = threading.Event()
        threading.Thread(target=self._start, name="spectr-local-cluster", daemon=True).start()

    def _start(self) -> None:
        try:
            from distributed import LocalCluster

            self.cluster = LocalCluster(**local_cluster_kwargs(self.workers))
            _mark("cluster_ready")
        except BaseException as exc:  # raised where the flow asks for the cluster
            self.error = exc
        finally:
            self._ready.set()

    def take(self, **_: Any) -> Any:
        self._ready.wait()
        if self.error is not None:
            raise self.error
        self.taken = True
        return self.cluster

    def __getstate__(self) -> dict[str, Any]:
        # Prefect sends the flow, its task runner included, with every task to the workers: there this is
        # an inert copy (the cluster lives in the process that started it).
        return {"workers": self.workers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.workers, self.cluster, self.taken = state["workers"], None, False
        self.error = RuntimeError("a local Dask cluster is started and used by the process that called the ingest")
        self._ready = threading.Event()
        self._ready.set()

    def close_unused(self) -> None:
        self._ready.wait()
        if self.cluster is not None and not self.taken:
            self.cluster.close()


def dask_runner(address: str | None = None, workers: int | None = None, early: EarlyCluster | None = None) -> Any:
    """Prefect's DaskTaskRunner on an existing scheduler (address, e.g. tcp://host:8786), on a local cluster
    already starting (early), or on a local cluster of `workers` single-threaded processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    if early is not None:
        return DaskTaskRunner(cluster_class=early.take)
    return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(workers or 1))


def _resolve_base_early(base_model: str | None, base_name: str | None) -> None:
    """Resolves --base-model (its module table: torch and transformers imported, 2-8 s) in a thread, while
    the cluster starts; the flow's own resolution then finds it cached (pipeline.basemodel). A failure
    here is ignored: the flow reports it."""
    def resolve() -> None:
        try:
            from spectr.pipeline.basemodel import resolve_base_model

            if base_model:
                resolve_base_model(base_model, name=base_name)
        except Exception:
            pass

    threading.Thread(target=resolve, name="spectr-base-early", daemon=True).start()


def ingest_on_dask(sources: list[str], address: str | None = None, workers: int | None = None,
                   **args: Any) -> list[dict]:
    from spectr.flows.lifetime import exit_with_parent, tied_temporary_server

    LAST_CALL_TIMES.clear()
    _mark("called")
    # A run that Prefect's runner (`spectr serve-flows`) started in a child process ends with the runner,
    # and its local Dask workers with it (they exit when the process that started them is gone).
    exit_with_parent()
    early = None if address else EarlyCluster(workers or 1)
    _resolve_base_early(args.get("base_model"), args.get("base_name"))
    try:
        with tied_temporary_server():  # no server configured: a temporary one that dies with this process
            return ingest_distributed.with_options(task_runner=dask_runner(address, workers, early))(
                sources=sources, workers=workers, **args)
    finally:
        if early is not None:
            early.close_unused()
        _mark("returned")
