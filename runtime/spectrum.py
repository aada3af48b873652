"""The spectra types: one adapter's per-module SVD factors, as the pipeline computes them.

Owned by the runtime (the bottom layer) because every layer passes them around: the pipeline computes
them, the registry's blob format stores them, the runtime's bundle format stacks them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ModuleSpectrum:
    """delta W = scaling * U diag(S) V^T for one module. U: out x r, S: r, V: in x r (float32)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    scaling: float
    energy: float = 1.0  # fraction of ||B A||_F^2 captured (1.0 for the exact SVD)


@dataclass
class AdapterSpectra:
    """All modules' spectra of one adapter plus how they were computed."""

    modules: dict[str, ModuleSpectrum]
    method: str  # "exact" or "randomized"
    params: dict[str, Any]  # e.g. {"rank": 8, "niter": 4, "seed": 0, "dtype": "float64"}

    @property
    def energy(self) -> float:
        """Energy captured over the whole adapter (min over modules)."""
        return min((m.energy for m in self.modules.values()), default=1.0)
