"""The one canonical JSON and the one file hash (content hashes, config hashes, blob headers).

Standard library only, so every layer (registry, pipeline, the CLI) can use it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, ASCII; values JSON cannot represent (tuples aside) become str()."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def sha256_json(obj: Any) -> str:
    """sha256 hex digest of canonical_json(obj)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def update_with_file(h: Any, path: Path | str) -> Any:
    """Feed a file's bytes into hash object h in 1 MiB chunks; returns h."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def sha256_file(path: Path | str) -> str:
    """sha256 hex digest of a file's bytes."""
    return update_with_file(hashlib.sha256(), path).hexdigest()
