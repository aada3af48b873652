"""The `ingest` flow: fetch -> validate -> spectra -> store, one set of tasks per adapter.

Retries cover fetching (hub hiccups); a rejected adapter is an outcome, not a task failure. The
spectra task is cached by content hash with a JSON result (the blob's sha256), so a rerun of the
same adapter does no SVD work and nothing is ever unpickled.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from spectr.pipeline.basemodel import base_model_from_config, resolve_base_model
from spectr.pipeline.fetch import expand_sources, fetch
from spectr.pipeline.spectra import adapter_spectra
from spectr.pipeline.persist import SpectraBlob, store_version, write_adapter_blobs, write_spectra_blob
from spectr.pipeline.types import AdapterError, AdapterSource, BaseModelInfo, LoadedAdapter
from spectr.pipeline.validate import load_adapter, read_adapter_config
from spectr.registry.store import Registry


@dataclass
class Outcome:
    """One line of an ingest report."""

    source: str
    status: str  # "new", "unchanged" or "rejected"
    name: str | None = None
    version: int | None = None
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.status != "rejected"


# Listeners called with each Outcome as it happens (the CLI's progress display).
listeners: list[Callable[[Outcome], None]] = []


def _retry_unless_rejected(task, task_run, state) -> bool:
    return not isinstance(getattr(state, "data", None), AdapterError)


@task(
    retries=3,
    retry_delay_seconds=[1, 2, 4],
    retry_condition_fn=_retry_unless_rejected,
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name="fetch {spec}",
)
def fetch_adapter(spec: str) -> AdapterSource:
    return fetch(spec)


class BaseResolver:
    """Finds each adapter's base model: --base-model if given, else the registry, else the HF cache."""

    def __init__(self, registry: Registry, base_model: str | None, base_name: str | None) -> None:
        self.registry = registry
        self.fixed = resolve_base_model(base_model, name=base_name) if base_model else None
        self._by_name: dict[str, BaseModelInfo] = {}

    def __call__(self, folder: Path) -> BaseModelInfo:
        if self.fixed is not None:
            return self.fixed
        wanted = read_adapter_config(folder).get("base_model_name_or_path")
        if not wanted:
            raise AdapterError(
                f"{folder / 'adapter_config.json'}: no base_model_name_or_path; pass --base-model"
            )
        if wanted not in self._by_name:
            stored = self.registry.base_model_config(wanted)
            if stored is not None:
                name, config = stored
                self._by_name[wanted] = base_model_from_config(config, name)
            else:
                try:
                    self._by_name[wanted] = resolve_base_model(wanted)
                except AdapterError as exc:
                    raise AdapterError(
                        f"{folder}: base model {wanted!r} is neither registered nor in the local "
                        f"Hugging Face cache ({exc}); pass --base-model PATH or run `spectr base add`"
                    ) from None
        return self._by_name[wanted]


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="validate {src.name}")
def validate_adapter(
    src: AdapterSource, base: BaseModelInfo, dense_base_dir: str | None = None, rank: int | None = None
) -> LoadedAdapter:
    if dense_base_dir is not None:
        from spectr.pipeline.dense import load_dense

        if rank is None:
            raise AdapterError(f"{src.path}: a dense expert needs a target rank (--rank)")
        return load_dense(src, Path(dense_base_dir), base, rank=rank)
    return load_adapter(src, base)


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
    from spectr.registry.blobs import BlobStore

    spectra = adapter_spectra(adapter, method=method, rank=rank, niter=niter, device=device)
    return write_spectra_blob(BlobStore(blob_url), adapter, spectra).to_dict()


def _method_for(adapter: LoadedAdapter, rank: int | None) -> str:
    if adapter.dense_deltas or (rank is not None and rank < adapter.rank):
        return "randomized"
    return "exact"


def ingest_one(
    registry: Registry,
    spec: str,
    src: AdapterSource | Exception,
    resolve_base: BaseResolver,
    *,
    dense: bool = False,
    rank: int | None = None,
    niter: int = 4,
    device: str | None = None,
    run_id: str | None = None,
    spectra_only: bool = False,
) -> Outcome:
    """Validate, compute and store one fetched adapter; every failure becomes a rejected Outcome."""
    seconds: dict[str, float] = {}
    name = None
    try:
        if isinstance(src, Exception):
            raise src
        name = src.name
        t0 = time.perf_counter()
        base = resolve_base(src.path)
        dense_dir = str(base.path) if dense and base.path else None
        if dense and dense_dir is None:
            raise AdapterError(f"{src.path}: --dense needs --base-model PATH (a folder with the base weights)")
        adapter = validate_adapter(src, base, dense_dir, rank)
        seconds["validate"] = time.perf_counter() - t0
        existing = registry.find_version(src.name, adapter.content_sha256)
        if existing is not None and registry.blobs.exists(existing.blob_sha256):
            if not (spectra_only or adapter.dense_deltas or existing.files):  # kept only spectra before: keep now
                kept = write_adapter_blobs(registry.blobs, src.path, adapter.content_sha256)
                registry.keep_files(existing.name, existing.version, kept)
            return Outcome(spec, "unchanged", src.name, existing.version, warnings=adapter.warnings, seconds=seconds)
        # Dense experts have no adapter files to keep: their spectra are the record.
        keep = not (spectra_only or adapter.dense_deltas)
        files = write_adapter_blobs(registry.blobs, src.path, adapter.content_sha256) if keep else {}
        t0 = time.perf_counter()
        method = _method_for(adapter, rank)
        args = dict(adapter=adapter, blob_url=registry.blobs.url, method=method, rank=rank, niter=niter, device=device)
        blob = SpectraBlob(**compute_spectra(**args))
        if not registry.blobs.exists(blob.blob_sha256):  # cached result but the blob was removed since
            blob = SpectraBlob(**compute_spectra.with_options(refresh_cache=True)(**args))
        seconds["spectra"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        info, created = store_version(registry, adapter, blob, run_id, files)
        seconds["store"] = time.perf_counter() - t0
        status = "new" if created else "unchanged"
        return Outcome(spec, status, info.name, info.version, warnings=adapter.warnings, seconds=seconds)
    except AdapterError as exc:
        return Outcome(spec, "rejected", name, reason=str(exc), seconds=seconds)
    except Exception as exc:  # a bug or an I/O error must not hide the other adapters' outcomes
        return Outcome(spec, "rejected", name, reason=f"{type(exc).__name__}: {exc}", seconds=seconds)


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

    Each version keeps its original adapter files (for `spectr export`) unless spectra_only."""
    registry = Registry(registry_url, blob_url)
    params = dict(base_model=base_model, dense=dense, rank=rank, niter=niter, device=device, spectra_only=spectra_only)
    flow_run_id = _flow_run_id()
    try:
        specs = expand_sources(sources)
    except AdapterError as exc:
        specs, bad = [], Outcome(" ".join(sources), "rejected", reason=str(exc))
        run_id = registry.start_run(list(sources), params, flow_run_id)
        registry.record_result(run_id, source=bad.source, name=None, status=bad.status, reason=bad.reason)
        registry.finish_run(run_id, "failed")
        _emit(bad)
        return [asdict(bad)]
    run_id = registry.start_run(specs, params, flow_run_id)
    fetched = [fetch_adapter.submit(spec) for spec in specs]
    resolve_base = BaseResolver(registry, base_model, base_name)
    outcomes = []
    for spec, future in zip(specs, fetched):
        try:
            src: AdapterSource | Exception = future.result()
        except Exception as exc:
            src = exc if isinstance(exc, AdapterError) else AdapterError(f"{spec}: fetch failed: {exc}")
        outcome = ingest_one(
            registry, spec, src, resolve_base, dense=dense, rank=rank, niter=niter, device=device, run_id=run_id,
            spectra_only=spectra_only,
        )
        registry.record_result(
            run_id,
            source=spec,
            name=outcome.name,
            status=outcome.status,
            version=outcome.version,
            reason=outcome.reason,
            warnings=outcome.warnings,
        )
        _emit(outcome)
        outcomes.append(outcome)
    registry.finish_run(run_id, "completed" if all(o.accepted for o in outcomes) else "completed_with_rejections")
    return [asdict(o) for o in outcomes]


def _flow_run_id() -> str | None:
    """The Prefect flow run this ingest runs in (lineage), or None when called outside one."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


def _emit(outcome: Outcome) -> None:
    for listener in list(listeners):
        listener(outcome)
