"""The spectr registry: SQL metadata (SQLAlchemy + Alembic), a content-addressed blob store, DuckDB catalog."""
from registry.blobs import BlobError, BlobStore
from registry.models import ImmutableVersionError
from registry.settings import blob_url, registry_url, spectr_home
from registry.store import Registry, VersionInfo

__all__ = [
    "BlobError",
    "BlobStore",
    "ImmutableVersionError",
    "Registry",
    "VersionInfo",
    "blob_url",
    "registry_url",
    "spectr_home",
]
