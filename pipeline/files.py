"""Reading an adapter's and a base model's files without torch: JSON configs and content hashes.

Light on purpose: re-ingesting an unchanged adapter needs only these and the registry.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from spectr.digest import canonical_json, update_with_file
from spectr.pipeline.types import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"



def read_json_object(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from file; AdapterError naming the file and `what` it should have been otherwise.

    Only a regular file of at most MAX_JSON_BYTES is read (a FIFO would block, /dev/zero never ends), and
    JSON too deep for the parser or numbers too long to convert are refused, not raised as RecursionError.
    """
    try:
        st = os.stat(file)
    except FileNotFoundError:
        raise AdapterError(f"{file}: {what} not found (missing)") from None
    except OSError as e:
        raise AdapterError(f"{file}: cannot read {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise AdapterError(f"{file}: {what} is not a regular file")
    limit = max_json_bytes()
    if st.st_size > limit:
        raise AdapterError(f"{file}: {what} is {st.st_size} bytes, over the {limit}-byte limit "
                           f"(raise SPECTR_MAX_JSON_BYTES if it is genuine)")
    try:
        with open(file, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise AdapterError(f"{file}: cannot read {what}: {e.strerror or e}") from None
    if len(raw) > limit:
        raise AdapterError(f"{file}: {what} is over the {limit}-byte limit")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{file}: invalid JSON in {what}: {e}") from None
    except RecursionError:
        raise AdapterError(f"{file}: invalid JSON in {what}: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise AdapterError(f"{file}: invalid JSON in {what}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{file}: {what} is not a JSON object")
    return data


def max_json_bytes() -> int:
    """Bound on a config file's size; SPECTR_MAX_JSON_BYTES overrides the 4 MiB default."""
    return int(os.environ.get("SPECTR_MAX_JSON_BYTES", 4 << 20))


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json as a dict; AdapterError if it is missing or not a JSON object."""
    return read_json_object(Path(folder) / CONFIG_FILE, CONFIG_FILE)


def adapter_content_sha256(folder: Path, config: dict | None = None) -> str:
    """sha256 over the canonical config JSON, then the safetensors weights file's bytes."""
    folder = Path(folder)
    cfg = read_adapter_config(folder) if config is None else config
    return update_with_file(_content_hasher(cfg), weights_file(folder)).hexdigest()


def weights_file(folder: Path) -> Path:
    """The adapter's safetensors weights: a regular file (a FIFO would block, /dev/zero never ends); pickle
    weights are refused without being opened."""
    file = Path(folder) / WEIGHTS_FILE
    if file.is_file():
        return file
    if file.exists() or file.is_symlink():
        raise AdapterError(f"{file}: not a regular file")
    if (Path(folder) / PICKLE_FILE).exists():
        raise AdapterError(
            f"{Path(folder) / PICKLE_FILE}: pickle weights are refused (never unpickled); "
            f"convert the adapter to {WEIGHTS_FILE} (safetensors) and retry"
        )
    raise AdapterError(f"{file}: missing {WEIGHTS_FILE}")


def content_sha256_of(config_bytes: bytes, weights_bytes: bytes) -> str:
    """adapter_content_sha256 of a folder holding these two files' bytes (the kept adapter is checked with it)."""
    h = _content_hasher(json.loads(config_bytes.decode("utf-8")))  # parsed as read_json_object parses it
    h.update(weights_bytes)
    return h.hexdigest()


def _content_hasher(config: dict) -> Any:
    h = hashlib.sha256()
    h.update(b"adapter_config.json\0" + canonical_json(config).encode() + b"\0")
    h.update(WEIGHTS_FILE.encode() + b"\0")
    return h
