"""The spectr registry: SQL metadata (SQLAlchemy + Alembic), a content-addressed blob store, DuckDB catalog.

Exports load lazily so that `alembic` (env.py imports registry.db) stays quick to start.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BlobError": "registry.blobs",
    "BlobStore": "registry.blobs",
    "ImmutableVersionError": "registry.models",
    "Registry": "registry.store",
    "VersionInfo": "registry.store",
    "catalog_sql": "registry.catalog",
    "blob_url": "registry.settings",
    "registry_url": "registry.settings",
    "spectr_home": "registry.settings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'registry' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
