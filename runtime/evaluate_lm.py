"""Task performance: mean next-token loss per domain for the base model, each expert, merges and routers.

Loss of a domain = the sum of next-token cross-entropies over all real predicted tokens (every token of a
document but its first; pads excluded) divided by their count, i.e. a token-weighted mean over documents.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from spectr.runtime.bundle import Bundle, load_bundle, read_bundle, set_router, unload_bundle
from spectr.runtime.evaluate import _macro, pad_batches, pad_id_of, resolve_mapping, tokenize


@torch.no_grad()
def mean_loss(model: nn.Module, docs: list[list[int]], pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """(mean next-token loss, number of predicted tokens) over tokenized documents."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, mask in pad_batches(docs, batch_size, pad_id):
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, :-1].float()
        target = ids[:, 1:].to(dev)
        real = mask[:, 1:].bool().to(dev)  # right padding: a target is real iff its own token is
        total += F.cross_entropy(logits[real], target[real], reduction="sum").item()
        count += int(real.sum())
    return (total / count if count else float("nan")), count


def lm_losses(
    model: nn.Module,
    tokenizer: Any,
    data: dict[str, list[str]],
    bundle: Bundle | str,
    *,
    mapping: dict[str, str] | None = None,
    ks: tuple[int, ...] = (1, 2, 4),
    arrow_k: int = 4,
    cross: bool = True,
    max_tokens: int = 128,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The task-performance table: rows are configurations, columns domains plus "macro".

    model: a plain base model (no bundle loaded); the bundle is loaded here and unloaded before returning.
    Rows: "base"; "expert:NAME" (each expert alone, plain LoRA; on every domain when cross, else only on its
    own domain); "oracle" (each domain's own expert); "uniform" (the average of all experts' delta W);
    "peft-arrow k=K" (|v_1^T x|, softmax over the top-k, output mix); "reference k=K" (the paper's code: factor
    merge, 1/k) and "reference mix k=K" (its output mix); "default" (the runtime's default preset).
    """
    if getattr(model, "spectr", None) is not None:
        raise ValueError("lm_losses needs the plain base model; call unload_bundle(model) first")
    bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    names = bundle.expert_names
    mapping = resolve_mapping(list(data), names, mapping)
    docs = {d: tokenize(tokenizer, texts, max_tokens) for d, texts in data.items()}
    pad = pad_id_of(tokenizer)
    E = len(names)
    rows: dict[str, dict[str, float]] = {}
    tokens: dict[str, int] = {}

    def row(label: str, domains: list[str]) -> dict[str, float]:
        res = {}
        for d in domains:
            res[d], tokens[d] = mean_loss(model, docs[d], pad, batch_size)
            if progress:
                progress(f"{label} {d}")
        return res

    rows["base"] = _macro(row("base", list(data)))
    load_bundle(model, bundle, "fixed", expert=0)
    try:
        for e in names:
            set_router(model, preset="fixed", expert=e)
            own = [d for d in data if cross or mapping[d] == e]
            if own:
                got = row(f"expert:{e}", own)
                rows[f"expert:{e}"] = _macro(got) if cross else got
        rows["oracle"] = _macro({d: rows[f"expert:{mapping[d]}"][d] for d in data})
        # Rows: (preset, its changes) from runtime/presets.py; labels name the preset and what differs.
        configs = {"uniform": ("uniform", dict(top_k=E)),
                   f"peft-arrow k={min(arrow_k, E)}": ("peft-arrow", dict(top_k=min(arrow_k, E)))}
        for k in sorted({min(k, E) for k in ks}):
            configs[f"reference k={k}"] = ("reference", dict(top_k=k))  # factor merge, the paper's code
            configs[f"reference mix k={k}"] = ("reference", dict(top_k=k, combine="mix"))
        configs["default"] = ("default", {})  # the runtime's default (docs/RESULTS.md)
        for label, (preset, changes) in configs.items():
            set_router(model, preset=preset, **changes)
            rows[label] = _macro(row(label, list(data)))
    finally:
        unload_bundle(model)
    return {"domains": list(data), "experts": names, "mapping": mapping, "tokens": tokens,
            "max_tokens": max_tokens, "cross": cross, "rows": rows}
