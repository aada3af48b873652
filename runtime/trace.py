"""Routing traces: per token, per layer, per module top-k choices and scores; a heatmap picture."""
from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(module: str) -> int:
    """The layer index in a module path ("model.layers.3.mlp.up_proj" -> 3); -1 when there is none."""
    m = _LAYER.search(module)
    return int(m.group(1)) if m else -1


class DecisionCounter:
    """Per token row, how many routed decisions (module x top-k slot) chose each expert, summed over the
    modules of one forward. Stays on the model's device (no copy, no sync per module); take() hands
    over the (rows, E) counts and starts afresh. A choice with a -inf score (an expert that does not
    adapt the module, or one masked out) is not a decision and is not counted."""

    def __init__(self, num_experts: int):
        self.E = num_experts
        self.counts: torch.Tensor | None = None

    def add(self, idx: torch.Tensor, vals: torch.Tensor) -> None:
        idx = idx.reshape(-1, idx.shape[-1])
        hit = torch.isfinite(vals.reshape(idx.shape)).to(torch.int32)
        counts = torch.zeros(idx.shape[0], self.E, dtype=torch.int32, device=idx.device).scatter_add_(1, idx, hit)
        self.counts = counts if self.counts is None else self.counts + counts

    def take(self) -> torch.Tensor | None:
        counts, self.counts = self.counts, None
        return counts


@dataclass
class TraceRecorder:
    """Collects, while enabled, one entry per module call: top-k indices and scores, (batch, tokens, k).

    With a counter set, it only adds each call's choices to the counter's on-device counts (cheap enough
    for serving) and keeps no copies.
    """

    enabled: bool = False
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=lambda: defaultdict(list))
    counter: DecisionCounter | None = None
    expert_names: list[str] = field(default_factory=list)  # the bundle's, in index order (set by load_bundle)

    def record(self, module: str, idx: torch.Tensor, vals: torch.Tensor) -> None:
        if self.counter is not None:
            self.counter.add(idx.detach(), vals.detach())
            return
        self.calls[module].append((idx.detach().cpu(), vals.detach().float().cpu()))

    def clear(self) -> None:
        self.calls.clear()

    def choices(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All calls of one module joined along tokens (prefill, then one per decode step): (B, T, k) each."""
        got = self.calls[module]
        return torch.cat([i for i, _ in got], dim=1), torch.cat([v for _, v in got], dim=1)

    def top1_grid(self, batch: int = 0) -> torch.Tensor:
        """(tokens, layers) top-1 expert, the most frequent top-1 over each layer's modules."""
        by_layer: dict[int, list[torch.Tensor]] = defaultdict(list)
        for module in self.calls:
            by_layer[layer_of(module)].append(self.choices(module)[0][batch, :, 0])
        layers = sorted(by_layer)
        return torch.stack([torch.stack(by_layer[layer], dim=1).mode(dim=1).values for layer in layers], dim=1)


@contextmanager
def trace_routing(model: nn.Module, clear: bool = True) -> Iterator[TraceRecorder]:
    """with trace_routing(model) as trace: model(...)  -- records every routed decision inside the block."""
    recorder: TraceRecorder = model.spectr.recorder
    if clear:
        recorder.clear()
    recorder.enabled = True
    try:
        yield recorder
    finally:
        recorder.enabled = False


def plot_routing(
    trace: TraceRecorder,
    path: Path | str,
    expert_names: list[str] | None = None,
    tokens: list[str] | None = None,
    batch: int = 0,
) -> Path:
    """Save a heatmap: tokens x layers, each cell coloured by its top-1 expert (matplotlib, no display).

    expert_names default to the loaded bundle's (the recorder of trace_routing knows them)."""
    expert_names = list(expert_names or trace.expert_names)
    if not expert_names:
        raise ValueError("plot_routing: no expert names; pass expert_names or trace a model with a bundle loaded")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    grid = trace.top1_grid(batch).numpy()
    E = len(expert_names)
    cmap = ListedColormap(plt.get_cmap("tab20" if E > 10 else "tab10").colors[:E])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * grid.shape[0] + 2), max(3.0, 0.25 * grid.shape[1] + 1.5)))
    im = ax.imshow(grid.T, aspect="auto", cmap=cmap, vmin=-0.5, vmax=E - 0.5, interpolation="nearest")
    ax.set_xlabel("token")
    ax.set_ylabel("layer")
    if tokens is not None:
        ax.set_xticks(range(len(tokens)), [t[:12] for t in tokens], rotation=90, fontsize=7)
    bar = fig.colorbar(im, ax=ax, ticks=range(E))
    bar.ax.set_yticklabels(expert_names)
    ax.set_title("top-1 expert per token and layer")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
