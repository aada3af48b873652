"""The spectr registry: SQL metadata (SQLAlchemy + Alembic), a content-addressed blob store, DuckDB catalog.

Exports load lazily so that `alembic` (env.py imports registry.db) stays quick to start.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BlobError": "spectr.registry.blobs",
    "BlobStore": "spectr.registry.blobs",
    "BundleInfo": "spectr.registry.store",
    "ImmutableVersionError": "spectr.registry.models",
    "Registry": "spectr.registry.store",
    "VersionInfo": "spectr.registry.store",
    "catalog_sql": "spectr.registry.catalog",
    "blob_url": "spectr.registry.settings",
    "registry_url": "spectr.registry.settings",
    "spectr_home": "spectr.registry.settings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spectr.registry' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
