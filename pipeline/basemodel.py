"""The base model's linear-module shapes, read from its config alone (meta device, no weights)."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectr.digest import config_sha256
from spectr.pipeline.fetch import is_hub_id, locate_base_config, split_revision
from spectr.pipeline.files import read_json_object
from spectr.pipeline.types import AdapterError, BaseModelInfo, ModuleShape

_CACHE: dict[str, tuple[str, str, dict[str, ModuleShape]]] = {}
_CACHE_LOCK = threading.Lock()


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


def _disk_cache(digest: str) -> Path:
    # Keyed by the config and the transformers version that built the table (a new version may add modules).
    from importlib.metadata import version

    from spectr.registry.settings import spectr_home

    return spectr_home() / "cache" / "base-modules" / f"{digest}-transformers-{version('transformers')}.json"


def _load_cached(digest: str) -> tuple[str, str, dict[str, ModuleShape]] | None:
    """The module table from the disk cache: importing transformers costs 2-7 s on the shared box."""
    try:
        data = json.loads(_disk_cache(digest).read_text())
        modules = {m: ModuleShape(int(i), int(o), bool(c)) for m, i, o, c in data["modules"]}
        return str(data["architecture"]), str(data["model_type"]), modules
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_cached(digest: str, table: tuple[str, str, dict[str, ModuleShape]]) -> None:
    architecture, model_type, modules = table
    file = _disk_cache(digest)
    data = {"architecture": architecture, "model_type": model_type,
            "modules": [[m, s.in_features, s.out_features, s.conv1d] for m, s in modules.items()]}  # model order
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, file)
    except OSError:  # a read-only home only loses the cache
        pass


def base_model_from_config(config: dict, name: str, path: Path | None = None) -> BaseModelInfo:
    """Build the model on the meta device from its config and record every linear module's shape.

    The table is cached per config (in memory and under $SPECTR_HOME/cache), so a known base model does
    not need transformers at all."""
    digest = config_sha256(config)
    with _CACHE_LOCK:
        cached = _CACHE.get(digest)
    if cached is None:
        cached = _load_cached(digest)
        if cached is None:
            cached = _instantiate(config, name)
            _store_cached(digest, cached)
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


def _read_config(file: Path) -> dict[str, Any]:
    return read_json_object(file, "base model config.json")


def resolve_base_model(spec: str | Path, name: str | None = None) -> BaseModelInfo:
    """A base model from a local folder holding config.json, or a hub id "org/name[@rev]" (cache first)."""
    file = locate_base_config(spec)
    config = _read_config(file)
    local = Path(spec).expanduser().exists()
    folder = file.parent.resolve() if local else file.parent  # a hub snapshot keeps its cache path
    if name is None and local:
        guess = config.get("_name_or_path")
        name = guess if isinstance(guess, str) and is_hub_id(guess) else folder.name
    return base_model_from_config(config, name or split_revision(str(spec))[0], folder)


def _last(name: str) -> str:
    return name.strip().rstrip("/").split("/")[-1].lower()


def names_match(a: str, b: str) -> bool:
    """Loose identity of base-model names: equal, or equal last path component (case-insensitive)."""
    if not a or not b:
        return False
    return a.strip().lower() == b.strip().lower() or _last(a) == _last(b)
