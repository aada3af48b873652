"""The registry: base models, experts and their immutable versions, spectra blobs, ingestion runs."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from spectr.registry import db
from spectr.registry.blobs import BlobStore
from spectr.registry.models import (
    Adapter,
    AdapterVersion,
    BaseModelRow,
    IngestionResult,
    IngestionRun,
    Spectra,
    utcnow,
)
from spectr.digest import canonical_json, sha256_json
from spectr.registry.settings import registry_url


# What the registry reads from the pipeline's objects (pipeline.types.BaseModelInfo and LoadedAdapter).
# Structural types, so the registry imports nothing from the pipeline (arrows point down).
class BaseModelInfo(Protocol):
    name: str
    architecture: str
    model_type: str
    config: dict[str, Any]
    config_sha256: str


class AdapterSourceInfo(Protocol):
    name: str
    source: str
    revision: str | None


class LoadedAdapter(Protocol):
    source: AdapterSourceInfo
    base: BaseModelInfo
    config: dict[str, Any]
    content_sha256: str
    rank: int
    alpha: float
    target_modules: list[str]
    modules_to_save: list[str]
    modules: dict[str, Any]
    dense_deltas: dict[str, Any]

RESULT_STATUSES = ("new", "unchanged", "rejected")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    base_model: str
    content_sha256: str
    blob_sha256: str
    method: str
    rank: int
    alpha: float
    n_modules: int
    target_modules: list[str]
    modules_to_save: list[str]
    source: str
    revision: str | None
    energy: float
    created_at: datetime


def _jsonable(obj: Any) -> Any:
    # Configs may carry tuples or dtypes; store what json can represent, deterministically.
    return json.loads(canonical_json(obj))


def _loose(name: str) -> tuple[str, str]:
    n = name.strip().rstrip("/").lower()
    return n, PurePosixPath(n.replace("\\", "/")).name


class Registry:
    """SQL metadata (SQLite by default) plus a content-addressed blob store for spectra."""

    def __init__(self, url: str | None = None, blob_url: str | None = None, *, migrate: bool = True) -> None:
        self.url = url or registry_url()
        if migrate:
            db.ensure_current(self.url)
        self.engine = db.make_engine(self.url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.blobs = BlobStore(blob_url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- base models -------------------------------------------------------------------------
    def ensure_base_model(self, info: BaseModelInfo) -> None:
        """Insert the base model, or check that the stored one has the same config_sha256."""
        for attempt in (0, 1):
            try:
                with self._session.begin() as s:
                    self._ensure_base(s, info)
                return
            except IntegrityError:
                if attempt:
                    raise

    def _ensure_base(self, s: Session, info: BaseModelInfo) -> BaseModelRow:
        row = s.scalar(select(BaseModelRow).where(BaseModelRow.name == info.name))
        if row is None:
            row = BaseModelRow(
                name=info.name,
                architecture=info.architecture,
                model_type=info.model_type,
                config=_jsonable(info.config),
                config_sha256=info.config_sha256,
            )
            s.add(row)
            s.flush()
        elif row.config_sha256 != info.config_sha256:
            raise ValueError(
                f"base model {info.name!r} is registered with config_sha256 {row.config_sha256[:12]}, "
                f"got {info.config_sha256[:12]}: a different model under the same name"
            )
        return row

    def base_model_config(self, name: str) -> tuple[str, dict] | None:
        """(stored name, config) by exact name, else names equal or same last path part, case-insensitive."""
        with self._session() as s:
            row = s.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
            if row is not None:
                return row.name, row.config
            full, last = _loose(name)
            for row in s.scalars(select(BaseModelRow).order_by(BaseModelRow.id)):
                f, l_ = _loose(row.name)
                if f == full or l_ == last:
                    return row.name, row.config
        return None

    # -- versions ----------------------------------------------------------------------------
    def find_version(self, name: str, content_sha256: str) -> VersionInfo | None:
        with self._session() as s:
            row = s.scalar(
                self._versions_query()
                .where(Adapter.name == name, AdapterVersion.content_sha256 == content_sha256)
            )
            return _info(row) if row is not None else None

    def add_version(
        self,
        adapter: LoadedAdapter,
        spectra_blob_sha256: str,
        *,
        method: str,
        params: dict,
        energy: float,
        n_modules: int,
        size_bytes: int,
        run_id: str | None = None,
    ) -> tuple[VersionInfo, bool]:
        """Store a new version (created=True) or return the one with the same content (created=False)."""
        if not self.blobs.exists(spectra_blob_sha256):
            raise ValueError(
                f"spectra blob {spectra_blob_sha256} for {adapter.source.name!r} is not in the blob store "
                f"{self.blobs.root}; put() it first"
            )
        # Two writers may pick the same next version number; the unique constraint catches it, retry once.
        for attempt in (0, 1):
            try:
                return self._add_version(
                    adapter, spectra_blob_sha256, method, params, energy, n_modules, size_bytes, run_id
                )
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _add_version(
        self, adapter: LoadedAdapter, blob: str, method: str, params: dict, energy: float,
        n_modules: int, size_bytes: int, run_id: str | None,
    ) -> tuple[VersionInfo, bool]:
        name = adapter.source.name
        with self._session.begin() as s:
            base = self._ensure_base(s, adapter.base)
            row = s.scalar(select(Adapter).where(Adapter.name == name))
            if row is None:
                row = Adapter(name=name, base_model=base)
                s.add(row)
                s.flush()
            elif row.base_model_id != base.id and row.base_model.config_sha256 != base.config_sha256:
                raise ValueError(
                    f"expert {name!r} is registered for base model {row.base_model.name!r}; "
                    f"{adapter.source.source} targets {base.name!r} (a different config)"
                )
            same = s.scalar(
                self._versions_query().where(
                    AdapterVersion.adapter_id == row.id, AdapterVersion.content_sha256 == adapter.content_sha256
                )
            )
            if same is not None:
                return _info(same), False
            last = s.scalar(select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == row.id))
            ver = AdapterVersion(
                adapter=row,
                version=(last or 0) + 1,
                source=adapter.source.source,
                revision=adapter.source.revision,
                content_sha256=adapter.content_sha256,
                config=_jsonable(adapter.config),
                rank=int(adapter.rank),
                alpha=float(adapter.alpha),
                target_modules=sorted(adapter.target_modules),
                modules_to_save=sorted(adapter.modules_to_save),
                n_modules=len(adapter.modules) or len(adapter.dense_deltas),
                dense=bool(adapter.dense_deltas),
                ingestion_run_id=run_id,
            )
            params_json = _jsonable(params)
            ver.spectra.append(
                Spectra(
                    blob_sha256=blob,
                    method=method,
                    params=params_json,
                    params_sha256=sha256_json(params_json),
                    energy=float(energy),
                    n_modules=int(n_modules),
                    size_bytes=int(size_bytes),
                )
            )
            s.add(ver)
            s.flush()
            return _info(ver), True

    def get_version(self, name: str, version: int | None = None) -> VersionInfo:
        """The given version of an expert (latest when None); KeyError naming what exists otherwise."""
        found = self.versions(name)
        if not found:
            raise KeyError(f"no expert named {name!r} in the registry {self.url}")
        if version is None:
            return found[-1]
        for v in found:
            if v.version == version:
                return v
        have = ", ".join(str(v.version) for v in found)
        raise KeyError(f"expert {name!r} has no version {version} (versions: {have})")

    def versions(self, name: str | None = None) -> list[VersionInfo]:
        """All versions, ordered by expert name then version; only `name`'s when given."""
        q = self._versions_query().order_by(Adapter.name, AdapterVersion.version)
        if name is not None:
            q = q.where(Adapter.name == name)
        with self._session() as s:
            return [_info(r) for r in s.scalars(q)]

    def load_spectra_bytes(self, name: str, version: int | None = None) -> bytes:
        """The safetensors bytes of a version's spectra, hash-checked."""
        return self.blobs.get(self.get_version(name, version).blob_sha256)

    @staticmethod
    def _versions_query():
        return (
            select(AdapterVersion)
            .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
            .options(
                selectinload(AdapterVersion.adapter).selectinload(Adapter.base_model),
                selectinload(AdapterVersion.spectra),
            )
        )

    # -- ingestion runs ----------------------------------------------------------------------
    def start_run(self, sources: list[str], params: dict) -> str:
        run_id = str(uuid.uuid4())
        with self._session.begin() as s:
            s.add(IngestionRun(id=run_id, status="running", sources=list(sources), params=_jsonable(params)))
        return run_id

    def record_result(
        self,
        run_id: str,
        *,
        source: str,
        name: str | None,
        status: str,
        version: int | None = None,
        reason: str | None = None,
        warnings: list[str] | None = None,
    ) -> None:
        if status not in RESULT_STATUSES:
            raise ValueError(f"result status must be one of {RESULT_STATUSES}, got {status!r}")
        with self._session.begin() as s:
            if s.get(IngestionRun, run_id) is None:
                raise KeyError(f"no ingestion run {run_id!r}")
            s.add(
                IngestionResult(
                    run_id=run_id, source=source, name=name, status=status,
                    version=version, reason=reason, warnings=list(warnings or []),
                )
            )

    def recorded_warnings(self, name: str, version: int) -> list[str] | None:
        """The warnings last recorded for an accepted expert version (None when no run recorded it)."""
        with self._session() as s:
            row = s.scalar(
                select(IngestionResult)
                .where(IngestionResult.name == name, IngestionResult.version == version,
                       IngestionResult.status != "rejected")
                .order_by(IngestionResult.id.desc())
                .limit(1)
            )
            return list(row.warnings or []) if row is not None else None

    def finish_run(self, run_id: str, status: str) -> None:
        """Close a run: its status, finish time and counts from the recorded results."""
        with self._session.begin() as s:
            run = s.get(IngestionRun, run_id)
            if run is None:
                raise KeyError(f"no ingestion run {run_id!r}")
            counts = dict(
                s.execute(
                    select(IngestionResult.status, func.count())
                    .where(IngestionResult.run_id == run_id)
                    .group_by(IngestionResult.status)
                ).all()
            )
            run.status = status
            run.finished_at = utcnow()
            run.accepted = counts.get("new", 0) + counts.get("unchanged", 0)
            run.rejected = counts.get("rejected", 0)
            run.new_versions = counts.get("new", 0)

    def get_run(self, run_id: str) -> dict[str, Any]:
        """One run with its results, as plain data."""
        with self._session() as s:
            run = s.get(IngestionRun, run_id)
            if run is None:
                raise KeyError(f"no ingestion run {run_id!r}")
            results = s.scalars(
                select(IngestionResult).where(IngestionResult.run_id == run_id).order_by(IngestionResult.id)
            )
            return {
                "id": run.id,
                "status": run.status,
                "started_at": run.started_at.isoformat(),
                "finished_at": run.finished_at.isoformat() if run.finished_at else None,
                "sources": run.sources,
                "params": run.params,
                "accepted": run.accepted,
                "rejected": run.rejected,
                "new_versions": run.new_versions,
                "results": [
                    {"source": r.source, "name": r.name, "status": r.status, "version": r.version,
                     "reason": r.reason, "warnings": r.warnings}
                    for r in results
                ],
            }

    # -- catalog -----------------------------------------------------------------------------
    def catalog(self) -> list[dict]:
        """One plain dict per version (JSON-ready), ordered by name then version."""
        return [
            {
                "name": v.name,
                "version": v.version,
                "base_model": v.base_model,
                "rank": v.rank,
                "alpha": v.alpha,
                "modules": v.n_modules,
                "target_modules": list(v.target_modules),
                "content_sha256": v.content_sha256,
                "blob_sha256": v.blob_sha256,
                "method": v.method,
                "energy": v.energy,
                "source": v.source,
                "revision": v.revision,
                "created_at": v.created_at.isoformat(),
            }
            for v in self.versions()
        ]


def _info(ver: AdapterVersion) -> VersionInfo:
    spec = ver.spectra[-1] if ver.spectra else None  # the latest spectra computed for this version
    return VersionInfo(
        name=ver.adapter.name,
        version=ver.version,
        base_model=ver.adapter.base_model.name,
        content_sha256=ver.content_sha256,
        blob_sha256=spec.blob_sha256 if spec else "",
        method=spec.method if spec else "",
        rank=ver.rank,
        alpha=ver.alpha,
        n_modules=ver.n_modules,
        target_modules=list(ver.target_modules),
        modules_to_save=list(ver.modules_to_save),
        source=ver.source,
        revision=ver.revision,
        energy=spec.energy if spec else 0.0,
        created_at=ver.created_at,
    )
