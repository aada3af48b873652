"""A linear module wrapped with a bank of expert spectra, routed per token."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spectr.runtime import routing
from spectr.runtime.trace import layer_of

# Sibling modules that read one input tensor in common architectures (the pool="input" groups);
# any other module forms a group of its own.
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))


@dataclass
class RouterConfig:
    """How every wrapped module routes; one object shared by all modules so it can be changed live.

    Defaults follow the routing study on a real 8-expert library (docs/RESULTS.md): top-1 with the q/k/v and
    gate/up groups deciding together had the lowest loss and a higher accuracy than independent decisions, at
    no cost in switching speed; for k > 1, output mix with softmax weights beat the factor merge with 1/k.
    The named presets (the paper's code, PEFT's Arrow, ...) are in runtime/presets.py.
    """

    router: str = "spectr"  # spectr | arrow | uniform | fixed
    top_k: int = 1  # the evidence (docs/RESULTS.md): k=1 gives the lowest loss; the paper's code uses 4
    weighting: str = "softmax"  # softmax(score / temperature) | uniform (1/k, the paper's code)
    temperature: float = 1.0
    combine: str = "mix"  # mix (output mix, PEFT's Arrow) | factor (merge, the paper's code)
    score: str = "norm"  # norm: ||V^T x|| | sigma: ||Sigma V^T x||
    rank_normalize: bool = False
    expert: int | None = None  # index of the expert for router="fixed"
    apply: str = "auto"  # dense | grouped | auto (dense while E*r is small)
    dense_max: int = 4096  # auto: dense when E*r <= dense_max or 2k >= E (dense won every size measured)
    pool: str = "input"  # input (q,k,v; gate,up decide together) | module (the paper's code) | layer
    smooth: float = 0.0  # causal moving average of evidence over tokens; 0 = off (see routing.py)

    def validate(self) -> None:
        checks = [
            (self.router, routing.ROUTERS, "router"),
            (self.weighting, routing.WEIGHTS, "weighting"),
            (self.combine, routing.COMBINES, "combine"),
            (self.score, routing.SCORES, "score"),
            (self.apply, ("auto", "dense", "grouped"), "apply"),
            (self.pool, routing.POOLS, "pool"),
        ]
        for value, allowed, what in checks:
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")
        if self.top_k < 1 or self.temperature <= 0:
            raise ValueError(f"top_k must be >= 1 and temperature > 0, got {self.top_k}, {self.temperature}")
        if not 0.0 <= self.smooth < 1.0:
            raise ValueError(f"smooth must be in [0, 1), got {self.smooth}")
        if self.router == "fixed" and self.expert is None:
            raise ValueError("router='fixed' needs expert=<name or index>")


def group_key(name: str) -> tuple[str, str]:
    """The input group of a module path: (parent path, sibling names), e.g. ("...self_attn", "q_proj+k_proj+v_proj")."""
    parent, _, child = name.rpartition(".")
    for names in INPUT_GROUPS:
        if child in names:
            return parent, "+".join(names)
    return parent, child


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 1 if len(cache) else 0  # a legacy tuple cache: non-empty means a continuation


class ForwardState:
    """What one model's routed modules share during a forward: the padding mask, pooled decisions
    (per input group and per layer, dropped after the forward) and the smoothing average carried
    between decode steps (dropped when a forward starts a new prompt, i.e. has an empty cache).

    begin/end are forward pre-hook and forward hook on the model and on its body (model.model), so
    calling either starts a forward; nested calls count once. While pooling and smoothing are off
    they only count the nesting. Modules called outside a model forward pool and smooth over that call alone.
    """

    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.members: dict[tuple[str, str], list[RoutedLinear]] = defaultdict(list)
        self.active = False
        self.depth = 0  # nesting of hooked forwards (the model calls its body)
        self.real: torch.Tensor | None = None  # (B, T) real tokens of this forward; None = all
        self.groups: dict[tuple[str, str], tuple[torch.Tensor, dict[str, tuple], torch.Tensor]] = {}
        self.layers: dict[int, torch.Tensor] = {}
        self.carry: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def register(self, module: RoutedLinear) -> None:
        self.members[module.group].append(module)

    def begin(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        cfg = self.cfg
        self.depth += 1
        if self.depth > 1 or (cfg.pool == "module" and cfg.smooth == 0):
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if _cache_length(cache) == 0:
            self.carry.clear()  # a new prompt
        mask = kwargs.get("attention_mask")
        self.real = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens is not None:
            self.real = mask[:, -tokens.shape[1]:].bool()  # the mask spans cached + new tokens
        self.groups.clear()
        self.layers.clear()
        self.active = True

    def end(self, *_: Any) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth:
            return
        self.active = False
        self.real = None
        self.groups.clear()
        self.layers.clear()

    def smooth(self, module: RoutedLinear, ev: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """The module's moving-average evidence (t, E) for this call; updates its carried average."""
        B, T = shape
        real = self.real if self.active else None
        if real is not None and tuple(real.shape) != (B, T):
            raise ValueError(f"smooth: module {module.name} sees tokens of shape {(B, T)} but the attention "
                             f"mask covers {tuple(real.shape)}")
        prev, seen = self.carry.get(module.name, (None, None)) if self.active else (None, None)
        if prev is not None and prev.shape[0] != B:
            raise ValueError(f"smooth: module {module.name} continues {prev.shape[0]} rows with {B} "
                             "(reordered or resized caches, e.g. beam search, are not supported)")
        absent = module.rank == 0
        y, last, now_seen = routing.ema(ev.masked_fill(absent, 0.0).view(B, T, -1), self.cfg.smooth, real, prev, seen)
        if self.active:
            self.carry[module.name] = (last, now_seen)
        return y.reshape(B * T, -1).masked_fill(absent, float("-inf"))


class RoutedLinear(nn.Module):
    """y = base(x) + delta y, where delta y mixes the experts the router picks for each token."""

    def __init__(
        self,
        base: nn.Module,
        name: str,
        bank: dict[str, torch.Tensor],
        cfg: RouterConfig,
        recorder: Any,
        state: ForwardState | None = None,
    ):
        super().__init__()
        self.base_layer = base
        self.name = name
        self.cfg = cfg
        self.recorder = recorder
        self.E = int(bank["rank"].numel())
        self.group, self.layer = group_key(name), layer_of(name)
        # Buffers follow model.to(); not persistent, so the model's state_dict keeps only base weights.
        self.register_buffer("Vt", bank["Vt"], persistent=False)
        self.register_buffer("US", bank["U"] * bank["S"].reshape(1, -1), persistent=False)
        self.register_buffer("S", bank["S"], persistent=False)
        self.register_buffer("s", bank["scaling"], persistent=False)
        self.register_buffer("rank", bank["rank"], persistent=False)
        self.routing_state = state if state is not None else ForwardState(cfg)
        self.routing_state.register(self)

    def _scores(self, P: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return routing.scores(P, self.S, self.rank, router=cfg.router, score=cfg.score,
                              rank_normalize=cfg.rank_normalize)

    def _evidence(self, x: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, own scores g, selection evidence): g / ||x||, moving-averaged when smoothing."""
        P = routing.project(x, self.Vt, self.E)
        g = self._scores(P)
        ev = routing.cosine(g, x)
        if self.cfg.smooth > 0:
            ev = self.routing_state.smooth(self, ev, shape)
        return P, g, ev

    def _choose(
        self, x: torch.Tensor, shape: tuple[int, int], source: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, own scores g, chosen experts (t, k)) under the pool/smooth options."""
        cfg, st = self.cfg, self.routing_state
        if cfg.pool == "module":
            P, g, ev = self._evidence(x, shape)
            return P, g, routing.select(ev, cfg.top_k)[1]
        hit = st.groups.get(self.group) if st.active else None
        if cfg.pool == "layer" and st.active and self.layer in st.layers:
            idx = st.layers[self.layer]  # an earlier group of this layer decided
            if idx.shape[0] != x.shape[0]:
                raise ValueError(f"pool='layer': module {self.name} sees {x.shape[0]} tokens, its layer decided "
                                 f"for {idx.shape[0]}")
            if hit is not None and hit[0] is source:
                P, g = hit[1][self.name]
            else:
                P = routing.project(x, self.Vt, self.E)
                g = self._scores(P)
            return P, g, idx
        if hit is not None and hit[0] is not source:
            raise ValueError(f"pool={cfg.pool!r}: module {self.name} got another input than its siblings "
                             f"{[m.name for m in st.members[self.group]]}; they do not share one input here")
        if hit is None:  # the first module of its group in this forward decides for the group
            results, evidence = {}, []
            for m in st.members[self.group]:
                P, g, ev = m._evidence(x, shape)
                results[m.name] = (P, g)
                evidence.append(ev)
            hit = (source, results, routing.select(routing.pool(evidence), cfg.top_k)[1])
            if st.active:
                st.groups[self.group] = hit
                if cfg.pool == "layer":
                    st.layers[self.layer] = hit[2]
        P, g = hit[1][self.name]
        return P, g, hit[2]

    def delta(
        self, x: torch.Tensor, shape: tuple[int, int] | None = None, source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """delta y for x (t, d_in), plus the top-k (values, indices) when the router scored.

        shape: (batch, tokens) with batch * tokens = t (default: one sequence of t tokens), used by
        smoothing; source: the tensor the module was called with, which tells siblings apart for pooling.
        """
        cfg, E = self.cfg, self.E
        x = x.to(self.Vt.dtype)
        if cfg.router == "fixed":
            return routing.apply_fixed(x, self.Vt, self.US, self.s, cfg.expert, E), None, None
        vals = idx = None
        if cfg.router in ("spectr", "arrow") and (cfg.pool != "module" or cfg.smooth > 0):
            P, g, idx = self._choose(x, shape or (1, x.shape[0]), x if source is None else source)
            vals = g.gather(1, idx)
            w = routing.weights(vals, idx, E, mode=cfg.weighting, temperature=cfg.temperature)
        elif cfg.router in ("spectr", "arrow"):  # the reference: each module decides on its own
            P = routing.project(x, self.Vt, E)
            vals, idx = routing.select(self._scores(P), cfg.top_k)
            w = routing.weights(vals, idx, E, mode=cfg.weighting, temperature=cfg.temperature)
        else:
            P = routing.project(x, self.Vt, E)
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
        shape = (1, lead[0]) if len(lead) == 1 else (lead[:-1].numel(), lead[-1])
        dy, vals, idx = self.delta(x.reshape(-1, x.shape[-1]), shape, x)
        if self.recorder is not None and self.recorder.enabled and idx is not None:
            self.recorder.record(self.name, idx.view(*lead, -1), vals.view(*lead, -1))
        return y + dy.view(*lead, -1).to(y.dtype)
