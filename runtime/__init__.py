"""Runtime: load an expert bundle into a transformers causal LM and route every token (torch, safetensors only)."""
from spectr.runtime.bundle import (Bundle, OtherBaseWarning, load_bundle, read_bundle, set_expert_mask, set_router, set_token_top_k,
                                  unload_bundle, write_bundle)
from spectr.runtime.layer import RoutedLinear, RouterConfig
from spectr.runtime.presets import PEFT_ARROW, PRESETS, REFERENCE, preset_settings
from spectr.runtime.trace import TraceRecorder, plot_routing, trace_routing

__all__ = [
    "Bundle",
    "OtherBaseWarning",
    "PEFT_ARROW",
    "PRESETS",
    "REFERENCE",
    "RoutedLinear",
    "RouterConfig",
    "TraceRecorder",
    "load_bundle",
    "plot_routing",
    "preset_settings",
    "read_bundle",
    "set_expert_mask",
    "set_router",
    "set_token_top_k",
    "trace_routing",
    "unload_bundle",
    "write_bundle",
]
