"""Where the registry lives: read from the environment at call time (tests change it per test)."""
from __future__ import annotations

import os
from pathlib import Path


def spectr_home() -> Path:
    """SPECTR_HOME, default ~/.spectr (not created here)."""
    raw = os.environ.get("SPECTR_HOME")
    return Path(raw).expanduser() if raw else Path.home() / ".spectr"


def registry_url() -> str:
    """SPECTR_REGISTRY_URL, default sqlite:///$SPECTR_HOME/registry.db."""
    raw = os.environ.get("SPECTR_REGISTRY_URL")
    if raw:
        return raw
    return f"sqlite:///{spectr_home() / 'registry.db'}"


def blob_url() -> str:
    """SPECTR_BLOB_URL, default $SPECTR_HOME/blobs (a local folder or an fsspec URL)."""
    raw = os.environ.get("SPECTR_BLOB_URL")
    return raw if raw else str(spectr_home() / "blobs")
