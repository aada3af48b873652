"""The base model's linear-module shapes, read from its config alone (meta device, no weights)."""
from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectr.digest import sha256_json
from spectr.pipeline.fetch import is_hub_id, split_revision
from spectr.pipeline.types import AdapterError, BaseModelInfo, ModuleShape

# Keys that change between saves of the same model without changing what it computes.
_VOLATILE_KEYS = {
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

_CACHE: dict[str, tuple[str, str, dict[str, ModuleShape]]] = {}
_CACHE_LOCK = threading.Lock()


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        out = {k: _strip_volatile(v) for k, v in obj.items() if k not in _VOLATILE_KEYS}
        if isinstance(out.get("architectures"), list):
            out["architectures"] = sorted(out["architectures"])
        return out
    if isinstance(obj, (list, tuple)):
        return [_strip_volatile(v) for v in obj]
    return obj


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON, volatile keys removed."""
    return sha256_json(_strip_volatile(config))


def _collect_modules(model: nn.Module) -> dict[str, ModuleShape]:
    from transformers.pytorch_utils import Conv1D

    modules: dict[str, ModuleShape] = {}
    for name, mod in model.named_modules():
        if not name or name.split(".")[-1] == "lm_head":
            continue
        if isinstance(mod, Conv1D):
            # GPT-2 Conv1D keeps W as in x out (y = x W), so nx/nf give in/out.
            in_f, out_f = mod.weight.shape
            modules[name] = ModuleShape(int(in_f), int(out_f), conv1d=True)
        elif isinstance(mod, nn.Linear):
            modules[name] = ModuleShape(int(mod.in_features), int(mod.out_features))
    return modules


def _instantiate(config: dict[str, Any], name: str) -> tuple[str, str, dict[str, ModuleShape]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.get("model_type")
    if not model_type:
        raise AdapterError(f"base model {name}: config has no model_type")
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    try:
        cfg = AutoConfig.for_model(model_type, **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # unknown model_type, inconsistent sizes, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(f"base model {name}: cannot build {model_type} from its config: {msg}") from e
    archs = config.get("architectures") or []
    architecture = archs[0] if archs else type(model).__name__
    return architecture, cfg.model_type, _collect_modules(model)


def base_model_from_config(config: dict, name: str, path: Path | None = None) -> BaseModelInfo:
    """Build the model on the meta device from its config and record every linear module's shape."""
    digest = config_sha256(config)
    with _CACHE_LOCK:
        cached = _CACHE.get(digest)
    if cached is None:
        cached = _instantiate(config, name)
        with _CACHE_LOCK:
            _CACHE[digest] = cached
    architecture, model_type, modules = cached
    return BaseModelInfo(
        name=name,
        architecture=architecture,
        model_type=model_type,
        config=dict(config),
        config_sha256=digest,
        modules=dict(modules),
        path=Path(path) if path is not None else None,
    )


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


def _read_config(file: Path) -> dict[str, Any]:
    return read_json_object(file, "base model config.json")


def resolve_base_model(spec: str | Path, name: str | None = None) -> BaseModelInfo:
    """A base model from a local folder holding config.json, or a hub id "org/name[@rev]"."""
    p = Path(spec).expanduser()
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if p.is_dir():
        config = _read_config(p / "config.json")
        if name is None:
            guess = config.get("_name_or_path")
            name = guess if isinstance(guess, str) and is_hub_id(guess) else p.resolve().name
        return base_model_from_config(config, name, p.resolve())
    if p.exists():
        raise AdapterError(f"{spec}: base model must be a folder holding config.json")
    if not is_hub_id(str(spec)):
        raise AdapterError(f"{spec}: base model is neither a folder with config.json nor a hub id org/name[@rev]")
    repo_id, revision = split_revision(str(spec))
    from huggingface_hub import hf_hub_download

    try:
        file = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except Exception as e:  # offline and not cached, missing repo, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(f"{repo_id}/config.json: cannot fetch base model config: {type(e).__name__}: {reason}") from None
    config = _read_config(file)
    return base_model_from_config(config, name or repo_id, file.parent)


def _last(name: str) -> str:
    return name.strip().rstrip("/").split("/")[-1].lower()


def names_match(a: str, b: str) -> bool:
    """Loose identity of base-model names: equal, or equal last path component (case-insensitive)."""
    if not a or not b:
        return False
    return a.strip().lower() == b.strip().lower() or _last(a) == _last(b)
