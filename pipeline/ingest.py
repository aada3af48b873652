"""Ingest: sources -> one Outcome per adapter, recorded as one ingestion run in the registry.

Plain functions, no Prefect: the CLI runs `ingest_sources` directly, and flows/ingest.py runs the very same
function with its steps as Prefect tasks (retries, a result cache, runs recorded on a server). An adapter
whose content is already registered is recognised from its files' hash alone, before torch is imported.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from spectr.digest import config_sha256
from spectr.pipeline.fetch import expand_sources, fetch, locate_base_config
from spectr.pipeline.files import adapter_content_sha256, read_adapter_config, read_json_object, weights_file
from spectr.pipeline.types import AdapterError, AdapterSource, BaseModelInfo, LoadedAdapter, failure_reason
from spectr.registry.store import Registry

log = logging.getLogger(__name__)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def method_for(adapter: LoadedAdapter, rank: int | None) -> str:
    """The SVD method: exact through the factors, randomized for dense deltas or a truncation below r."""
    if adapter.dense_deltas or (rank is not None and rank < adapter.rank):
        return "randomized"
    return "exact"


def validate(
    src: AdapterSource, base: BaseModelInfo, dense_base_dir: str | None = None, rank: int | None = None,
    config: dict | None = None, content_sha256: str | None = None,
) -> LoadedAdapter:
    """Check an adapter against its base and load its factors (or a dense fine-tune's deltas)."""
    if dense_base_dir is not None:
        from spectr.pipeline.dense import load_dense

        if rank is None:
            raise AdapterError(f"{src.path}: a dense expert needs a target rank (--rank)")
        return load_dense(src, Path(dense_base_dir), base, rank=rank)
    from spectr.pipeline.validate import load_adapter

    return load_adapter(src, base, config=config, content_sha256=content_sha256)


def compute_and_write(
    adapter: LoadedAdapter, blob_url: str, method: str = "exact", rank: int | None = None, niter: int = 4,
    device: str | None = None,
) -> dict:
    """The SVD stage, then the blob written (content-addressed); returns the SpectraBlob as a dict."""
    from spectr.pipeline import spectra
    from spectr.pipeline.persist import write_spectra_blob
    from spectr.registry.blobs import BlobStore

    result = spectra.adapter_spectra(adapter, method=method, rank=rank, niter=niter, device=device)
    return write_spectra_blob(BlobStore(blob_url), adapter, result).to_dict()


def _fetch_each(specs: list[str]) -> list[AdapterSource | Exception]:
    out: list[AdapterSource | Exception] = []
    for spec in specs:
        try:
            out.append(fetch(spec))
        except AdapterError as exc:
            out.append(exc)
    return out


@dataclass
class Steps:
    """How the per-adapter steps run: plainly, or as Prefect tasks (flows/ingest.py). A step may return an
    AdapterError instead of raising it (a Prefect task does, so that a rejection is not a failed task)."""

    fetch_all: Callable[[list[str]], list[Any]] = _fetch_each
    validate: Callable[..., Any] = validate
    spectra: Callable[..., dict] = compute_and_write
    # Set for distributed runs (flows/ingest.py on Dask): runs every Job's compute_job, in any order or
    # place, and yields lists of (job index, result) pairs as results come back (a returned batch each), in
    # any order; it may note its batches in the DriverTimes. Registry writes stay in this process.
    compute_all: Callable[[list["Job"], "DriverTimes"], Iterable[list[tuple[int, Any]]]] | None = None


@dataclass
class DriverTimes:
    """Where a distributed ingest's driver (the one process that writes the registry) spent its time, and
    when each batch ran on which worker: logged at the end of the run, kept in LAST_DRIVER_TIMES for
    benchmarks. Times are time.time() (comparable across the processes of one host)."""

    started: float = field(default_factory=time.time)
    marks: dict[str, float] = field(default_factory=dict)  # phase -> when it ended
    seconds: dict[str, float] = field(default_factory=dict)  # activity -> seconds spent in it (summed)
    batches: list[dict] = field(default_factory=list)  # per batch: n, worker, started, ended, returned, warmed,
    # threads (warmed: when its worker had its imports done; threads: torch threads there)

    def mark(self, phase: str) -> None:
        self.marks.setdefault(phase, time.time())

    def add(self, activity: str, since: float) -> None:
        self.seconds[activity] = self.seconds.get(activity, 0.0) + time.perf_counter() - since

    def summary(self) -> dict[str, Any]:
        rel = {k: round(v - self.started, 3) for k, v in self.marks.items()}
        out: dict[str, Any] = {"marks_s": rel, "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
        if self.batches:
            workers: dict[Any, list[dict]] = {}
            for b in self.batches:
                workers.setdefault(b["worker"], []).append(b)
            first, last = min(b["started"] for b in self.batches), max(b["ended"] for b in self.batches)
            busy = {w: sum(b["ended"] - b["started"] for b in bs) for w, bs in workers.items()}
            warmed = [next((b["warmed"] for b in bs if b.get("warmed") is not None), None) for bs in workers.values()]
            out["workers"] = {
                "n": len(workers), "tasks": len(self.batches),
                "first_task_started_s": round(first - self.started, 3),
                "last_task_ended_s": round(last - self.started, 3),
                "first_start_per_worker_s": sorted(round(min(b["started"] for b in bs) - self.started, 2)
                                                   for bs in workers.values()),
                "last_end_per_worker_s": sorted(round(max(b["ended"] for b in bs) - self.started, 2)
                                                for bs in workers.values()),
                # when each worker had imported what a batch needs (a preloaded local worker; left out: not done
                # when its batches ended, or not preloaded)
                "imports_done_per_worker_s": sorted(round(w - self.started, 2) for w in warmed if w is not None),
                "torch_threads_per_worker": sorted({b.get("threads") for b in self.batches} - {None}),
                "busy_s": round(sum(busy.values()), 2),
                # each worker's idle time between the first task's start anywhere and the last task's end
                "idle_s": round(sum(last - first - v for v in busy.values()), 2),
            }
        return out


LAST_DRIVER_TIMES: DriverTimes | None = None


def _value(result: Any) -> Any:
    if isinstance(result, Exception):
        raise result
    return result


class BaseResolver:
    """Finds each adapter's base model: --base-model if given, else the registry, else the HF cache.

    Lazy: building a base model's module table needs transformers, which unchanged adapters never need.
    """

    def __init__(self, registry: Registry, base_model: str | None, base_name: str | None) -> None:
        self.registry = registry
        self.spec, self.name = base_model, base_name
        self.fixed_config = None
        if base_model:  # a mistake here fails before anything is recorded
            self.fixed_config = read_json_object(locate_base_config(base_model), "base model config.json")
        self._fixed: BaseModelInfo | None = None
        self._by_name: dict[str, BaseModelInfo] = {}

    def same_base(self, registered: str) -> bool:
        """Is `registered` (a base already in the registry) the base this run would use?"""
        if self.fixed_config is None:
            return True  # the adapter names its base, which resolved to the registered one before
        stored = self.registry.base_model_config(registered)
        return stored is not None and config_sha256(stored[1]) == config_sha256(self.fixed_config)

    def __call__(self, folder: Path, config: dict | None = None) -> BaseModelInfo:
        from spectr.pipeline.basemodel import base_model_from_config, resolve_base_model

        if self.spec:
            if self._fixed is None:
                self._fixed = resolve_base_model(self.spec, name=self.name)
            return self._fixed
        wanted = (config if config is not None else read_adapter_config(folder)).get("base_model_name_or_path")
        if not wanted:
            raise AdapterError(f"{folder / 'adapter_config.json'}: no base_model_name_or_path; pass --base-model")
        if wanted not in self._by_name:
            stored = self.registry.base_model_config(wanted)
            if stored is not None:
                name, cfg = stored
                self._by_name[wanted] = base_model_from_config(cfg, name)
            else:
                try:
                    self._by_name[wanted] = resolve_base_model(wanted)
                except AdapterError as exc:
                    raise AdapterError(
                        f"{folder}: base model {wanted!r} is neither registered nor in the local "
                        f"Hugging Face cache ({exc}); pass --base-model PATH or run `spectr base add`"
                    ) from None
        return self._by_name[wanted]


# Weights up to this size are hashed before the base model is known (an unchanged adapter never needs it);
# a bigger file is first compared with the largest LoRA its base can hold, so a sparse file whose header
# claims gigabytes is refused before its bytes are read (the hash would read them all).
LAZY_WEIGHT_BYTES = 64 << 20


def max_lora_bytes(base: BaseModelInfo) -> int:
    """The most bytes a LoRA adapter of `base` can need: every linear module at full rank min(in, out), both
    factors in float64, plus the largest header allowed."""
    from spectr.pipeline.validate import MAX_HEADER_BYTES

    factors = sum(min(s.in_features, s.out_features) * (s.in_features + s.out_features) for s in base.modules.values())
    return 8 * factors + 8 + MAX_HEADER_BYTES


def _bounded_weights(folder: Path, config: dict,
                     resolve_base: Callable[[Path, dict], BaseModelInfo]) -> None:
    file = weights_file(folder)
    size = file.stat().st_size
    if size <= LAZY_WEIGHT_BYTES:
        return
    base = resolve_base(folder, config)
    most = max_lora_bytes(base)
    if size > most:
        raise AdapterError(f"{file}: {size} bytes, more than any LoRA adapter of base {base.name} can hold "
                           f"({most} bytes at full rank in float64); refused unread")


def _unchanged(registry: Registry, spec: str, src: AdapterSource, sha: str, resolve_base: BaseResolver, *,
               spectra_only: bool) -> Outcome | None:
    """The "unchanged" Outcome when a stored version has this content hash, its spectra blob and the base this
    run would use (no torch needed); its adapter files are kept now if it lacks them. None otherwise."""
    found = registry.find_version(src.name, sha)
    if found is None or not registry.blobs.exists(found.blob_sha256) or not resolve_base.same_base(found.base_model):
        return None
    if not (spectra_only or found.files):
        _keep_files(registry, found, src.path)
    warnings = registry.recorded_warnings(found.name, found.version) or []
    return Outcome(spec, "unchanged", found.name, found.version, warnings=warnings)


def _known_or_base(
    registry: Registry, spec: str, src: AdapterSource, resolve_base: BaseResolver, *, dense: bool, spectra_only: bool
) -> Outcome | tuple[dict | None, str | None, BaseModelInfo, str | None]:
    """The cheap first step of the in-process path: an "unchanged" Outcome when the files' hash finds a stored
    version, else (config, content hash, base model, dense base folder) for the next steps, so the config
    is read once."""
    config = sha = None
    if not dense:
        config = read_adapter_config(src.path)
        _bounded_weights(src.path, config, resolve_base)
        sha = adapter_content_sha256(src.path, config)
        known = _unchanged(registry, spec, src, sha, resolve_base, spectra_only=spectra_only)
        if known is not None:
            return known
    base, dense_dir = _base_for(src, config, resolve_base, dense)
    return config, sha, base, dense_dir


def _base_for(src: AdapterSource, config: dict | None, resolve_base: BaseResolver,
              dense: bool) -> tuple[BaseModelInfo, str | None]:
    base = resolve_base(src.path, config)
    dense_dir = str(base.path) if dense and base.path else None
    if dense and dense_dir is None:
        raise AdapterError(f"{src.path}: --dense needs --base-model PATH (a folder with the base weights)")
    return base, dense_dir


def ingest_one(
    registry: Registry,
    spec: str,
    src: AdapterSource | Exception,
    resolve_base: BaseResolver,
    steps: Steps,
    *,
    dense: bool = False,
    rank: int | None = None,
    niter: int = 4,
    device: str | None = None,
    run_id: str | None = None,
    spectra_only: bool = False,
) -> Outcome:
    """Validate, compute and store one fetched adapter; every failure becomes a rejected Outcome.

    The version keeps the adapter's original files (blobs beside the spectra) unless spectra_only; an
    unchanged version that lacks them (ingested spectra-only before) gets them now."""
    seconds: dict[str, float] = {}
    name = None
    try:
        src = _value(src)
        name = src.name
        t0 = time.perf_counter()
        known = _known_or_base(registry, spec, src, resolve_base, dense=dense, spectra_only=spectra_only)
        if isinstance(known, Outcome):
            seconds["hash"] = time.perf_counter() - t0
            known.seconds = seconds
            return known
        config, sha, base, dense_dir = known
        adapter: LoadedAdapter = _value(steps.validate(src, base, dense_dir, rank, config, sha))
        seconds["validate"] = time.perf_counter() - t0
        existing = registry.find_version(src.name, adapter.content_sha256)
        if existing is not None and registry.blobs.exists(existing.blob_sha256):
            if not (spectra_only or adapter.dense_deltas or existing.files):
                _keep_files(registry, existing, src.path)
            return Outcome(spec, "unchanged", src.name, existing.version, warnings=adapter.warnings, seconds=seconds)
        from spectr.pipeline.persist import SpectraBlob, store_version, write_adapter_blobs

        # Dense experts have no adapter files to keep: their spectra are the record.
        keep = not (spectra_only or adapter.dense_deltas)
        t0 = time.perf_counter()
        blob = SpectraBlob(**steps.spectra(adapter=adapter, blob_url=registry.blobs.url,
                                           method=method_for(adapter, rank), rank=rank, niter=niter, device=device))
        seconds["spectra"] = time.perf_counter() - t0
        # The adapter's own files only once its spectra exist: a failed SVD (out of memory) leaves no blob.
        files = write_adapter_blobs(registry.blobs, src.path, adapter.content_sha256) if keep else {}
        t0 = time.perf_counter()
        info, created = store_version(registry, adapter, blob, run_id, files)
        seconds["store"] = time.perf_counter() - t0
        status = "new" if created else "unchanged"
        return Outcome(spec, status, info.name, info.version, warnings=adapter.warnings, seconds=seconds)
    except AdapterError as exc:
        return Outcome(spec, "rejected", name, reason=str(exc), seconds=seconds)
    except Exception as exc:  # a bug or an I/O error must not hide the other adapters' outcomes
        log.debug("ingest of %s failed", spec, exc_info=True)
        return Outcome(spec, "rejected", name, reason=failure_reason(exc), seconds=seconds)


def _keep_files(registry: Registry, version: Any, folder: Path) -> None:
    from spectr.pipeline.persist import write_adapter_blobs

    kept = write_adapter_blobs(registry.blobs, folder, version.content_sha256)
    registry.keep_files(version.name, version.version, kept)


@dataclass
class Job:
    """One adapter's work, shipped to a worker: paths and small metadata, no tensors, no registry connection.

    content_sha256 is None when the worker is to hash the files itself (the distributed path: hashing
    4.9 MB per adapter on the driver would serialise it); known holds the content hashes already stored
    under this name, so a worker that finds one skips the SVD and reports the hash (the driver decides)."""

    spec: str
    src: AdapterSource
    base: BaseModelInfo
    blob_url: str
    dense_dir: str | None = None
    rank: int | None = None
    niter: int = 4
    device: str | None = None
    config: dict | None = None
    content_sha256: str | None = None
    known: frozenset[str] = frozenset()
    keep_files: bool = True  # False with --spectra-only


@dataclass
class Computed:
    """What a worker sends back: the adapter without its factors (the registry stores metadata only), the
    written spectra blob's description and the adapter files it kept as blobs (filename -> (sha256, size))."""

    adapter: LoadedAdapter
    blob: dict
    files: dict[str, tuple[str, int]]
    seconds: dict[str, float]


@dataclass
class Known:
    """A worker's answer for an adapter whose content hash is already stored under its name: no SVD done."""

    content_sha256: str
    seconds: dict[str, float]


def compute_job(job: Job) -> Computed | Known | AdapterError:
    """Hash, validate, SVD, and write the spectra and adapter-file blobs (content-addressed, so workers racing
    on one blob are harmless); every failure is returned, not raised: one adapter's rejection."""
    from spectr.pipeline.persist import write_adapter_blobs
    from spectr.registry.blobs import BlobStore

    seconds: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        sha = job.content_sha256
        if sha is None and job.dense_dir is None:
            _bounded_weights(job.src.path, job.config, lambda folder, config: job.base)
            sha = adapter_content_sha256(job.src.path, job.config)
            if sha in job.known:
                return Known(sha, {"hash": time.perf_counter() - t0})
        adapter = validate(job.src, job.base, job.dense_dir, job.rank, job.config, sha)
        seconds["validate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        blob = compute_and_write(adapter, job.blob_url, method_for(adapter, job.rank), job.rank, job.niter,
                                 job.device)
        seconds["spectra"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        keep = job.keep_files and not adapter.dense_deltas  # as ingest_one: dense experts keep no files
        files = write_adapter_blobs(BlobStore(job.blob_url), job.src.path, adapter.content_sha256) if keep else {}
        seconds["files"] = time.perf_counter() - t0
    except AdapterError as exc:
        return exc
    except Exception as exc:  # a bug or an I/O error on a worker: this adapter's rejection, not the run's end
        return AdapterError(f"{job.spec}: {failure_reason(exc)}")
    light = dataclasses.replace(adapter, modules=dict.fromkeys(adapter.modules),
                                dense_deltas=dict.fromkeys(adapter.dense_deltas))
    return Computed(light, blob, files, seconds)


def compute_jobs(jobs: list[Job]) -> list[Computed | Known | AdapterError]:
    """compute_job over a batch (one task on a worker: the per-task scheduling cost is paid once per batch)."""
    return [compute_job(job) for job in jobs]


def _plan(registry: Registry, spec: str, src: AdapterSource | Exception, resolve_base: BaseResolver,
          known: dict[str, set[str]], *, dense: bool, rank: int | None, niter: int, device: str | None,
          spectra_only: bool) -> Outcome | Job:
    """The cheap part on the driver (no hashing, no tensors): an Outcome already (rejected), else a Job."""
    name = None
    try:
        src = _value(src)
        name = src.name
        config = None if dense else read_adapter_config(src.path)
        base, dense_dir = _base_for(src, config, resolve_base, dense)
        return Job(spec, src, base, registry.blobs.url, dense_dir, rank, niter, device, config, None,
                   frozenset(known.get(src.name, ())), keep_files=not spectra_only)
    except AdapterError as exc:
        return Outcome(spec, "rejected", name, reason=str(exc))
    except Exception as exc:
        log.debug("ingest of %s failed", spec, exc_info=True)
        return Outcome(spec, "rejected", name, reason=failure_reason(exc))


def _store(registry: Registry, job: Job, result: Any, run_id: str | None, spectra_only: bool) -> Outcome:
    """The registry write for one computed adapter, on the driver (one writer, versions in input order)."""
    from spectr.pipeline.persist import SpectraBlob, store_version

    name = job.src.name
    try:
        if isinstance(result, Exception):
            raise result
        adapter, seconds = dataclasses.replace(result.adapter, base=job.base), dict(result.seconds)
        existing = registry.find_version(name, adapter.content_sha256)
        if existing is not None and registry.blobs.exists(existing.blob_sha256):
            if not (spectra_only or adapter.dense_deltas or existing.files):
                _keep_files(registry, existing, job.src.path)
            return Outcome(job.spec, "unchanged", name, existing.version, warnings=adapter.warnings, seconds=seconds)
        t0 = time.perf_counter()
        info, created = store_version(registry, adapter, SpectraBlob(**result.blob), run_id, result.files)
        seconds["store"] = time.perf_counter() - t0
        return Outcome(job.spec, "new" if created else "unchanged", info.name, info.version,
                       warnings=adapter.warnings, seconds=seconds)
    except AdapterError as exc:
        return Outcome(job.spec, "rejected", name, reason=str(exc))
    except Exception as exc:
        log.debug("ingest of %s failed", job.spec, exc_info=True)
        return Outcome(job.spec, "rejected", name, reason=failure_reason(exc))


def _store_many(registry: Registry, items: list[tuple[Job, Any]], run_id: str | None,
                spectra_only: bool) -> list[Outcome]:
    """_store for consecutive results, the new versions among them in one transaction (one commit); where
    that transaction fails (one adapter's name taken by another base, ...) each is stored on its own, as
    _store would, so one adapter's rejection stays its own."""
    from spectr.pipeline.persist import SpectraBlob, store_versions

    out: dict[int, Outcome] = {}
    new: list[tuple[int, Job, LoadedAdapter, Computed]] = []
    for k, (job, result) in enumerate(items):
        if not isinstance(result, Computed):
            out[k] = _store(registry, job, result, run_id, spectra_only)
            continue
        adapter = dataclasses.replace(result.adapter, base=job.base)
        try:
            stored_before = registry.find_version(job.src.name, adapter.content_sha256) is not None
        except Exception:  # _store meets the same error and makes it this adapter's rejection
            stored_before = True
        if stored_before:  # the one-at-a-time path decides: unchanged, its files kept
            out[k] = _store(registry, job, result, run_id, spectra_only)
        else:
            new.append((k, job, adapter, result))
    if new:
        t0 = time.perf_counter()
        try:
            stored = store_versions(registry, [(adapter, SpectraBlob(**result.blob), run_id, result.files)
                                               for _, _, adapter, result in new])
        except Exception:
            log.debug("storing %d versions at once failed; one at a time", len(new), exc_info=True)
            for k, job, _, result in new:
                out[k] = _store(registry, job, result, run_id, spectra_only)
        else:
            each = (time.perf_counter() - t0) / len(new)
            for (k, job, adapter, result), (info, created) in zip(new, stored):
                out[k] = Outcome(job.spec, "new" if created else "unchanged", info.name, info.version,
                                 warnings=adapter.warnings, seconds={**result.seconds, "store": each})
    return [out[k] for k in range(len(items))]


def _ingest_distributed(registry: Registry, specs: list[str], sources: list[Any], resolve_base: BaseResolver,
                        steps: Steps, run_id: str, times: DriverTimes, *, dense: bool, rank: int | None,
                        niter: int, device: str | None, spectra_only: bool = False) -> Iterator[list[Outcome]]:
    """Outcomes in the sources' order, in runs of consecutive ones. Each adapter is stored as soon as its
    result is back and every earlier source of the same name is stored, so versions are numbered as a plain
    run numbers them while storing overlaps the workers' computing, whichever batch returns first."""
    t0 = time.perf_counter()
    known = {} if dense else registry.content_hashes(
        [s.name for s in sources if not isinstance(s, Exception)])
    planned = [_plan(registry, spec, src, resolve_base, known, dense=dense, rank=rank, niter=niter, device=device,
                     spectra_only=spectra_only) for spec, src in zip(specs, sources)]
    times.add("plan", t0)
    times.mark("planned")
    jobs: list[Job] = []
    at: list[int] = []  # job index -> index in planned
    pending: dict[str, deque[int]] = {}  # name -> its jobs' planned indices not stored yet, in order
    decided: dict[int, Outcome] = {}
    for i, p in enumerate(planned):
        if isinstance(p, Outcome):
            decided[i] = p
        else:
            at.append(i)
            jobs.append(p)
            pending.setdefault(p.src.name, deque()).append(i)

    def unchanged(i: int, result: Known) -> Outcome:
        p = planned[i]
        outcome = _unchanged(registry, p.spec, p.src, result.content_sha256, resolve_base, spectra_only=spectra_only)
        if outcome is None:  # its blob went missing, or another base: the plain path recomputes it
            outcome = ingest_one(registry, p.spec, p.src, resolve_base, steps, dense=dense, rank=rank,
                                 niter=niter, device=device, run_id=run_id, spectra_only=spectra_only)
        outcome.seconds = dict(result.seconds)
        return outcome

    def decide(ready: list[int]) -> None:
        """Store these results, in this order: runs of computed ones in one transaction each."""
        t0 = time.perf_counter()
        run: list[int] = []
        for i in [*ready, None]:
            if i is not None and not isinstance(waiting[i], Known):
                run.append(i)
                continue
            if run:
                for k, outcome in zip(run, _store_many(registry, [(planned[k], waiting.pop(k)) for k in run],
                                                       run_id, spectra_only)):
                    decided[k] = outcome
                run = []
            if i is not None:
                decided[i] = unchanged(i, waiting.pop(i))
        times.add("store", t0)

    waiting: dict[int, Any] = {}
    done = 0
    results = iter(steps.compute_all(jobs, times) if jobs else [])
    while True:
        t0 = time.perf_counter()
        chunk = next(results, None)
        times.add("wait", t0)
        if chunk is None:
            break
        times.mark("first_result")
        ready = []
        for j, result in chunk:
            waiting[at[j]] = result
        for name in dict.fromkeys(jobs[j].src.name for j, _ in chunk):
            line = pending[name]
            while line and line[0] in waiting:  # each name's adapters are stored in the sources' order
                ready.append(line.popleft())
        decide(sorted(ready))
        out = []
        while done in decided:
            out.append(decided.pop(done))
            done += 1
        if out:
            yield out
    times.mark("computed")
    missing = [i for i in range(done, len(planned)) if i not in decided]
    for i in missing:  # a runner that lost results: those adapters are rejected, not silently dropped
        decided[i] = Outcome(planned[i].spec, "rejected", planned[i].src.name, reason="no result came back")
    if done < len(planned):
        yield [decided[i] for i in range(done, len(planned))]


def ingest_sources(
    sources: list[str],
    *,
    base_model: str | None = None,
    base_name: str | None = None,
    dense: bool = False,
    rank: int | None = None,
    niter: int = 4,
    device: str | None = None,
    registry_url: str | None = None,
    blob_url: str | None = None,
    steps: Steps | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    logger: Any = None,
    spectra_only: bool = False,
    flow_run_id: str | None = None,
) -> list[Outcome]:
    """Ingest adapter folders, globs and hub ids into the registry as one recorded run.

    on_outcome is called with each adapter's Outcome as it is decided (the CLI prints it); logger (default:
    this module's) gets one INFO line per adapter. An unusable --base-model raises AdapterError before
    anything is recorded.
    """
    logger = logger or log
    registry = Registry(registry_url, blob_url)
    steps = steps or Steps()
    resolve_base = BaseResolver(registry, base_model, base_name)
    params = dict(base_model=base_model, dense=dense, rank=rank, niter=niter, device=device, spectra_only=spectra_only)

    def emit(outcome: Outcome) -> None:
        if outcome.accepted:
            logger.info("%s %s v%s (%s)", outcome.status, outcome.name, outcome.version, outcome.source)
        else:
            logger.info("rejected %s: %s", outcome.source, outcome.reason)
        for w in outcome.warnings:
            logger.info("warning %s: %s", outcome.name, w)
        if on_outcome is not None:
            on_outcome(outcome)

    try:
        specs = expand_sources(sources)
    except AdapterError as exc:
        bad = Outcome(" ".join(sources), "rejected", reason=str(exc))
        run_id = registry.start_run(list(sources), params, flow_run_id)
        registry.record_result(run_id, source=bad.source, name=None, status=bad.status, reason=bad.reason)
        registry.finish_run(run_id, "failed")
        emit(bad)
        return [bad]
    run_id = registry.start_run(specs, params, flow_run_id)
    outcomes = []
    fetched = steps.fetch_all(specs)
    times = None
    if steps.compute_all is not None:
        global LAST_DRIVER_TIMES
        times = LAST_DRIVER_TIMES = DriverTimes()
        times.mark("fetched")
        decided = _ingest_distributed(registry, specs, fetched, resolve_base, steps, run_id, times, dense=dense,
                                      rank=rank, niter=niter, device=device, spectra_only=spectra_only)
    else:  # one adapter at a time, each line printed as soon as it is decided
        decided = ([ingest_one(registry, spec, src, resolve_base, steps, dense=dense, rank=rank, niter=niter,
                               device=device, run_id=run_id, spectra_only=spectra_only)]
                   for spec, src in zip(specs, fetched))
    for chunk in decided:  # consecutive outcomes in the sources' order: their results in one transaction
        t0 = time.perf_counter()
        registry.record_results(run_id, [dict(source=o.source, name=o.name, status=o.status, version=o.version,
                                              reason=o.reason, warnings=o.warnings) for o in chunk])
        if times is not None:
            times.add("record", t0)
        for outcome in chunk:
            emit(outcome)
            outcomes.append(outcome)
    registry.finish_run(run_id, "completed" if all(o.accepted for o in outcomes) else "completed_with_rejections")
    if times is not None:
        times.mark("finished")
        logger.info("driver times: %s", json.dumps(times.summary()))
    return outcomes
