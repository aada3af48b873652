"""spectr: a registry, preprocessing pipeline and runtime for composing LoRA experts with SpectR routing.

`from spectr import load_bundle` gives the runtime's public API; `Registry` the registry's. Names load
lazily, so importing the runtime pulls in no prefect, sqlalchemy or duckdb.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    **{name: "spectr.runtime" for name in (
        "Bundle", "OtherBaseWarning", "PEFT_ARROW", "PRESETS", "REFERENCE", "RoutedLinear", "RouterConfig", "TraceRecorder", "load_bundle",
        "plot_routing", "preset_settings", "read_bundle", "set_expert_mask", "set_router", "set_token_top_k",
        "trace_routing", "unload_bundle", "write_bundle")},
    "Registry": "spectr.registry",
    "catalog_sql": "spectr.registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spectr' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
