"""The registry: base models, experts and their immutable versions, spectra and kept adapter blobs, aliases
(with their audit log), tags, recorded bundles, lineage, ingestion runs."""
from __future__ import annotations

import getpass
import json
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Protocol, TypeVar

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from spectr.registry import db
from spectr.registry.blobs import BlobStore
from spectr.registry.models import (
    Adapter,
    AdapterFile,
    AdapterTag,
    AdapterVersion,
    Alias,
    AliasEvent,
    BaseModelRow,
    BundleExpert,
    BundleRecord,
    IngestionResult,
    IngestionRun,
    Spectra,
    VersionTag,
    utcnow,
)
from spectr.digest import canonical_json, sha256_json
from spectr.registry.names import check_alias, check_bundle_name, check_expert_name, check_tag
from spectr.registry.selectors import Selector, parse_selector
from spectr.registry.settings import registry_url

T = TypeVar("T")


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
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict, hash=False)  # the expert's tags, then the version's
    files: tuple[str, ...] = ()  # original adapter files kept (empty: ingested with --spectra-only)
    ingestion_run_id: str | None = None


@dataclass(frozen=True)
class BundleInfo:
    """A recorded bundle: its experts (in order) and the hashes its files must have."""

    name: str
    version: int
    base_model: str
    router: dict[str, Any]
    spectra_sha256: str
    manifest_sha256: str
    created_at: datetime
    created_by: str
    experts: tuple[dict[str, Any], ...]  # name, version, selector, content_sha256, spectra_blob_sha256


def settle(attempt: Callable[[], T], deadline_s: float = 60.0) -> T:
    """attempt() (one transaction) again until no concurrent writer is in its way. Two writers that choose the
    same new key (a version number, a base model, a tag) clash on a unique constraint; SQLite answers a busy
    writer with "database is locked". Both are retried with jittered exponential backoff, and the retry reads
    the winner's rows, so writers released together all succeed (retrying once was not enough with 8)."""
    delay, start = 0.002, time.monotonic()
    while True:
        try:
            return attempt()
        except (IntegrityError, OperationalError) as e:
            busy = isinstance(e, OperationalError) and "locked" in str(e.orig).lower()
            if not (isinstance(e, IntegrityError) or busy) or time.monotonic() - start > deadline_s:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.25)


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def current_user() -> str:
    """Who moves aliases and creates bundles: SPECTR_USER, else the login name."""
    user = os.environ.get("SPECTR_USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"


class _Conflict(Exception):
    """Another writer changed the row between our read and our write: run the transaction again."""


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
        def attempt() -> None:
            with self._session.begin() as s:
                self._ensure_base(s, info)

        settle(attempt)

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
        return next((v for v in self.versions(name) if v.content_sha256 == content_sha256), None)

    def content_hashes(self, names: list[str]) -> dict[str, set[str]]:
        """Expert name -> the content hashes of its stored versions, for these names (a few queries, not one
        per name: a distributed ingest asks for all its sources at once)."""
        wanted, out = sorted(set(names)), {}
        with self._session() as s:
            for i in range(0, len(wanted), 500):  # stay under the database's bound on query parameters
                rows = s.execute(select(Adapter.name, AdapterVersion.content_sha256)
                                 .join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
                                 .where(Adapter.name.in_(wanted[i:i + 500])))
                for name, sha in rows:
                    out.setdefault(name, set()).add(sha)
        return out

    def keep_files(self, name: str, version: int, files: dict[str, tuple[str, int]]) -> None:
        """Attach kept adapter files (filename -> (blob sha256, size)) to a stored version that lacks them."""
        for sha, _ in files.values():
            if not self.blobs.exists(sha):
                raise ValueError(f"blob {sha} for {name!r} is not in the blob store {self.blobs.root}; put() it first")
        def attempt() -> None:
            with self._session.begin() as s:
                vid = s.scalar(
                    select(AdapterVersion.id).join(Adapter).where(Adapter.name == name, AdapterVersion.version == version)
                )
                if vid is None:
                    raise KeyError(f"expert {name!r} has no version {version}")
                self._attach_files(s, vid, files)

        settle(attempt)  # another writer may attach them first

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
        files: dict[str, tuple[str, int]] | None = None,
    ) -> tuple[VersionInfo, bool]:
        """Store a new version (created=True) or return the one with the same content (created=False).

        files: the original adapter files kept as blobs, filename -> (blob sha256, size); a version that
        exists without them (ingested with --spectra-only) gets them attached."""
        return self.add_versions([dict(
            adapter=adapter, blob=spectra_blob_sha256, method=method, params=params, energy=energy,
            n_modules=n_modules, size_bytes=size_bytes, run_id=run_id, files=files)])[0]

    def add_versions(self, items: list[dict[str, Any]]) -> list[tuple[VersionInfo, bool]]:
        """add_version for several adapters, in this order, in one transaction (one commit): each item holds
        add_version's arguments (the spectra blob's sha256 as `blob`). All or none are stored."""
        for it in items:
            check_expert_name(it["adapter"].source.name)  # the registry is the last line: every source is checked
            for sha in [it["blob"], *(sha for sha, _ in (it.get("files") or {}).values())]:
                if not self.blobs.exists(sha):
                    raise ValueError(f"blob {sha} for {it['adapter'].source.name!r} is not in the blob store "
                                     f"{self.blobs.root}; put() it first")

        # Writers racing for the same next version number: the unique constraint picks one, the others retry.
        def attempt() -> list[tuple[VersionInfo, bool]]:
            with self._session.begin() as s:
                return [self._add_version(s, it["adapter"], it["blob"], it["method"], it["params"], it["energy"],
                                          it["n_modules"], it["size_bytes"], it.get("run_id"), it.get("files") or {})
                        for it in items]

        return settle(attempt)

    def _add_version(
        self, s: Session, adapter: LoadedAdapter, blob: str, method: str, params: dict, energy: float,
        n_modules: int, size_bytes: int, run_id: str | None, files: dict[str, tuple[str, int]],
    ) -> tuple[VersionInfo, bool]:
        name = adapter.source.name
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
            self._attach_files(s, same.id, files)
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
        self._attach_files(s, ver.id, files)
        return replace(_info(ver), files=tuple(sorted(files))), True

    @staticmethod
    def _attach_files(s: Session, version_id: int, files: dict[str, tuple[str, int]]) -> None:
        have = set(s.scalars(select(AdapterFile.filename).where(AdapterFile.version_id == version_id)))
        for filename in sorted(set(files) - have):
            sha, size = files[filename]
            s.add(AdapterFile(version_id=version_id, filename=filename, blob_sha256=sha, size_bytes=int(size)))
        s.flush()

    def get_version(self, name: str, version: int | None = None) -> VersionInfo:
        """The given version of an expert (latest when None); KeyError naming what exists otherwise."""
        return self.resolve(Selector(name, version=version))

    def resolve(self, selector: str | Selector) -> VersionInfo:
        """"code_python" (latest), "code_python@3" or "code_python@prod" -> that version.

        KeyError (one line, naming what exists) when the expert, version or alias is unknown."""
        sel = parse_selector(selector) if isinstance(selector, str) else selector
        found = self.versions(sel.name)
        if not found:
            raise KeyError(f"no expert named {sel.name!r} in the registry {self.url}")
        if sel.alias is not None:
            for v in found:
                if sel.alias in v.aliases:
                    return v
            have = sorted({a for v in found for a in v.aliases})
            raise KeyError(
                f"expert {sel.name!r} has no alias {sel.alias!r} (aliases: {', '.join(have) or 'none'}); "
                f"set one with `spectr alias set {sel.name} {sel.alias} VERSION`"
            )
        if sel.version is None:
            return found[-1]
        for v in found:
            if v.version == sel.version:
                return v
        have = ", ".join(str(v.version) for v in found)
        raise KeyError(f"expert {sel.name!r} has no version {sel.version} (versions: {have})")

    def versions(
        self, name: str | None = None, *, alias: str | None = None, tag: str | dict[str, str] | None = None
    ) -> list[VersionInfo]:
        """Versions ordered by expert name then version, filtered like the catalog's CLI.

        name: one expert; alias: only versions an alias of that name points at; tag: "key" (has the tag),
        "key=value", or a dict of key -> value (all must match). A version has its expert's tags and its own."""
        q = self._versions_query().order_by(Adapter.name, AdapterVersion.version)
        if name is not None:
            q = q.where(Adapter.name == name)
        with self._session() as s:
            rows = list(s.scalars(q))
            ids = [r.id for r in rows]
            aliases: dict[int, list[str]] = {}
            vtags: dict[int, dict[str, str]] = {}
            files: dict[int, list[str]] = {}
            atags: dict[int, dict[str, str]] = {}
            if ids:
                qa = select(Alias.version_id, Alias.alias).order_by(Alias.alias)
                qv = select(VersionTag.version_id, VersionTag.key, VersionTag.value)
                qf = select(AdapterFile.version_id, AdapterFile.filename)
                qt = select(AdapterTag.adapter_id, AdapterTag.key, AdapterTag.value)
                if name is not None:  # one expert's rows only: an ingest asks this once per adapter
                    qa, qv, qf = (q.where(col.in_(ids)) for q, col in (
                        (qa, Alias.version_id), (qv, VersionTag.version_id), (qf, AdapterFile.version_id)))
                    qt = qt.where(AdapterTag.adapter_id == rows[0].adapter_id)
                for vid, a in s.execute(qa):
                    aliases.setdefault(vid, []).append(a)
                for vid, k, v in s.execute(qv):
                    vtags.setdefault(vid, {})[k] = v
                for vid, f in s.execute(qf):
                    files.setdefault(vid, []).append(f)
                for aid, k, v in s.execute(qt):
                    atags.setdefault(aid, {})[k] = v
            out = [
                replace(
                    _info(r),
                    aliases=tuple(aliases.get(r.id, ())),
                    tags={**atags.get(r.adapter_id, {}), **vtags.get(r.id, {})},
                    files=tuple(sorted(files.get(r.id, ()))),
                )
                for r in rows
            ]
        if alias is not None:
            out = [v for v in out if alias in v.aliases]
        for key, value in _tag_filter(tag).items():
            out = [v for v in out if key in v.tags and (value is None or v.tags[key] == value)]
        return out

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

    # -- aliases -----------------------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int | str, actor: str | None = None) -> tuple[int | None, int]:
        """Point `alias` of expert `name` at `version` (a number, or another selector such as "staging").

        One transaction: the move and its audit row (who, when, from, to) commit together, and a move that
        raced with another writer is retried against the new state. Returns (from_version, to_version)."""
        check_alias(alias)
        target = self.resolve(Selector(name, version=version) if isinstance(version, int) else _ref(name, version))
        return self._move_alias(name, alias, target.version, actor or current_user())

    def remove_alias(self, name: str, alias: str, actor: str | None = None) -> int:
        """Delete the alias (recorded as a move to None); returns the version it pointed at."""
        check_alias(alias)
        self.resolve(Selector(name, alias=alias))  # one-line KeyError naming what exists
        old, _ = self._move_alias(name, alias, None, actor or current_user())
        assert old is not None
        return old

    def rollback_alias(self, name: str, alias: str, actor: str | None = None) -> tuple[int | None, int]:
        """Move the alias back to where its latest move took it from."""
        history = self.alias_history(name, alias)
        if not history or history[-1]["from_version"] is None:
            raise ValueError(f"alias {name}@{alias} has no earlier version to roll back to")
        return self.set_alias(name, alias, history[-1]["from_version"], actor)

    def _move_alias(self, name: str, alias: str, to: int | None, actor: str) -> tuple[int | None, int | None]:
        for attempt in range(50):
            try:
                with self._session.begin() as s:
                    return self._move_alias_once(s, name, alias, to, actor)
            except (_Conflict, IntegrityError, OperationalError) as exc:
                # SQLite answers a write-write race with "database is locked"; anything else is real.
                if isinstance(exc, OperationalError) and "locked" not in str(exc).lower():
                    raise
                time.sleep(min(0.005 * (attempt + 1), 0.1))
        raise RuntimeError(f"alias {name}@{alias}: gave up after 50 conflicting writers")

    def _move_alias_once(
        self, s: Session, name: str, alias: str, to: int | None, actor: str
    ) -> tuple[int | None, int | None]:
        adapter = s.scalar(select(Adapter).where(Adapter.name == name))
        if adapter is None:
            raise KeyError(f"no expert named {name!r} in the registry {self.url}")
        to_id = None
        if to is not None:
            to_id = s.scalar(
                select(AdapterVersion.id).where(AdapterVersion.adapter_id == adapter.id, AdapterVersion.version == to)
            )
        row = s.execute(
            select(Alias.id, Alias.version_id, AdapterVersion.version)
            .join(AdapterVersion, AdapterVersion.id == Alias.version_id)
            .where(Alias.adapter_id == adapter.id, Alias.alias == alias)
        ).first()
        if row is None and to is None:  # removed meanwhile by another writer
            raise KeyError(f"expert {name!r} has no alias {alias!r}")
        now = utcnow()
        old = row.version if row is not None else None
        if old == to:
            return old, to  # already there: nothing to record
        if row is None:
            s.add(Alias(adapter_id=adapter.id, alias=alias, version_id=to_id, updated_at=now, updated_by=actor))
        else:
            # Compare-and-set: zero rows means another writer moved it since we read it.
            stmt = (
                delete(Alias).where(Alias.id == row.id, Alias.version_id == row.version_id)
                if to_id is None
                else update(Alias)
                .where(Alias.id == row.id, Alias.version_id == row.version_id)
                .values(version_id=to_id, updated_at=now, updated_by=actor)
            )
            if s.execute(stmt).rowcount != 1:
                raise _Conflict()
        s.add(AliasEvent(adapter_id=adapter.id, alias=alias, from_version=old, to_version=to, actor=actor, at=now))
        s.flush()
        return old, to

    def aliases(self, name: str | None = None) -> list[dict[str, Any]]:
        """Current aliases: expert, alias, version, updated_at, updated_by."""
        q = (
            select(Adapter.name, Alias.alias, AdapterVersion.version, Alias.updated_at, Alias.updated_by)
            .join(Adapter, Adapter.id == Alias.adapter_id)
            .join(AdapterVersion, AdapterVersion.id == Alias.version_id)
            .order_by(Adapter.name, Alias.alias)
        )
        if name is not None:
            q = q.where(Adapter.name == name)
        with self._session() as s:
            return [
                {"name": n, "alias": a, "version": v, "updated_at": t.isoformat(), "updated_by": by}
                for n, a, v, t, by in s.execute(q)
            ]

    def alias_history(self, name: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Every move of the expert's aliases (or of one alias), oldest first."""
        q = (
            select(AliasEvent)
            .join(Adapter, Adapter.id == AliasEvent.adapter_id)
            .where(Adapter.name == name)
            .order_by(AliasEvent.id)
        )
        if alias is not None:
            q = q.where(AliasEvent.alias == alias)
        with self._session() as s:
            return [
                {"name": name, "alias": e.alias, "from_version": e.from_version, "to_version": e.to_version,
                 "actor": e.actor, "at": e.at.isoformat()}
                for e in s.scalars(q)
            ]

    # -- tags --------------------------------------------------------------------------------
    def set_tag(self, target: str, key: str, value: str) -> None:
        """Tag an expert ("code_python") or one version ("code_python@3", "code_python@prod")."""
        check_tag(key, value)
        self._tag(target, key, value)

    def remove_tag(self, target: str, key: str) -> None:
        check_tag(key)
        if not self._tag(target, key, None):
            raise KeyError(f"{target} has no tag {key!r}")

    def _tag(self, target: str, key: str, value: str | None) -> bool:
        sel = parse_selector(target)
        version_id = None
        if "@" in target:
            v = self.resolve(sel)
            with self._session() as s:
                version_id = s.scalar(
                    select(AdapterVersion.id).join(Adapter).where(Adapter.name == v.name, AdapterVersion.version == v.version)
                )

        def attempt() -> Any:
            with self._session.begin() as s:
                adapter = s.scalar(select(Adapter).where(Adapter.name == sel.name))
                if adapter is None:
                    raise KeyError(f"no expert named {sel.name!r} in the registry {self.url}")
                model, owner = (VersionTag, VersionTag.version_id == version_id) if version_id else (
                    AdapterTag, AdapterTag.adapter_id == adapter.id)
                row = s.scalar(select(model).where(owner, model.key == key))
                if value is None:
                    if row is not None:
                        s.delete(row)
                    return row is not None
                if row is None:
                    ids = {"version_id": version_id} if version_id else {"adapter_id": adapter.id}
                    s.add(model(key=key, value=value, updated_at=utcnow(), **ids))
                else:
                    row.value, row.updated_at = value, utcnow()
                return True

        return settle(attempt)  # two writers adding the same new key: the unique constraint decides

    # -- the original adapter ----------------------------------------------------------------
    def adapter_files(self, selector: str | Selector) -> dict[str, str]:
        """filename -> blob sha256 of the version's kept adapter files ({} when ingested spectra-only)."""
        v = self.resolve(selector)
        with self._session() as s:
            rows = s.execute(
                select(AdapterFile.filename, AdapterFile.blob_sha256)
                .join(AdapterVersion, AdapterVersion.id == AdapterFile.version_id)
                .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
                .where(Adapter.name == v.name, AdapterVersion.version == v.version)
                .order_by(AdapterFile.filename)
            )
            return dict(rows.all())

    def export_adapter(self, selector: str, out: str | os.PathLike) -> Path:
        """Write the version's PEFT adapter folder, byte-identical to what was ingested; returns the folder.

        `out` must not exist or be empty. Every blob is hash-checked before anything is written."""
        v = self.resolve(selector)
        files = self.adapter_files(Selector(v.name, version=v.version))
        if not files:
            raise ValueError(
                f"{v.name} v{v.version} was ingested with --spectra-only (or before adapters were kept): "
                f"the registry has its spectra but not its adapter; ingest {v.source} again to keep it"
            )
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out}: exists and is not an empty folder; export into a new folder")
        bad = [f for f in files if Path(f).name != f or f.startswith(".")]
        if bad:  # rows are written by ingest only; refuse anything that could leave the folder
            raise ValueError(f"{v.name} v{v.version}: stored file name {bad[0]!r} is not a plain file name")
        data = {f: self.blobs.get(sha) for f, sha in files.items()}  # BlobError on a missing/corrupt blob
        out.mkdir(parents=True, exist_ok=True)
        for filename, content in data.items():
            tmp = out / f".{filename}.tmp"
            tmp.write_bytes(content)
            os.replace(tmp, out / filename)
        return out

    # -- bundles -----------------------------------------------------------------------------
    def record_bundle(
        self,
        name: str,
        *,
        base_model: str,
        router: dict[str, Any],
        experts: list[tuple[VersionInfo, str]],
        spectra_sha256: str,
        manifest: bytes,
        actor: str | None = None,
    ) -> tuple[BundleInfo, bool]:
        """Record a bundle (experts: (version, selector as typed), in order). The same manifest as the
        newest version of `name` is no new version (created=False); otherwise the next version number."""
        check_bundle_name(name)
        manifest_sha = self.blobs.put(manifest)

        def attempt() -> Any:
            with self._session.begin() as s:
                newest = s.scalar(
                    select(BundleRecord).where(BundleRecord.name == name).order_by(BundleRecord.version.desc()).limit(1)
                )
                if newest is not None and newest.manifest_sha256 == manifest_sha:
                    return self._bundle_info(s, newest), False
                base = s.scalar(select(BaseModelRow).where(BaseModelRow.name == base_model))
                if base is None:
                    raise KeyError(f"base model {base_model!r} is not registered")
                rec = BundleRecord(
                    name=name, version=(newest.version if newest else 0) + 1, base_model_id=base.id,
                    router=_jsonable(router), spectra_sha256=spectra_sha256, manifest_sha256=manifest_sha,
                    created_at=utcnow(), created_by=actor or current_user(),
                )
                s.add(rec)
                s.flush()
                for pos, (v, selector) in enumerate(experts):
                    vid = s.scalar(
                        select(AdapterVersion.id).join(Adapter)
                        .where(Adapter.name == v.name, AdapterVersion.version == v.version)
                    )
                    s.add(BundleExpert(bundle_id=rec.id, position=pos, version_id=vid, selector=selector,
                                       content_sha256=v.content_sha256, spectra_blob_sha256=v.blob_sha256))
                s.flush()
                return self._bundle_info(s, rec), True

        return settle(attempt)

    def get_bundle(self, name: str, version: int | None = None) -> BundleInfo:
        """A recorded bundle (the newest version when None); KeyError naming what exists otherwise."""
        with self._session() as s:
            recs = list(s.scalars(select(BundleRecord).where(BundleRecord.name == name).order_by(BundleRecord.version)))
            if not recs:
                known = sorted(set(s.scalars(select(BundleRecord.name))))
                raise KeyError(f"no bundle named {name!r} in the registry (bundles: {', '.join(known) or 'none'})")
            if version is None:
                return self._bundle_info(s, recs[-1])
            for r in recs:
                if r.version == version:
                    return self._bundle_info(s, r)
            have = ", ".join(str(r.version) for r in recs)
            raise KeyError(f"bundle {name!r} has no version {version} (versions: {have})")

    def bundles(self, name: str | None = None) -> list[BundleInfo]:
        q = select(BundleRecord).order_by(BundleRecord.name, BundleRecord.version)
        if name is not None:
            q = q.where(BundleRecord.name == name)
        with self._session() as s:
            return [self._bundle_info(s, r) for r in s.scalars(q)]

    @staticmethod
    def _bundle_info(s: Session, rec: BundleRecord) -> BundleInfo:
        members = s.execute(
            select(BundleExpert, Adapter.name, AdapterVersion.version)
            .join(AdapterVersion, AdapterVersion.id == BundleExpert.version_id)
            .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
            .where(BundleExpert.bundle_id == rec.id)
            .order_by(BundleExpert.position)
        ).all()
        base = s.get(BaseModelRow, rec.base_model_id)
        return BundleInfo(
            name=rec.name, version=rec.version, base_model=base.name if base else "", router=dict(rec.router),
            spectra_sha256=rec.spectra_sha256, manifest_sha256=rec.manifest_sha256,
            created_at=rec.created_at, created_by=rec.created_by,
            experts=tuple(
                {"name": n, "version": v, "selector": m.selector, "content_sha256": m.content_sha256,
                 "spectra_blob_sha256": m.spectra_blob_sha256}
                for m, n, v in members
            ),
        )

    # -- lineage -----------------------------------------------------------------------------
    def lineage(self, selector: str | None = None) -> list[dict[str, Any]]:
        """Per version: where it came from (folder, or hub repo + resolved commit), the ingestion run and
        Prefect flow run, how its spectra were computed, and which bundles include it."""
        wanted = [self.resolve(selector)] if selector else None
        with self._session() as s:
            q = (
                select(AdapterVersion, Adapter.name, IngestionRun.flow_run_id)
                .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
                .outerjoin(IngestionRun, IngestionRun.id == AdapterVersion.ingestion_run_id)
                .options(selectinload(AdapterVersion.spectra))
                .order_by(Adapter.name, AdapterVersion.version)
            )
            if wanted:
                q = q.where(Adapter.name == wanted[0].name, AdapterVersion.version == wanted[0].version)
            in_bundles: dict[int, list[str]] = {}
            for vid, bname, bver in s.execute(
                select(BundleExpert.version_id, BundleRecord.name, BundleRecord.version)
                .join(BundleRecord, BundleRecord.id == BundleExpert.bundle_id)
                .order_by(BundleRecord.name, BundleRecord.version)
            ):
                in_bundles.setdefault(vid, []).append(f"{bname}@{bver}")
            out = []
            for ver, name, flow_run_id in s.execute(q):
                spec = ver.spectra[-1] if ver.spectra else None
                hub = ver.revision is not None
                out.append({
                    "name": name,
                    "version": ver.version,
                    "source_kind": "hub" if hub else "folder",
                    "source": ver.source,
                    "repo": ver.source.split("@", 1)[0] if hub else None,
                    "commit": ver.revision,
                    "content_sha256": ver.content_sha256,
                    "ingestion_run_id": ver.ingestion_run_id,
                    "flow_run_id": flow_run_id,
                    "svd_method": spec.method if spec else None,
                    "svd_params": dict(spec.params) if spec else None,
                    "energy": spec.energy if spec else None,
                    "bundles": in_bundles.get(ver.id, []),
                    "created_at": ver.created_at.isoformat(),
                })
            return out

    # -- ingestion runs ----------------------------------------------------------------------
    def start_run(self, sources: list[str], params: dict, flow_run_id: str | None = None) -> str:
        self.mark_crashed_runs()  # leftovers of killed ingests are swept whenever a new one starts
        self.blobs.sweep_temp()
        run_id = str(uuid.uuid4())
        with self._session.begin() as s:
            s.add(IngestionRun(id=run_id, status="running", sources=list(sources), params=_jsonable(params),
                               flow_run_id=flow_run_id, host=socket.gethostname(), pid=os.getpid()))
        return run_id

    def crashed_runs(self) -> list[str]:
        """Runs still 'running' whose process on this host is gone. Runs of other hosts are left out: their
        processes cannot be seen from here."""
        with self._session() as s:
            rows = s.execute(select(IngestionRun.id, IngestionRun.pid).where(
                IngestionRun.status == "running", IngestionRun.host == socket.gethostname()))
            return [run_id for run_id, pid in rows if pid is not None and not process_alive(pid)]

    def mark_crashed_runs(self) -> list[str]:
        """crashed_runs(), marked 'crashed' (ids returned)."""
        crashed = self.crashed_runs()
        if crashed:
            with self._session.begin() as s:
                s.execute(update(IngestionRun).where(IngestionRun.id.in_(crashed), IngestionRun.status == "running")
                          .values(status="crashed", finished_at=utcnow()))
        return crashed

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
        self.record_results(run_id, [dict(source=source, name=name, status=status, version=version, reason=reason,
                                          warnings=warnings)])

    def record_results(self, run_id: str, results: list[dict[str, Any]]) -> None:
        """Several results of one run (dicts of record_result's keywords), in this order, in one transaction."""
        for r in results:
            if r["status"] not in RESULT_STATUSES:
                raise ValueError(f"result status must be one of {RESULT_STATUSES}, got {r['status']!r}")
        with self._session.begin() as s:
            if s.get(IngestionRun, run_id) is None:
                raise KeyError(f"no ingestion run {run_id!r}")
            s.add_all(IngestionResult(  # inserted in this order: a run's results are read back by id
                run_id=run_id, source=r["source"], name=r.get("name"), status=r["status"], version=r.get("version"),
                reason=r.get("reason"), warnings=list(r.get("warnings") or [])) for r in results)

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
                "flow_run_id": run.flow_run_id,
                "results": [
                    {"source": r.source, "name": r.name, "status": r.status, "version": r.version,
                     "reason": r.reason, "warnings": r.warnings}
                    for r in results
                ],
            }

    # -- catalog -----------------------------------------------------------------------------
    def catalog(
        self, name: str | None = None, *, alias: str | None = None, tag: str | dict[str, str] | None = None
    ) -> list[dict]:
        """One plain dict per version (JSON-ready), ordered by name then version; filters as versions()."""
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
                "aliases": list(v.aliases),
                "tags": dict(v.tags),
                "adapter_kept": bool(v.files),
            }
            for v in self.versions(name, alias=alias, tag=tag)
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
        ingestion_run_id=ver.ingestion_run_id,
    )


def _ref(name: str, ref: str) -> Selector:
    """The target of `alias set NAME ALIAS REF`: a version ("3", "v3") or another alias of the same expert."""
    sel = parse_selector(f"{name}@{ref}")
    return sel


def _tag_filter(tag: str | dict[str, str] | None) -> dict[str, str | None]:
    if tag is None:
        return {}
    if isinstance(tag, dict):
        return dict(tag)
    key, eq, value = tag.partition("=")
    return {key: value if eq else None}
