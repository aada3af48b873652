"""The one canonical JSON and the one file hash (content hashes, config hashes, blob headers).

Standard library only, so every layer (runtime, registry, pipeline, the CLI) can use it.
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


# Keys that change between saves of the same model without changing what it computes.
VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "_commit_hash",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_attn_implementation_internal",
    "_experts_implementation",
    "attn_implementation",
}


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        out = {k: _strip_volatile(v) for k, v in obj.items() if k not in VOLATILE_CONFIG_KEYS}
        if isinstance(out.get("architectures"), list):
            out["architectures"] = sorted(out["architectures"])
        return out
    if isinstance(obj, (list, tuple)):
        return [_strip_volatile(v) for v in obj]
    return obj


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a model config's canonical JSON, volatile keys removed: what a bundle records of its base."""
    return sha256_json(_strip_volatile(config))
