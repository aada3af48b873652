"""Routing quality measured inside the routed forward: accuracy per domain, layer and module type; switching.

Routing accuracy (DESIGN.md): for text of domain t whose expert is e_t, the fraction of (token, module,
layer) decisions whose top-1 expert is e_t; the top-k hit rate is the fraction whose top-k set holds e_t.
Both are macro-averaged over domains. Decisions are the ones the routed model makes (the routed forward,
with the router's own k and combination), read from runtime.trace; padding tokens are never counted. With
shared_forward, one routed forward (the runtime's default preset) serves every router: the others decide on
the same module inputs without applying their choice (a third of the cost for three routers).
Everything returns plain JSON-serialisable dicts.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from spectr.runtime.bundle import module_bank, set_router
from spectr.runtime.layer import ForwardState, RoutedLinear, RouterConfig, batch_shape
from spectr.runtime.presets import DEFAULT_PRESET, EVAL_PRESETS, preset_settings
from spectr.runtime.trace import layer_of, trace_routing


def read_jsonl(path: Path | str, max_docs: int | None = None) -> list[str]:
    """The "text" of each line of a JSONL file (first max_docs lines); one-line errors naming file and line."""
    path = Path(path)
    texts: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read data file ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        if max_docs is not None and len(texts) >= max_docs:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{n}: expected an object with a string \"text\"")
        texts.append(row["text"])
    if not texts:
        raise ValueError(f"{path}: no documents")
    return texts


def resolve_mapping(domains: list[str], experts: list[str], explicit: dict[str, str] | None = None) -> dict[str, str]:
    """domain -> expert name: explicit pairs first, else the expert with the domain's own name."""
    explicit = dict(explicit or {})
    for d, e in explicit.items():
        if d not in domains:
            raise ValueError(f"mapping {d}={e}: no data given for domain {d!r} (domains: {domains})")
        if e not in experts:
            raise ValueError(f"mapping {d}={e}: the bundle has no expert {e!r} (experts: {experts})")
    out = {}
    for d in domains:
        e = explicit.get(d, d)
        if e not in experts:
            raise ValueError(f"domain {d!r} matches no expert by name; give --map {d}=EXPERT (experts: {experts})")
        out[d] = e
    return out


def tokenize(tokenizer: Any, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids per document, truncated to max_tokens; empty documents dropped."""
    ids = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]
    return [list(x) for x in ids if len(x) > 0]


def pad_batches(docs: list[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) batches, right-padded; documents sorted by length so batches waste little padding.

    Right padding keeps every real token's position and (causal) context exactly as when run alone.
    """
    order = sorted(docs, key=len, reverse=True)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        T = len(chunk[0])
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, d in enumerate(chunk):
            ids[b, : len(d)] = torch.tensor(d)
            mask[b, : len(d)] = 1
        yield ids, mask


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def apply_preset(model: nn.Module, name: str, top_k: int | None = None) -> dict[str, Any]:
    """Switch the loaded model to a named preset (runtime/presets.py), at k when given (clipped to E);
    returns the settings used."""
    cfg = set_router(model, preset=name, top_k=top_k)
    return {f: getattr(cfg, f) for f in _CONFIG_FIELDS}


# The settings an evaluation reports with each router's results.
_CONFIG_FIELDS = ("router", "top_k", "weighting", "combine", "score", "rank_normalize", "pool", "smooth",
                  "prompt_mean", "depth_evidence", "depth_decay", "attn_follows_mlp", "calibrate", "scoring")


def _body(model: nn.Module) -> nn.Module:
    """The model without its LM head when every routed module lives in the body (skips the vocab GEMM)."""
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if body is None or not all(m.startswith(prefix + ".") for m in model.spectr.modules):
        return model
    return body


@torch.no_grad()
def _traced(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
            watchers: Watchers | None = None) -> dict[str, torch.Tensor]:
    """Top-k indices (B, T, k) of every routed module for one forward (watchers decide alongside)."""
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), None if mask is None else mask.to(dev)
    if watchers is not None:
        watchers.begin(ids, mask)
    try:
        with trace_routing(model) as trace:
            _body(model)(input_ids=ids, attention_mask=mask)
    finally:
        if watchers is not None:
            watchers.end()
    return {m: trace.choices(m)[0] for m in trace.calls}


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _macro(per_domain: dict[str, float]) -> dict[str, float]:
    return {**per_domain, "macro": sum(per_domain.values()) / len(per_domain)}


# What one more forward costs, in padded tokens (Python and per-call overhead of a forward on CPU): splits a
# batch only where that saves more padding than this.
FORWARD_COST_TOKENS = 64


def mixed_batches(docs: dict[str, list[list[int]]], batch_size: int, pad_id: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(ids, mask, domain index per row) batches over every domain's documents together, right-padded.

    Documents are sorted by length (longest first, stable) and cut into consecutive batches of at most
    batch_size x (the longest document) tokens, padding included, where the cuts minimise padded tokens
    plus FORWARD_COST_TOKENS per batch: short documents of any domain share a batch instead of being padded
    to their own domain's longest one. Each row is one document, right-padded under causal attention, so
    its real tokens attend to what they would attend to alone.
    """
    rows = sorted(((len(x), d, x) for d, ds in enumerate(docs.values()) for x in ds), key=lambda r: -r[0])
    if not rows:
        return
    budget = batch_size * rows[0][0]
    # best[i]: least cost of rows[i:]; cut[i]: where the batch starting at i ends
    n = len(rows)
    best, cut = [0] * (n + 1), [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        T, best[i] = rows[i][0], None
        for j in range(i + 1, min(n, i + max(1, budget // T)) + 1):
            cost = (j - i) * T + FORWARD_COST_TOKENS + best[j]
            if best[i] is None or cost < best[i]:
                best[i], cut[i] = cost, j
    i = 0
    while i < n:
        chunk, T = rows[i : cut[i]], rows[i][0]
        i = cut[i]
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, (k, _, x) in enumerate(chunk):
            ids[b, :k] = torch.tensor(x)
            mask[b, :k] = 1
        yield ids, mask, torch.tensor([d for _, d, _ in chunk])


@torch.inference_mode()
def routing_accuracy(
    model: nn.Module,
    tokenizer: Any,
    data: dict[str, list[str]],
    *,
    mapping: dict[str, str] | None = None,
    routers: list[str] | tuple[str, ...] = EVAL_PRESETS,
    top_k: int | None = None,
    max_tokens: int = 128,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
    shared_forward: bool = False,
) -> dict[str, Any]:
    """Routing accuracy of each router preset on a model with a bundle loaded.

    routers: preset names (runtime/presets.py); top_k: k for every router (default: each preset's own k).
    data: domain -> texts; mapping: domain -> expert name (default: same name). Returns
    {router: {"top1": {domain: acc, "macro": acc}, "topk": {...}, "per_layer": {layer: {"top1", "topk"}},
    "per_module": {type: {"top1", "topk"}}, "confusion": {domain: {expert: fraction of top-1}},
    "chance_top1": 1/E, "chance_topk": k/E, "k": k, "config": {...}, "decisions": {domain: n},
    "forward": the preset whose routed forward produced the module inputs}}.
    Documents of all domains are batched together (mixed_batches); progress is called once per
    (router, domain), when the domain's last document has been routed.

    shared_forward: one forward routed by the default preset (else the first listed) for all routers; the
    others decide on its module inputs (Watchers). Exact for the forward's own preset; the others see hidden
    states their own choices would have shifted slightly. False: each router in its own routed forward.
    """
    names = model.spectr.bundle.expert_names
    mapping = resolve_mapping(list(data), names, mapping)
    docs = {d: tokenize(tokenizer, texts, max_tokens) for d, texts in data.items()}
    domains = list(docs)
    target = torch.tensor([names.index(mapping[d]) for d in domains])  # each domain's expert
    batches = list(mixed_batches(docs, batch_size, pad_id_of(tokenizer)))
    D, E = len(domains), len(names)
    if shared_forward and len(routers) > 1:
        lead = DEFAULT_PRESET if DEFAULT_PRESET in routers else routers[0]
        passes = [(lead, [r for r in routers if r != lead])]
    else:
        passes = [(r, []) for r in routers]
    out: dict[str, Any] = {}
    for lead, others in passes:
        configs = {lead: apply_preset(model, lead, top_k)}
        watchers = Watchers(model, others, top_k)
        configs.update(watchers.configs)
        # stats[router][module] = (D, 3) [top-1 hits, top-k hits, decisions] per domain; conf = top-1 choices (D, E)
        stats: dict[str, dict[str, torch.Tensor]] = {r: {} for r in configs}
        conf = {r: torch.zeros(D * E, dtype=torch.long) for r in configs}
        left = {i: len(docs[d]) for i, d in enumerate(domains)}
        for i in (i for i, n in left.items() if n == 0 and progress):
            for r in configs:
                progress(f"{r} {domains[i]}")  # nothing to route
        try:
            for ids, mask, dom in batches:
                real = mask.bool()
                n = real.sum(1)
                e = target[dom][:, None]  # (B, 1): each row's expert
                chosen = {lead: _traced(model, ids, mask, watchers)}
                chosen.update(watchers.take())
                for r, per_module in chosen.items():
                    for m, idx in per_module.items():
                        top1 = idx[..., 0]
                        hit1 = ((top1 == e) & real).sum(1)
                        hitk = ((idx == e[..., None]).any(-1) & real).sum(1)
                        got = torch.stack([hit1, hitk, n], 1)
                        stats[r].setdefault(m, torch.zeros(D, 3, dtype=torch.long)).index_add_(0, dom, got)
                        conf[r] += torch.bincount((dom[:, None] * E + top1)[real], minlength=D * E)
                for d in dom.tolist():
                    left[d] -= 1
                    if left[d] == 0 and progress:
                        for r in configs:
                            progress(f"{r} {domains[d]}")
        finally:
            watchers.close()
        for r in configs:
            counts = {d: {m: s[i].tolist() for m, s in stats[r].items()} for i, d in enumerate(domains)}
            confusion = {d: conf[r].view(D, E)[i] for i, d in enumerate(domains)}
            out[r] = {**_summarise(counts, confusion, names, configs[r]), "forward": lead}
    return {r: out[r] for r in routers}


class Watchers:
    """Routers that watch another router's forward: at every routed module they decide on the module's input
    (RoutedLinear.decide, with their own settings, pooling and per-forward state) and apply nothing."""

    def __init__(self, model: nn.Module, presets: list[str], top_k: int | None = None):
        state = model.spectr
        self.model, self.configs = model, {}
        self.modules: dict[str, dict[str, RoutedLinear]] = {}
        self.states: dict[str, ForwardState] = {}
        self.chosen: dict[str, dict[str, torch.Tensor]] = {}
        E = len(state.bundle.expert_names)
        for r in presets:
            cfg = RouterConfig(**{**vars(state.config), **preset_settings(r, E, top_k=top_k), "impl": "plain"})
            cfg.validate()
            if cfg.router not in ("spectr", "arrow"):
                raise ValueError(f"preset {r}: router {cfg.router!r} makes no decisions to measure")
            st = ForwardState(cfg)
            self.modules[r] = {m: RoutedLinear(model.get_submodule(m).base_layer, m,
                                               module_bank(state.bundle, m, model.get_submodule(m).Vt),
                                               cfg, None, st) for m in state.modules}
            st.link(layout=False)  # they share the model's base layers and never run them
            self.states[r] = st
            self.configs[r] = {f: getattr(cfg, f) for f in _CONFIG_FIELDS}
        self.hooks = [model.get_submodule(m).register_forward_hook(self._watch) for m in state.modules] \
            if presets else []

    def begin(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.chosen = {r: {} for r in self.states}
        for st in self.states.values():
            st.begin(self.model, (), {"input_ids": ids, "attention_mask": mask})

    def end(self) -> None:
        for st in self.states.values():
            st.end()

    def _watch(self, module: RoutedLinear, args: tuple, output: Any) -> None:
        x = args[0]
        lead = x.shape[:-1]
        flat, shape = x.reshape(-1, x.shape[-1]), batch_shape(lead)
        for r, mods in self.modules.items():
            self.chosen[r][module.name] = mods[module.name].decide(flat, shape, x)[1].view(*lead, -1)

    def take(self) -> dict[str, dict[str, torch.Tensor]]:
        chosen, self.chosen = self.chosen, {}
        return chosen

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def _summarise(counts: dict[str, dict[str, list[int]]], conf: dict[str, torch.Tensor], names: list[str],
               config: dict[str, Any]) -> dict[str, Any]:
    def acc(group) -> tuple[dict[str, float], dict[str, float]]:
        t1, tk = {}, {}
        for d, per in counts.items():
            rows = [c for m, c in per.items() if group(m)]
            n = sum(c[2] for c in rows)
            t1[d], tk[d] = _ratio(sum(c[0] for c in rows), n), _ratio(sum(c[1] for c in rows), n)
        return _macro(t1), _macro(tk)

    modules = sorted({m for per in counts.values() for m in per})
    top1, topk = acc(lambda m: True)
    per_layer = {}
    for layer in sorted({layer_of(m) for m in modules}):
        a1, ak = acc(lambda m, layer=layer: layer_of(m) == layer)
        per_layer[str(layer)] = {"top1": a1, "topk": ak}
    per_module = {}
    for kind in sorted({m.rsplit(".", 1)[-1] for m in modules}):
        a1, ak = acc(lambda m, kind=kind: m.rsplit(".", 1)[-1] == kind)
        per_module[kind] = {"top1": a1, "topk": ak}
    confusion = {d: {n: _ratio(int(c[i]), int(c.sum())) for i, n in enumerate(names)} for d, c in conf.items()}
    E, k = len(names), config["top_k"]
    return {
        "top1": top1, "topk": topk, "per_layer": per_layer, "per_module": per_module, "confusion": confusion,
        "chance_top1": 1 / E, "chance_topk": min(k, E) / E, "k": k, "config": config,
        "decisions": {d: sum(c[2] for c in per.values()) for d, per in counts.items()},
    }


# ---- Mixed-domain switching -------------------------------------------------------------------------

SWITCH_DEFINITION = (
    "For a pair (a, b), each sequence is n_a tokens of domain a followed by n_b tokens of domain b (consecutive "
    "tokens of each domain's documents, concatenated). curve_b[j] is the fraction of all (sequence, module, layer) "
    "decisions at the j-th token after the boundary (j = 0 is the first b token) whose top-1 expert is b's expert. "
    "reference is the same fraction averaged over all positions of the same b segments run alone (pure b text). "
    "latency is the smallest j with curve_b[j] >= threshold * reference (0: routing has switched on the first b "
    "token); if that never happens within n_b tokens the pair is censored and counts as n_b. mean_latency "
    "averages latency over pairs."
)


def switch_latency(curve: list[float], level: float) -> int | None:
    """First index j with curve[j] >= level, or None if there is none."""
    for j, v in enumerate(curve):
        if v >= level:
            return j
    return None


def token_stream(tokenizer: Any, texts: list[str], need: int) -> list[int]:
    """The domain's documents tokenized (no special tokens) and concatenated, up to `need` tokens."""
    stream: list[int] = []
    for t in texts:
        stream += list(tokenizer(t, add_special_tokens=False)["input_ids"])
        if len(stream) >= need:
            break
    return stream[:need]


def _expert_fraction(choices: dict[str, torch.Tensor], e: int) -> torch.Tensor:
    """Per position, the fraction of (sequence, module) decisions whose top-1 is expert e: (T,)."""
    hits = sum((idx[..., 0] == e).float().sum(0) for idx in choices.values())
    n = len(choices) * next(iter(choices.values())).shape[0]
    return hits / n


@torch.no_grad()
def switching(
    model: nn.Module,
    tokenizer: Any,
    data: dict[str, list[str]],
    *,
    mapping: dict[str, str] | None = None,
    routers: list[str] | tuple[str, ...] = ("default",),
    pairs: list[tuple[str, str]] | None = None,
    top_k: int | None = None,
    prefix_tokens: int = 64,
    suffix_tokens: int = 64,
    sequences: int = 8,
    threshold: float = 0.9,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """How many tokens routing needs to switch to b's expert after an a -> b boundary (SWITCH_DEFINITION).

    pairs default to every ordered pair of distinct domains. Returns {router: {"pairs": {"a->b": {...}},
    "mean_latency", "censored", "threshold", ...}, "definition": SWITCH_DEFINITION}.
    """
    names = model.spectr.bundle.expert_names
    mapping = resolve_mapping(list(data), names, mapping)
    domains = list(data)
    pairs = pairs or [(a, b) for a in domains for b in domains if a != b]
    for a, b in pairs:
        for d in (a, b):
            if d not in data:
                raise ValueError(f"switching pair {a}->{b}: no data for domain {d!r}")
    n_a, n_b = prefix_tokens, suffix_tokens
    streams = {d: token_stream(tokenizer, data[d], sequences * max(n_a, n_b)) for d in domains}
    segs_a = {d: [s[i * n_a:(i + 1) * n_a] for i in range(len(s) // n_a)] for d, s in streams.items()}
    segs_b = {d: [s[i * n_b:(i + 1) * n_b] for i in range(len(s) // n_b)] for d, s in streams.items()}
    for d in domains:
        if not segs_a[d] or not segs_b[d]:
            raise ValueError(f"switching: domain {d!r} has {len(streams[d])} tokens, fewer than one segment "
                             f"({n_a} + {n_b})")

    def curves(seqs: list[list[int]], experts: list[int]) -> list[list[float]]:
        total = None
        for i in range(0, len(seqs), batch_size):
            ids = torch.tensor(seqs[i:i + batch_size])
            choices = _traced(model, ids, None)
            part = [_expert_fraction(choices, e) * ids.shape[0] for e in experts]
            total = part if total is None else [t + p for t, p in zip(total, part)]
        return [(t / len(seqs)).tolist() for t in total]

    out: dict[str, Any] = {"definition": SWITCH_DEFINITION}
    for r in routers:
        config = apply_preset(model, r, top_k)
        reference = {}
        for b in sorted({b for _, b in pairs}):
            (ref,) = curves(segs_b[b][:sequences], [names.index(mapping[b])])
            reference[b] = sum(ref) / len(ref)
        rows, lat = {}, []
        for a, b in pairs:
            S = min(sequences, len(segs_a[a]), len(segs_b[b]))
            seqs = [segs_a[a][i] + segs_b[b][i] for i in range(S)]
            cb, ca = curves(seqs, [names.index(mapping[b]), names.index(mapping[a])])
            level = threshold * reference[b]
            j = switch_latency(cb[n_a:], level)
            lat.append(n_b if j is None else j)
            if progress:
                progress(f"{r} {a}->{b}")
            rows[f"{a}->{b}"] = {
                "latency": j, "censored": j is None, "level": level, "reference": reference[b], "sequences": S,
                "before_a": sum(ca[:n_a]) / n_a,  # fraction routed to a's expert on the a segment
                "curve_b": cb[n_a:], "curve_a": ca[n_a:],
            }
        out[r] = {
            "pairs": rows, "mean_latency": sum(lat) / len(lat), "censored": sum(v["censored"] for v in rows.values()),
            "threshold": threshold, "prefix_tokens": n_a, "suffix_tokens": n_b, "k": config["top_k"],
            "config": config,
        }
    return out
