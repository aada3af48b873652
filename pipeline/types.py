"""Data passed between the pipeline stages (fetch -> validate -> spectra -> persist).

The spectra types (what the SVD stage returns) are owned by spectr.runtime.spectrum.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # tensors only in hints: fetch and the registry lookup of unchanged adapters stay light
    import torch


class AdapterError(ValueError):
    """An adapter was rejected. The message is one line naming the file, module and shapes."""


def failure_reason(exc: BaseException) -> str:
    """The one-line reason for an unexpected error while ingesting one adapter (its caller names the source).

    Some errors carry no message at all (MemoryError from a failed allocation); the reason still says what
    happened and what to do."""
    if isinstance(exc, MemoryError):
        return ("out of memory while reading or decomposing it (MemoryError); ingest it where more memory is free, "
                "or with --device cuda")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return f"{type(exc).__name__} (no message); rerun with --debug for the traceback"
    return f"{type(exc).__name__}: {lines[0]}"


@dataclass(frozen=True)
class AdapterSource:
    """A fetched adapter: a local folder holding adapter_config.json and its weights."""

    name: str  # expert name: folder name, or the hub repo's name part
    path: Path  # local folder (for hub ids: the snapshot folder in the HF cache)
    source: str  # what the user gave: a path or "org/name[@revision]"
    revision: str | None = None  # resolved commit hash for hub sources


@dataclass(frozen=True)
class ModuleShape:
    """A targetable linear module of the base model: y = W x, W is out_features x in_features."""

    in_features: int
    out_features: int
    conv1d: bool = False  # GPT-2 Conv1D stores W transposed (fan_in_fan_out)


@dataclass(frozen=True)
class BaseModelInfo:
    """The base model's identity and its linear modules' shapes, read from config only (meta device)."""

    name: str  # e.g. "HuggingFaceTB/SmolLM2-135M-Instruct" or a local folder name
    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # e.g. "llama"
    config: dict[str, Any]
    config_sha256: str  # of the shape-relevant config, canonical JSON
    modules: dict[str, ModuleShape]  # "model.layers.0.self_attn.q_proj" -> shape
    path: Path | None = None  # local folder holding config.json (and weights when present)

    def manifest(self) -> dict[str, Any]:
        """The base-model identity a runtime bundle records (runtime.write_bundle's `base`)."""
        return {
            "name": self.name, "architecture": self.architecture, "model_type": self.model_type,
            "config_sha256": self.config_sha256,
            "modules": {m: [s.in_features, s.out_features] for m, s in self.modules.items()},
        }


@dataclass
class ModuleFactors:
    """One module's LoRA factors, oriented as y = W x: delta W = scaling * B @ A."""

    name: str  # canonical module path, "model.layers.0.self_attn.q_proj"
    A: torch.Tensor  # r x in_features
    B: torch.Tensor  # out_features x r
    scaling: float  # lora_alpha / r, or / sqrt(r) for rsLoRA; patterns applied
    bias: torch.Tensor | None = None  # lora_B bias when the adapter trained one (bias / lora_bias)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class LoadedAdapter:
    """A validated adapter, ready for the SVD stage."""

    source: AdapterSource
    config: dict[str, Any]  # adapter_config.json as read
    base: BaseModelInfo
    modules: dict[str, ModuleFactors]
    content_sha256: str  # sha256 over canonical config JSON + weights file bytes
    rank: int  # config r (the default rank; rank_pattern may override per module)
    alpha: float
    target_modules: list[str]  # sorted short names, e.g. ["down_proj", "q_proj"]
    modules_to_save: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Dense experts (a full fine-tune minus its base): module -> delta W (out x in); modules is empty.
    dense_deltas: dict[str, torch.Tensor] = field(default_factory=dict)
