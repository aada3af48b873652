"""A linear module wrapped with a bank of expert spectra, routed per token."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from runtime import routing


@dataclass
class RouterConfig:
    """How every wrapped module routes; one object shared by all modules so it can be changed live."""

    router: str = "spectr"  # spectr | arrow | uniform | fixed
    top_k: int = 4
    weighting: str = "uniform"  # uniform (1/k, the paper's code) | softmax(score / temperature)
    temperature: float = 1.0
    combine: str = "factor"  # factor (merge, the paper's code) | mix (output mix, PEFT's Arrow)
    score: str = "norm"  # norm: ||V^T x|| | sigma: ||Sigma V^T x||
    rank_normalize: bool = False
    expert: int | None = None  # index of the expert for router="fixed"
    apply: str = "auto"  # dense | grouped | auto (dense while E*r is small)
    dense_max: int = 4096  # auto: dense when E*r <= dense_max or 2k >= E (dense won every size measured)

    def validate(self) -> None:
        checks = [
            (self.router, routing.ROUTERS, "router"),
            (self.weighting, routing.WEIGHTS, "weighting"),
            (self.combine, routing.COMBINES, "combine"),
            (self.score, routing.SCORES, "score"),
            (self.apply, ("auto", "dense", "grouped"), "apply"),
        ]
        for value, allowed, what in checks:
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")
        if self.top_k < 1 or self.temperature <= 0:
            raise ValueError(f"top_k must be >= 1 and temperature > 0, got {self.top_k}, {self.temperature}")
        if self.router == "fixed" and self.expert is None:
            raise ValueError("router='fixed' needs expert=<name or index>")


class RoutedLinear(nn.Module):
    """y = base(x) + delta y, where delta y mixes the experts the router picks for each token."""

    def __init__(self, base: nn.Module, name: str, bank: dict[str, torch.Tensor], cfg: RouterConfig, recorder: Any):
        super().__init__()
        self.base_layer = base
        self.name = name
        self.cfg = cfg
        self.recorder = recorder
        self.E = int(bank["rank"].numel())
        # Buffers follow model.to(); not persistent, so the model's state_dict keeps only base weights.
        self.register_buffer("Vt", bank["Vt"], persistent=False)
        self.register_buffer("US", bank["U"] * bank["S"].reshape(1, -1), persistent=False)
        self.register_buffer("S", bank["S"], persistent=False)
        self.register_buffer("s", bank["scaling"], persistent=False)
        self.register_buffer("rank", bank["rank"], persistent=False)

    def delta(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """delta y for x (t, d_in), plus the top-k (values, indices) when the router scored."""
        cfg, E = self.cfg, self.E
        x = x.to(self.Vt.dtype)
        if cfg.router == "fixed":
            return routing.apply_fixed(x, self.Vt, self.US, self.s, cfg.expert, E), None, None
        P = routing.project(x, self.Vt, E)
        vals = idx = None
        if cfg.router in ("spectr", "arrow"):
            g = routing.scores(P, self.S, self.rank, router=cfg.router, score=cfg.score,
                               rank_normalize=cfg.rank_normalize)
            vals, idx = routing.select(g, cfg.top_k)
            w = routing.weights(vals, idx, E, mode=cfg.weighting, temperature=cfg.temperature)
        else:
            w = routing.all_weights(x.shape[0], self.rank)
        C = routing.coefficients(P, w, self.S, self.s, combine=cfg.combine)
        k = E if idx is None else idx.shape[1]
        dense = cfg.apply == "dense" or (
            cfg.apply == "auto" and (self.Vt.shape[0] <= cfg.dense_max or 2 * k >= E)
        )
        dy = routing.apply_dense(C, self.US) if dense else routing.apply_grouped(C, w, self.US)
        return dy, vals, idx

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        lead = x.shape[:-1]
        dy, vals, idx = self.delta(x.reshape(-1, x.shape[-1]))
        if self.recorder is not None and self.recorder.enabled and idx is not None:
            self.recorder.record(self.name, idx.view(*lead, -1), vals.view(*lead, -1))
        return y + dy.view(*lead, -1).to(y.dtype)
