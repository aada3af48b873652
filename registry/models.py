"""SQLAlchemy 2 models of the registry. Portable types only (SQLite and PostgreSQL)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC timestamps; SQLite returns naive values, which are UTC by construction."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: registry timestamps must be timezone-aware")
        value = value.astimezone(timezone.utc)
        # SQLite stores text; drop tzinfo so every row sorts and compares the same way.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class BaseModelRow(Base):
    """A registered base model (named Row so it is not confused with pydantic's BaseModel)."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)
    architecture: Mapped[str] = mapped_column(String(255))
    model_type: Mapped[str] = mapped_column(String(255))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    base_model: Mapped[BaseModelRow] = relationship()
    versions: Mapped[list[AdapterVersion]] = relationship(
        back_populates="adapter", order_by="AdapterVersion.version", passive_deletes="all"
    )


class IngestionRun(Base):
    __tablename__ = "ingestion_runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(32))
    sources: Mapped[list[str]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    new_versions: Mapped[int] = mapped_column(Integer, default=0)
    flow_run_id: Mapped[str | None] = mapped_column(String(36))  # the Prefect flow run, when there is one
    host: Mapped[str | None] = mapped_column(String(255))  # who runs it: a run whose process is gone crashed
    pid: Mapped[int | None] = mapped_column(Integer)


class AdapterVersion(Base):
    """One immutable version of an expert: its content hash identifies it."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "version"),
        UniqueConstraint("adapter_id", "content_sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(Text)
    revision: Mapped[str | None] = mapped_column(String(255))
    content_sha256: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    modules_to_save: Mapped[list[str]] = mapped_column(JSON)
    n_modules: Mapped[int] = mapped_column(Integer)
    dense: Mapped[bool] = mapped_column(Boolean, default=False)
    ingestion_run_id: Mapped[str | None] = mapped_column(ForeignKey("ingestion_runs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    adapter: Mapped[Adapter] = relationship(back_populates="versions")
    spectra: Mapped[list[Spectra]] = relationship(
        back_populates="version", order_by="Spectra.id", passive_deletes="all"
    )  # "all": never null out children, so the delete reaches before_delete below


class Spectra(Base):
    """Where one version's spectra live (a safetensors blob) and how they were computed."""

    __tablename__ = "spectra"
    __table_args__ = (UniqueConstraint("version_id", "method", "params_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    blob_sha256: Mapped[str] = mapped_column(String(64), index=True)
    method: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    params_sha256: Mapped[str] = mapped_column(String(64))
    energy: Mapped[float] = mapped_column(Float)
    n_modules: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    version: Mapped[AdapterVersion] = relationship(back_populates="spectra")


class IngestionResult(Base):
    __tablename__ = "ingestion_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("ingestion_runs.id"), index=True)
    source: Mapped[str] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    version: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    warnings: Mapped[list[str]] = mapped_column(JSON)


class AdapterFile(Base):
    """One original file of a version (adapter_config.json, adapter_model.safetensors), kept as a blob.

    A row of its own, not a column of the immutable version: a version ingested with --spectra-only can have
    its files attached later by ingesting the same content again."""

    __tablename__ = "adapter_files"
    __table_args__ = (UniqueConstraint("version_id", "filename"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    filename: Mapped[str] = mapped_column(String(255))
    blob_sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Alias(Base):
    """A movable name for one version of an expert ("prod" -> code_python v3)."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    alias: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(255))


class AliasEvent(Base):
    """The audit log of alias moves: who, when, from which version to which (None: created or removed)."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(255))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AdapterTag(Base):
    """A key/value tag on an expert (all its versions)."""

    __tablename__ = "adapter_tags"
    __table_args__ = (UniqueConstraint("adapter_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    key: Mapped[str] = mapped_column(String(255))
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VersionTag(Base):
    """A key/value tag on one version (its own table: versions are immutable)."""

    __tablename__ = "version_tags"
    __table_args__ = (UniqueConstraint("version_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    key: Mapped[str] = mapped_column(String(255))
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BundleRecord(Base):
    """A bundle as the registry recorded it: enough to write the same bytes again."""

    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    version: Mapped[int] = mapped_column(Integer)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    router: Mapped[dict[str, Any]] = mapped_column(JSON)
    spectra_sha256: Mapped[str] = mapped_column(String(64))
    manifest_sha256: Mapped[str] = mapped_column(String(64))  # the manifest's bytes, kept as a blob
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))


class BundleExpert(Base):
    """One expert version inside a bundle, in the bundle's order, with the selector the user gave."""

    __tablename__ = "bundle_experts"
    __table_args__ = (UniqueConstraint("bundle_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"))
    position: Mapped[int] = mapped_column(Integer)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    selector: Mapped[str] = mapped_column(String(512))
    content_sha256: Mapped[str] = mapped_column(String(64))
    spectra_blob_sha256: Mapped[str] = mapped_column(String(64))


class ImmutableVersionError(RuntimeError):
    """Someone tried to change or delete a stored adapter version."""


@event.listens_for(AdapterVersion, "before_update")
def _refuse_update(mapper: Any, connection: Any, target: AdapterVersion) -> None:
    raise ImmutableVersionError(
        f"adapter_versions row {target.id} (version {target.version}) is immutable; add a new version instead"
    )


@event.listens_for(AdapterVersion, "before_delete")
def _refuse_delete(mapper: Any, connection: Any, target: AdapterVersion) -> None:
    raise ImmutableVersionError(f"adapter_versions row {target.id} (version {target.version}) cannot be deleted")
