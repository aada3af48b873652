"""A linear module wrapped with a bank of expert spectra, routed per token."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spectr.runtime import kernels, routing
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
    apply: str = "auto"  # dense | grouped | gathered | auto (see dense_max, gather_min)
    dense_max: int = 4096  # auto: dense when E*r <= dense_max or 2k >= E (dense won every size measured)
    # apply="gathered": only the chosen experts' columns of U Sigma (kernels.expand / expand_group, in the fused
    # path on a GPU with Triton, eager and compiled; where the kernels do not run, e.g. on a CPU, the fused path
    # applies densely: the same sum).
    # auto gathers when E*r >= gather_min and top_k = 1 (None = never). H200, 8 x 512 tokens, eager: at E=64 gathered
    # 1.25x the base against dense 1.29x, at E=8 1.11x against 1.10x (benchmarks/results/gpu_h200.md, session 12)
    gather_min: int | None = 512
    pool: str = "input"  # input (q,k,v; gate,up decide together) | module (the paper's code) | layer
    smooth: float = 0.0  # causal moving average of evidence over tokens; 0 = off (see routing.py)
    # Round two (routing.py; docs/RESULTS.md): all off by default. The fused path implements calibrate in its
    # torch code (not in the Triton kernel); for the others it falls back to the plain path.
    prompt_mean: float = 0.0  # weight of the causal running mean of evidence over the text so far; 0 = off
    depth_evidence: str = "none"  # none | cumulative | decayed: a decision adds the same token's evidence below
    depth_decay: float = 0.5  # the factor per decision group for depth_evidence="decayed"
    attn_follows_mlp: bool = False  # layer l's attention modules take layer l-1's MLP decision
    calibrate: str = "none"  # none | isotropic | base_weight: divide selection evidence by an expert's typical score
    # fused: one GEMM per input group for the base outputs and scores (layout_group), decisions and outputs
    # handed to siblings by module attributes, the dense apply added into the base output (addmm_; at decode
    # sizes on a GPU one gathered Triton apply per group), on a GPU one Triton kernel for the routing math; compiles
    # with fullgraph=True and captures into CUDA graphs. plain: the readable per-module code, the reference
    # the fused path is tested against (and the grouped apply where torch's grouped GEMM cannot run it).
    impl: str = "fused"
    # exact: the scoring GEMM in the model's dtype. fp8: in float8 e4m3 (x per token, each V direction scaled on
    # its own; routing.project_fp8), for large E where scoring every expert is a large share of the linear FLOPs:
    # the real 8-expert library kept its routing accuracy with 2.3% of decisions changed (study_fp8_scoring.md).
    # The chosen experts' coefficients come from the same projections. On CPUs the fp8 GEMM is emulated (slower).
    # H200, E=64: prefill 1.24x -> 1.21x eager, 1.38x -> 1.32x compiled, but compiled decode slower (gpu_h200.md):
    # opt-in, not a default (it also changes a few percent of decisions).
    scoring: str = "exact"

    def validate(self) -> None:
        checks = [
            (self.router, routing.ROUTERS, "router"),
            (self.weighting, routing.WEIGHTS, "weighting"),
            (self.combine, routing.COMBINES, "combine"),
            (self.score, routing.SCORES, "score"),
            (self.apply, ("auto", "dense", "grouped", "gathered"), "apply"),
            (self.pool, routing.POOLS, "pool"),
            (self.impl, ("fused", "plain"), "impl"),
            (self.depth_evidence, routing.DEPTH_EVIDENCE, "depth_evidence"),
            (self.calibrate, routing.CALIBRATIONS, "calibrate"),
            (self.scoring, routing.SCORINGS, "scoring"),
        ]
        for value, allowed, what in checks:
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")
        if self.top_k < 1 or self.temperature <= 0:
            raise ValueError(f"top_k must be >= 1 and temperature > 0, got {self.top_k}, {self.temperature}")
        if not 0.0 <= self.smooth < 1.0:
            raise ValueError(f"smooth must be in [0, 1), got {self.smooth}")
        if not 0.0 <= self.prompt_mean <= 1.0:
            raise ValueError(f"prompt_mean must be in [0, 1], got {self.prompt_mean}")
        if self.smooth > 0 and self.prompt_mean > 0:
            raise ValueError("smooth and prompt_mean both average evidence over tokens; set one of them to 0")
        if not 0.0 <= self.depth_decay <= 1.0:
            raise ValueError(f"depth_decay must be in [0, 1], got {self.depth_decay}")
        if self.attn_follows_mlp and self.pool == "layer":
            raise ValueError("attn_follows_mlp needs pool 'input' or 'module' (with pool='layer' the MLP makes no "
                             "decision of its own to follow)")
        if self.router == "fixed" and self.expert is None:
            raise ValueError("router='fixed' needs expert=<name or index>")


    def over_tokens(self) -> bool:
        """Evidence is averaged over tokens (smooth or prompt_mean): state is carried across decode steps."""
        return self.smooth > 0 or self.prompt_mean > 0

    def evidence_path(self) -> bool:
        """Decisions come from (pooled, averaged, calibrated) evidence rather than each module's raw scores."""
        return (self.pool != "module" or self.over_tokens() or self.calibrate != "none"
                or self.depth_evidence != "none" or self.attn_follows_mlp)

    def plain_only(self) -> bool:
        """Options the fused path does not implement (it then runs the plain path)."""
        return self.prompt_mean > 0 or self.depth_evidence != "none" or self.attn_follows_mlp


def block_kind(name: str) -> str:
    """"attn", "mlp" or "" from a module path's parent ("...self_attn.q_proj" -> "attn")."""
    parent = name.rpartition(".")[0].rsplit(".", 1)[-1].lower()
    if "attn" in parent or "attention" in parent:
        return "attn"
    if "mlp" in parent or "feed_forward" in parent or "ffn" in parent:
        return "mlp"
    return ""


def group_key(name: str) -> tuple[str, str]:
    """The input group of a module path: (parent path, sibling names), e.g. ("...self_attn", "q_proj+k_proj+v_proj")."""
    parent, _, child = name.rpartition(".")
    for names in INPUT_GROUPS:
        if child in names:
            return parent, "+".join(names)
    return parent, child


def batch_shape(lead: torch.Size) -> tuple[int, int]:
    """(batch, tokens) of an input's leading dims: (T,) is one sequence, (..., T) a batch of sequences."""
    return (1, lead[0]) if len(lead) == 1 else (lead[:-1].numel(), lead[-1])


def _cache_length(cache: Any) -> int | torch.Tensor:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        n = cache.get_seq_length()  # a tensor for static caches: left on the device
        return n if isinstance(n, torch.Tensor) else int(n)
    if isinstance(cache, (tuple, list)):
        return 1 if len(cache) else 0  # a legacy tuple cache: non-empty means a continuation
    return 1  # another kind (continuous batching's paged cache, shared by many requests): not a new prompt


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
        self.by_layer: dict[int, list[RoutedLinear]] = defaultdict(list)
        self.fresh: bool | torch.Tensor = True  # smoothing: this forward starts a prompt (a tensor under a static cache)
        self.active = False
        self.depth = 0  # nesting of hooked forwards (the model calls its body)
        self.real: torch.Tensor | None = None  # (B, T) real tokens of this forward; None = all
        self.groups: dict[tuple[str, str], tuple[torch.Tensor, dict[str, tuple], torch.Tensor]] = {}
        self.layers: dict[int, torch.Tensor] = {}
        self.carry: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # depth_evidence: the evidence accumulated over the groups decided so far in this forward (t, E)
        self.below: torch.Tensor | None = None
        # attn_follows_mlp: layer -> the decision (t, k) of that layer's MLP input group in this forward
        self.mlp_choice: dict[int, torch.Tensor] = {}
        # Which experts each token may use (set_expert_mask): bool (N, E) over the flattened token rows of
        # the next forwards, or (E,) for every token; None = all. Kept until changed, not reset per forward.
        self.expert_mask: torch.Tensor | None = None
        # How many experts each token row picks (set_token_top_k): int (N,) over the same rows; None = cfg.top_k.
        self.token_k: torch.Tensor | None = None

    def top_k(self, module: RoutedLinear, t: int) -> int | torch.Tensor:
        """The k for a call of `module` on t token rows: cfg.top_k, or the per-row (t,) tensor."""
        k = self.token_k
        if k is None:
            return self.cfg.top_k
        if k.shape[0] != t:
            raise ValueError(f"set_token_top_k: k has shape {tuple(k.shape)} but module {module.name} sees {t} "
                             f"token rows, i.e. needs ({t},)")
        return k

    def allowed(self, module: RoutedLinear, t: int) -> torch.Tensor | None:
        """The expert mask for a call of `module` on t token rows: (t, E), (E,) or None."""
        mask = self.expert_mask
        if mask is None or mask.dim() == 1:
            return mask
        if mask.shape[0] != t:
            raise ValueError(f"set_expert_mask: the mask has shape {tuple(mask.shape)} but module {module.name} "
                             f"sees {t} token rows, i.e. needs ({t}, {mask.shape[1]}) or ({mask.shape[1]},)")
        return mask

    def register(self, module: RoutedLinear) -> None:
        self.members[module.group].append(module)
        self.by_layer[module.layer].append(module)

    def link(self, layout: bool = True) -> None:
        """Static plan for the fused path, once every module is registered: each module's input group (in
        registration order) with one stacked V^T for the group's single scoring GEMM, and the modules of
        its layer outside its group (pool="layer" hands them its decision). layout: also the group GEMM
        (layout_group), which makes the base weights views; False for modules that only decide (evaluate's
        Watchers share the model's base layers)."""
        for members in self.members.values():
            for slot, m in enumerate(members):
                m.siblings, m.slot = members, slot
                m.layer_rest = [o for o in self.by_layer[m.layer] if o.group != m.group]
            lead = members[0]
            if len(members) > 1 and len({m.Vt.shape[1] for m in members}) == 1:
                lead.register_buffer("Vt_group", torch.cat([m.Vt for m in members]), persistent=False)
                lead.group_sizes = [m.Vt.shape[0] for m in members]
                if len({m.S.shape[1] for m in members}) == 1:  # one rank: the group decides in one call
                    for f in ("S", "rank", "s"):
                        lead.register_buffer(f"{f}_group", torch.stack([getattr(m, f) for m in members]),
                                             persistent=False)
                    _bind_stacked(members)
            if layout:
                layout_group(members)
            o = 0
            for m in members:
                m.vt_offset, o = o, o + m.Vt.shape[0]
        if self.cfg.scoring == "fp8":
            self.prepare_scoring()

    def prepare_scoring(self) -> None:
        """scoring="fp8": each input group's float8 V's (quantize_scoring), made now, not inside a (compiled)
        forward; groups that have them keep them."""
        for members in self.members.values():
            if members[0].Vt8 is None:
                quantize_scoring(members[0])

    def _clear_handoffs(self) -> None:
        # Only what is set: under torch.compile the hooks run as frames of their own, and every attribute they
        # assign is replayed in Python on each call (3 per routed module, twice a forward: about 340 module
        # setattrs for 8 Llama layers); a None checked is a guard, not a replay.
        for members in self.members.values():
            for m in members:
                if m.pending is not None:
                    m.pending = None
                if m.layer_idx is not None:
                    m.layer_idx = None
                if m.pending_out is not None:
                    m.pending_out = None

    def begin(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        cfg = self.cfg
        self.depth += 1
        if self.depth > 1 or not cfg.evidence_path():
            return
        if cfg.impl == "fused":
            self._clear_handoffs()  # a forward that raised half-way leaves nothing behind
        if cfg.over_tokens():
            tokens = kwargs.get("input_ids", args[0] if args else None)
            if tokens is None:
                tokens = kwargs.get("inputs_embeds")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            n = _cache_length(cache)
            if isinstance(n, torch.Tensor):
                self.fresh = n == 0  # a static cache counts on the device: no host sync, resolved in smooth()
            elif n == 0:
                self.carry.clear()  # a new prompt
            mask = kwargs.get("attention_mask")
            self.real = None
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens is not None:
                self.real = mask[:, -tokens.shape[1]:].bool()  # the mask spans cached + new tokens
        self.groups.clear()
        self.layers.clear()
        self.below = None
        self.mlp_choice.clear()
        self.active = True

    def end(self, *_: Any) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth:
            return
        self.active = False
        self.real = None
        self.fresh = True
        self.groups.clear()
        self.layers.clear()
        self.below = None
        self.mlp_choice.clear()
        if self.cfg.impl == "fused" and (self.cfg.pool != "module"):
            self._clear_handoffs()

    def smooth(self, module: RoutedLinear, ev: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """The module's evidence (t, E) averaged over tokens for this call (smooth: the moving average;
        prompt_mean: blended with the running mean over the text so far); updates its carried state."""
        B, T = shape
        real = self.real if self.active else None
        if real is not None and tuple(real.shape) != (B, T):
            raise ValueError(f"smooth: module {module.name} sees tokens of shape {(B, T)} but the attention "
                             f"mask covers {tuple(real.shape)}")
        prev, seen = self.carry.get(module.name, (None, None)) if self.active else (None, None)
        if prev is not None and prev.shape[0] != B and isinstance(self.fresh, torch.Tensor):
            prev = seen = None  # a static cache reused with another batch: a new prompt
        if prev is not None and prev.shape[0] != B:
            raise ValueError(f"smooth: module {module.name} continues {prev.shape[0]} rows with {B} "
                             "(reordered or resized caches, e.g. beam search, are not supported)")
        if prev is not None and isinstance(self.fresh, torch.Tensor):  # a new prompt in a static cache
            prev, seen = prev.masked_fill(self.fresh, 0.0), seen.masked_fill(self.fresh, 0)
        absent = module.rank == 0
        e = ev.masked_fill(absent, 0.0).view(B, T, -1)
        if self.cfg.prompt_mean > 0:  # seen carries the count of earlier real tokens (0 = none)
            count = None if seen is None else seen.to(e.dtype)
            m, last, n = routing.running_mean(e, real, prev, count)
            w = self.cfg.prompt_mean
            y, now_seen = (1 - w) * e + w * m, n
        else:
            y, last, now_seen = routing.ema(e, self.cfg.smooth, real, prev, seen)
        if self.active:
            self.carry[module.name] = (last, now_seen)
        return y.reshape(B * T, -1).masked_fill(absent, float("-inf"))

    def across_depth(self, ev: torch.Tensor) -> torch.Tensor:
        """depth_evidence: a group's evidence (t, E) plus (decayed) that of the groups below it in this
        forward; records the result as the evidence below the next group. Off outside a model forward."""
        mode = self.cfg.depth_evidence
        if mode == "none" or not self.active:
            return ev
        below = self.below if self.below is not None and self.below.shape == ev.shape else None
        total = routing.accumulate(ev, below, 1.0 if mode == "cumulative" else self.cfg.depth_decay)
        finite = torch.isfinite(total)
        self.below = torch.where(finite, total, 0.0 if below is None else below)  # an absent expert keeps its sum
        return total


def layout_group(members: list[RoutedLinear]) -> None:
    """One GEMM for an input group: the members' base weights and their experts' V^T stacked in one matrix,
    W_group = [W_1; ...; W_M; V_1^T; ...; V_M^T] (on the lead, the group's first member), so that x @ W_group^T
    gives every member's base output and every score projection at once (for q, k, v: one GEMM where the
    base model runs three, plus none for scoring). No copy is kept: each member's base weight, V^T and U Sigma
    become views of the lead's W_group / US_group (same values; unload_bundle gives the weights their own
    storage back; copy.deepcopy clones parameters, so a deep copy holds both, of equal value). Only for bias-free nn.Linear members whose weights match the bank in dtype and device;
    other groups keep the per-module path."""
    lead = members[0]
    lead.W_group = lead.US_group = None
    bases = [m.base_layer for m in members]
    if not all(type(b) is nn.Linear and b.bias is None for b in bases):
        return
    W = [b.weight for b in bases]
    ref = lead.Vt
    if not ref.is_floating_point() or ref.device.type == "meta" or any(
            w.dtype != ref.dtype or w.device != ref.device or w.shape[1] != ref.shape[1]
            or m.Vt.dtype != ref.dtype or m.US.dtype != ref.dtype for w, m in zip(W, members)):
        return
    with torch.no_grad():
        lead.W_group = torch.cat([w.detach() for w in W] + [m.Vt for m in members])
        lead.US_group = torch.cat([m.US.T for m in members], dim=1).T  # transposed, as each member's
    outs = [w.shape[0] for w in W]
    lead.group_outs, lead.group_n = outs, sum(outs)
    lead.group_starts = [sum(outs[:i]) for i in range(len(outs))]
    # expand_group's column blocks, one member per block: rows as they come (decode), rows sorted (prefill)
    lead.group_bn = next((b for b in (64, 32, 16) if all(o % b == 0 for o in lead.group_starts)), None)
    lead.group_bn_sorted = next((b for b in (256, 128, 64, 32, 16) if all(o % b == 0 for o in lead.group_starts)),
                                None)
    _bind_group(members)


def _gemm_weight(u: torch.Tensor) -> torch.Tensor:
    """u, or under torch.compile on a CPU a contiguous copy: there Inductor's C++ GEMM template (max-autotune with
    freezing, torch 2.13) reads a weight that starts at a storage offset (a group member's U Sigma view) from the
    wrong place: wrong outputs. With freezing the copy is folded into the constants. (Dynamo cannot trace
    storage_offset(), so every CPU weight is copied.)"""
    if not u.is_cuda and torch.compiler.is_compiling():
        return u.contiguous()
    return u


def _bind_group(members: list[RoutedLinear]) -> None:
    """Point every member's base weight, V^T and U Sigma (and the lead's Vt_group) into the lead's W_group /
    US_group (after layout_group, and again after model.to(...) moved them)."""
    lead = members[0]
    W, U = lead.W_group, lead.US_group
    o = 0
    for m in members:
        n = m.base_layer.weight.shape[0]
        m.base_layer.weight.data = W[o:o + n]
        m.US = U[o:o + n]
        o += n
    for m in members:
        n = m.Vt.shape[0]
        m.Vt = W[o:o + n]
        o += n
    if len(members) > 1 and getattr(lead, "Vt_group", None) is not None:
        lead.Vt_group = W[lead.group_n:]


def _bind_stacked(members: list[RoutedLinear]) -> None:
    """Point every member's S, rank and s at its row of the lead's stacked S_group / rank_group / s_group, so a
    change to one (e.g. m.s.zero_() to silence the experts) is the group's too (after link and model.to)."""
    lead = members[0]
    for i, m in enumerate(members):
        for f in ("S", "rank", "s"):
            setattr(m, f, getattr(lead, f"{f}_group")[i])


def quantize_scoring(owner: RoutedLinear) -> None:
    """scoring="fp8": V^T in float8 with one scale per direction (routing.quantize_rows) on the module that owns
    its input group's stacked V^T (the lead's Vt_group) or its own; members read their rows of it, so the plain
    path and the group GEMM score with the same numbers. Made again after a dtype change (model.to)."""
    Vt = owner.Vt_group if len(owner.siblings) > 1 and getattr(owner, "Vt_group", None) is not None else owner.Vt
    with torch.no_grad():
        q, scale = routing.quantize_rows(Vt)
    owner.Vt8, owner.Vt8_scale = q, scale.T.contiguous()
    # every slice scored (the group, each member) must suit the fp8 GEMM; decided here, not in a traced forward
    rows = [(m.vt_offset, m.Vt.shape[0]) for m in owner.siblings] if Vt is not owner.Vt else []
    owner.fp8_native = all(routing.fp8_native(Vt[o:o + n]) for o, n in [(0, Vt.shape[0]), *rows])


def _quantizer(x: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """The Triton row quantizer for fp8 scoring, eager on a GPU (under torch.compile Inductor fuses
    routing.quantize_rows' ops itself); None: routing.quantize_rows."""
    if x.is_cuda and kernels.quantize_rows is not None and not torch.compiler.is_compiling():
        return kernels.quantize_rows
    return None


def release_group(members: list[RoutedLinear]) -> None:
    """Give each member's base weight its own storage again (unload_bundle)."""
    for m in members:
        w = m.base_layer.weight
        w.data = w.data.clone()


def _base_names(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
    inner = prefix + "base_layer."
    for key in [k for k in state if k.startswith(inner)]:
        state[prefix + key[len(inner):]] = state.pop(key)


def _wrapped_names(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    own = set(module.base_layer.state_dict())
    for key in [k for k in state if k.startswith(prefix) and k[len(prefix):] in own]:
        state[prefix + "base_layer." + key[len(prefix):]] = state.pop(key)


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
        self.group, self.layer, self.kind = group_key(name), layer_of(name), block_kind(name)
        self._calib: dict[str, torch.Tensor] = {}  # calibrate mode -> c_e (E,), computed on first use
        # Buffers follow model.to(); not persistent, so the model's state_dict keeps only base weights.
        self.register_buffer("Vt", bank["Vt"], persistent=False)
        # U Sigma (d_out, E*r) stored transposed: each expert's r rows of (U Sigma)^T are contiguous, which the
        # gathered apply reads 6-10% faster (H200, bench_apply.py); C @ US.T reads it as a plain row-major matrix
        self.register_buffer("US", (bank["U"] * bank["S"].reshape(1, -1)).T.contiguous().T, persistent=False)
        self.register_buffer("S", bank["S"], persistent=False)
        self.register_buffer("s", bank["scaling"], persistent=False)
        self.register_buffer("rank", bank["rank"], persistent=False)
        self.complete = bool((bank["rank"] > 0).all())  # every expert adapts this module: no -inf scores
        self.routing_state = state if state is not None else ForwardState(cfg)
        # The fused path's static plan (ForwardState.link fills it in): input group, slot in it, the rest
        # of the layer; pending/layer_idx carry a sibling's decision to this module within one forward.
        self.siblings: list[RoutedLinear] = [self]
        self.slot = 0
        self.layer_rest: list[RoutedLinear] = []
        self.pending: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self.layer_idx: torch.Tensor | None = None
        # The group GEMM (layout_group): on the lead, the stacked weights; pending_out hands a sibling its
        # output (input, output, choices, values) within one forward.
        self.register_buffer("W_group", None, persistent=False)
        self.register_buffer("US_group", None, persistent=False)
        self.pending_out: tuple | None = None
        # scoring="fp8" (quantize_scoring), on the owner of the stacked V^T: V^T in float8 and its scales (1, N);
        # vt_offset is this module's first row in it
        self.register_buffer("Vt8", None, persistent=False)
        self.register_buffer("Vt8_scale", None, persistent=False)
        self.vt_offset, self.fp8_native = 0, True
        self.routing_state.register(self)
        # The model's state_dict keeps the base model's names (q_proj.weight, not q_proj.base_layer.weight), so a
        # routed model saves and loads its base weights like the plain model does.
        self.register_state_dict_post_hook(_base_names)
        self.register_load_state_dict_pre_hook(_wrapped_names)

    def _apply(self, fn: Any, recurse: bool = True) -> RoutedLinear:
        """model.to(...) moves each tensor on its own; the lead then points its group's views into the moved
        W_group / US_group again (a sibling moved later finds its views already in place: nothing to move)."""
        super()._apply(fn, recurse)
        if self.W_group is not None:
            _bind_group(self.siblings)
        if getattr(self, "S_group", None) is not None:
            _bind_stacked(self.siblings)
        if self.Vt8 is not None:  # model.to(dtype) would leave a bf16 copy; a new device may lack fp8 GEMMs
            quantize_scoring(self)
        return self

    def _scores(self, P: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return routing.scores(P, self.S, self.rank, router=cfg.router, score=cfg.score,
                              rank_normalize=cfg.rank_normalize, complete=self.complete)

    def calibration(self) -> torch.Tensor:
        """c_e (E,) for the configured calibrate mode (routing.calibration), on the module's device."""
        mode = self.cfg.calibrate
        if mode not in self._calib:
            weight = getattr(self.base_layer, "weight", None) if mode == "base_weight" else None
            self._calib[mode] = routing.calibration(self.Vt, self.rank, self.E, weight, mode)
        c = self._calib[mode]
        if c.device != self.Vt.device:
            c = self._calib[mode] = c.to(self.Vt.device)
        return c

    def _cosine(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Selection evidence before any averaging: g / ||x||, divided by c_e when calibrating."""
        ev = routing.cosine(g, x)
        return ev if self.cfg.calibrate == "none" else ev / self.calibration()

    def _evidence(self, x: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, own scores g, selection evidence): g / ||x|| (calibrated), averaged over tokens when smoothing or
        with prompt_mean; both restricted to the allowed experts (the average itself runs over every expert,
        so a mask change is seen at once)."""
        P = self._project(x)
        g = self._scores(P)
        ev = self._cosine(g, x)
        if self.cfg.over_tokens():
            ev = self.routing_state.smooth(self, ev, shape)
        allowed = self.routing_state.allowed(self, x.shape[0])
        return P, routing.restrict(g, allowed), routing.restrict(ev, allowed)

    def _choose(
        self, x: torch.Tensor, shape: tuple[int, int], source: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, own scores g, chosen experts (t, k)) under the pool/smooth/depth options."""
        cfg, st = self.cfg, self.routing_state
        if cfg.attn_follows_mlp and st.active and self.kind == "attn":
            idx = st.mlp_choice.get(self.layer - 1)
            if idx is not None and idx.shape[0] == x.shape[0]:  # the layer below's MLP decided for this token
                P = self._project(x)
                return P, routing.restrict(self._scores(P), st.allowed(self, x.shape[0])), idx
        if cfg.pool == "module":
            P, g, ev = self._evidence(x, shape)
            idx = routing.select(st.across_depth(ev), st.top_k(self, x.shape[0]))[1]
            self._note_mlp_choice(idx)
            return P, g, idx
        hit = st.groups.get(self.group) if st.active else None
        if cfg.pool == "layer" and st.active and self.layer in st.layers:
            idx = st.layers[self.layer]  # an earlier group of this layer decided
            if idx.shape[0] != x.shape[0]:
                raise ValueError(f"pool='layer': module {self.name} sees {x.shape[0]} tokens, its layer decided "
                                 f"for {idx.shape[0]}")
            if hit is not None and hit[0] is source:
                P, g = hit[1][self.name]
            else:
                P = self._project(x)
                g = routing.restrict(self._scores(P), st.allowed(self, x.shape[0]))
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
            pooled = st.across_depth(routing.pool(evidence))
            hit = (source, results, routing.select(pooled, st.top_k(self, x.shape[0]))[1])
            self._note_mlp_choice(hit[2])
            if st.active:
                st.groups[self.group] = hit
                if cfg.pool == "layer":
                    st.layers[self.layer] = hit[2]
        P, g = hit[1][self.name]
        return P, g, hit[2]

    def _note_mlp_choice(self, idx: torch.Tensor) -> None:
        """attn_follows_mlp: the first MLP decision of a layer (the gate/up input group) is the one the next
        layer's attention follows."""
        st = self.routing_state
        if self.cfg.attn_follows_mlp and st.active and self.kind == "mlp":
            st.mlp_choice.setdefault(self.layer, idx)

    def _decision(self, x: torch.Tensor, shape: tuple[int, int] | None, source: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, top-k scores, top-k experts) of a scoring router (spectr, arrow) for x (t, d_in)."""
        st, t = self.routing_state, x.shape[0]
        if self.cfg.evidence_path():
            P, g, idx = self._choose(x, shape or (1, t), x if source is None else source)
            return P, routing.cut(g.gather(1, idx), st.top_k(self, t)), idx
        # the reference: each module decides on its own
        P = self._project(x)
        g = routing.restrict(self._scores(P), st.allowed(self, t))
        return (P, *routing.select(g, st.top_k(self, t)))

    def decide(self, x: torch.Tensor, shape: tuple[int, int] | None = None, source: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, experts), each (t, k): what delta() would pick for x (t, d_in), without applying it (an
        evaluation can watch several routers on one forward). shape and source as for delta()."""
        if self.cfg.router not in ("spectr", "arrow"):
            raise ValueError(f"decide: router {self.cfg.router!r} does not score experts; use spectr or arrow")
        _, vals, idx = self._decision(x.to(self.Vt.dtype), shape, source)
        return vals, idx

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
            dy = routing.apply_fixed(x, self.Vt, self.US, self.s, cfg.expert, E)
            allowed = self.routing_state.allowed(self, x.shape[0])
            if allowed is not None:  # tokens that may not use the fixed expert get no delta
                dy = dy * allowed[..., cfg.expert, None].to(dy.dtype)
            return dy, None, None
        vals = idx = None
        if cfg.router in ("spectr", "arrow"):
            P, vals, idx = self._decision(x, shape, source)
            w = routing.weights(vals, idx, E, mode=cfg.weighting, temperature=cfg.temperature)
        else:
            P = routing.project(x, self.Vt, E)
            w = routing.all_weights(x.shape[0], self.rank, self.routing_state.allowed(self, x.shape[0]))
        C = routing.coefficients(P, w, self.S, self.s, combine=cfg.combine)
        k = E if idx is None else idx.shape[1]
        dense = cfg.apply == "dense" or (
            cfg.apply == "auto" and (self.Vt.shape[0] <= cfg.dense_max or 2 * k >= E)
        )
        dy = routing.apply_dense(C, self.US) if dense else routing.apply_grouped(C, w, self.US)
        return dy, vals, idx

    # ---- the fused path: the same decisions, static bookkeeping, fewer kernels ----------------------------

    def _group(self) -> list[RoutedLinear]:
        return [self] if self.cfg.pool == "module" else self.siblings

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """P (t, E, r) = every expert's V_e^T x for a scoring router, in the configured precision."""
        if self.cfg.scoring == "fp8":
            return routing.project_fp8(x, *self._fp8([self]), quantize=_quantizer(x)).to(x.dtype).view(
                x.shape[0], self.E, -1)
        return routing.project(x, self.Vt, self.E)

    def _fp8(self, members: list[RoutedLinear]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(V^T in float8, its scales (1, N), whether the fp8 GEMM runs there) of these members (the whole group,
        or this module alone); made on first use unless load_bundle/set_router made them (a compiled forward
        needs them made before)."""
        lead = self.siblings[0]
        owner = lead if len(self.siblings) > 1 and getattr(lead, "Vt_group", None) is not None else self
        if owner.Vt8 is None:
            quantize_scoring(owner)
        if len(members) > 1:
            return owner.Vt8, owner.Vt8_scale, owner.fp8_native
        o, n = self.vt_offset if owner is not self else 0, self.Vt.shape[0]
        return owner.Vt8[o:o + n], owner.Vt8_scale[:, o:o + n], owner.fp8_native

    def _project_group(self, members: list[RoutedLinear], x: torch.Tensor) -> torch.Tensor:
        """Every member's projections side by side, (t, sum of E*r): one GEMM against the group's stacked V^T."""
        lead = members[0]
        if len(members) > 1 and getattr(lead, "Vt_group", None) is None:  # no stacked V^T: one GEMM per member
            return torch.cat([m._project(x).flatten(1) for m in members], dim=1)
        if self.cfg.scoring == "fp8":
            return routing.project_fp8(x, *self._fp8(members), quantize=_quantizer(x)).to(x.dtype)
        return x @ (lead.Vt_group if len(members) > 1 else self.Vt).T

    def _stacked(self, members: list[RoutedLinear]) -> tuple | None:
        """(S, rank, s) stacked over the group, (M, E, r) / (M, E), when its members' banks have one shape (then
        the group decides in one routing.route call); None otherwise."""
        if len(members) == 1:
            return self.S.unsqueeze(0), self.rank.unsqueeze(0), self.s.unsqueeze(0)
        lead = members[0]
        return (lead.S_group, lead.rank_group, lead.s_group) if hasattr(lead, "S_group") else None

    def _decide_group(self, x: torch.Tensor, shape: tuple[int, int], P: torch.Tensor | None = None) -> list[tuple]:
        """(C (t, E*r), vals, idx, None) for every member of this module's group, from one shared decision.
        P: the group's projections (t, sum of E*r) when the caller has them (the group GEMM).

        The same choices as the plain path: selection on the pooled scores of the group (the plain path
        divides every member's scores by the same ||x||, which ranks alike, so only smoothing needs it)."""
        cfg, st, t = self.cfg, self.routing_state, x.shape[0]
        members = self._group()
        allowed = st.allowed(self, t)
        if P is None and self._kernel_ok(x):
            return self._decide_group_kernel(members, x, allowed)
        if P is None:
            P = self._project_group(members, x)
        k = st.top_k(self, t)
        stacked = self._stacked(members) if cfg.router in ("spectr", "arrow") and cfg.smooth == 0 \
            and cfg.calibrate == "none" and cfg.pool != "layer" else None
        if stacked is not None:  # the whole group in one call: a few ops instead of a dozen per member
            M = len(members)
            C, vals, idx = routing.route(
                P.view(t, M, self.E, -1), *stacked, k, allowed, router=cfg.router, score=cfg.score,
                rank_normalize=cfg.rank_normalize, weighting=cfg.weighting, temperature=cfg.temperature,
                combine=cfg.combine, complete=all(m.complete for m in members))
            return [(C[:, m].reshape(t, -1), vals[:, m], idx, None) for m in range(M)]
        Ps = [p.view(t, m.E, -1) for m, p in zip(members, P.split([m.Vt.shape[0] for m in members], dim=1))]
        if cfg.router == "uniform":
            return [(routing.coefficients(P, routing.all_weights(t, m.rank, allowed), m.S, m.s,
                                          combine=cfg.combine).reshape(t, -1), None, None, None)
                    for m, P in zip(members, Ps)]
        gs = [m._scores(P) for m, P in zip(members, Ps)]
        evs = gs
        if cfg.calibrate != "none":  # calibrated evidence: ranks unlike the raw scores
            evs = [m._cosine(g, x) for m, g in zip(members, gs)]
        if cfg.smooth > 0:
            evs = [st.smooth(m, m._cosine(g, x), shape) for m, g in zip(members, gs)]
        gs = [routing.restrict(g, allowed) for g in gs]
        idx = self.layer_idx if cfg.pool == "layer" else None  # an earlier group of this layer decided
        if idx is None or idx.shape[0] != t:
            evs = [routing.restrict(e, allowed) for e in evs]
            complete = allowed is None and all(m.complete for m in members)
            idx = routing.select(evs[0] if len(evs) == 1 else routing.pool(evs, complete), k)[1]
            if cfg.pool == "layer" and st.active:
                for m in self.layer_rest:
                    m.layer_idx = idx
        out = []
        for m, P, g in zip(members, Ps, gs):
            vals = routing.cut(g.gather(1, idx), k)
            w = routing.weights(vals, idx, m.E, mode=cfg.weighting, temperature=cfg.temperature)
            out.append((routing.coefficients(P, w, m.S, m.s, combine=cfg.combine).reshape(t, -1), vals, idx, None))
        return out

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        """Whether this module's group decides in the Triton routing kernel for input x."""
        cfg = self.cfg
        # the kernel has one static k: a per-token k (set_token_top_k) takes the torch code
        return (x.is_cuda or kernels.INTERPRET) and kernels.route is not None and cfg.router in ("spectr", "arrow") \
            and cfg.smooth == 0 and cfg.calibrate == "none" and cfg.pool != "layer" \
            and self.routing_state.token_k is None and (cfg.pool == "module" or len(self.siblings) == 1 or hasattr(self.siblings[0], "S_group"))

    def _gathers(self, x: torch.Tensor) -> bool:
        """Whether the fused path applies only the chosen experts (kernels.expand) for input x."""
        cfg = self.cfg
        if cfg.apply not in ("auto", "gathered") or kernels.expand is None or not self._kernel_ok(x):
            return False
        # auto: top-1 only. Rows are sorted by their first choice, so with k > 1 a block of rows meets most experts
        # (H200, E=64, k=4 module-pooled: 2.19x the base gathered against 1.36x dense)
        return cfg.apply == "gathered" or (cfg.gather_min is not None and self.Vt.shape[0] >= cfg.gather_min
                                           and cfg.top_k == 1 and 2 * cfg.top_k < self.E)

    def _decide_group_kernel(self, members: list[RoutedLinear], x: torch.Tensor,
                             allowed: torch.Tensor | None) -> list[tuple]:
        """_decide_group in one Triton launch after the group's scoring GEMM (kernels.py)."""
        cfg, lead, M = self.cfg, members[0], len(members)
        P = self._project_group(members, x)
        S, rank, s = self._stacked(members)  # _kernel_ok: a group of several has them stacked
        compact = self._gathers(x)
        # gathered: the kernel also files the rows by first choice, one row order for the group's applies
        order = kernels.new_order(x.shape[0], self.E, x.device) if compact else None
        C, idx, vals = kernels.route(P, S, rank, s, allowed, M=M, E=self.E, k=cfg.top_k, router=cfg.router,
                                     score=cfg.score, rank_normalize=cfg.rank_normalize, weighting=cfg.weighting,
                                     temperature=cfg.temperature, combine=cfg.combine, compact=compact, order=order)
        if compact:  # (t, M, k, r): each member's chosen coefficients
            return [(C[:, m], vals[:, m], idx, order) for m in range(M)]
        Cs = C.split(lead.group_sizes, dim=1) if M > 1 else (C,)
        return [(Cm, vals[:, m], idx, None) for m, Cm in enumerate(Cs)]

    def _fused_coefficients(self, x: torch.Tensor, shape: tuple[int, int]) -> tuple:
        """This module's (C, vals, idx): handed over by the sibling that decided first, or decided here
        (then handed to the siblings, within a model forward)."""
        got = self.pending
        if got is not None:
            self.pending = None
            if got[0].shape[0] == x.shape[0]:
                return got
        results = self._decide_group(x, shape)
        if self.routing_state.active:
            for i, m in enumerate(self._group()):
                if i != self.slot:
                    m.pending = results[i]
        return results[self.slot if len(results) > 1 else 0]

    def _fused_forward(self, x: torch.Tensor, y: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        cfg = self.cfg
        xf = x.reshape(-1, x.shape[-1]).to(self.Vt.dtype)
        y2 = y.reshape(-1, y.shape[-1])
        if cfg.router == "fixed":
            e, r = cfg.expert, self.Vt.shape[0] // self.E
            C = xf @ self.Vt[e * r:(e + 1) * r].T * self.s[e]
            allowed = self.routing_state.allowed(self, xf.shape[0])
            if allowed is not None:
                C = C * allowed[..., e, None].to(C.dtype)
            US = self.US[:, e * r:(e + 1) * r]
            idx = vals = None
        else:
            C, vals, idx, perm = self._fused_coefficients(xf, shape)
            US = self.US
        self._record(idx, vals, x.shape[:-1])
        if C.dim() == 3:  # compact (t, k, r): the gathered apply, in place (a copy first under autograd)
            y2 = y2.clone() if y.requires_grad else y2
            return kernels.expand(y2, C, idx, self.US, perm).view_as(y)
        if cfg.apply == "grouped" and idx is not None:  # in place as well
            y2 = y2.clone() if y.requires_grad else y2
            return routing.apply_sorted(y2, C.view(C.shape[0], self.E, -1), idx, US).view_as(y)
        # y += C US^T in one GEMM whose epilogue adds into the base output: in place, so y is read and written
        # once (out of place, addmm first copies y); autograd keeps the out-of-place form
        US = _gemm_weight(US)
        if y.requires_grad:
            return torch.addmm(y2, C.to(y.dtype), US.T.to(y.dtype)).view_as(y)
        return y2.addmm_(C.to(y.dtype), US.T.to(y.dtype)).view_as(y)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """The fused path applies densely, gathered (kernels.expand) or, for apply="grouped", sorted by expert in one
        grouped GEMM (routing.apply_sorted) where torch's grouped GEMM runs; elsewhere a grouped apply (also
        "auto" at large E*r without the kernels) takes the plain path, whose per-expert gathers have data-dependent
        shapes (not for torch.compile). So do the round-two options the fused path does not implement
        (prompt_mean, depth_evidence, attn_follows_mlp)."""
        cfg = self.cfg
        if cfg.impl != "fused" or cfg.plain_only():
            return False
        if cfg.apply == "grouped":  # fused where torch's grouped GEMM runs (routing.apply_sorted)
            return cfg.router in ("spectr", "arrow") and routing.sorted_ok(self.US, self.E)
        return cfg.apply in ("dense", "gathered") or self.Vt.shape[0] <= cfg.dense_max or 2 * cfg.top_k >= self.E \
            or self._gathers(x)

    def _group_ok(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether this call takes the group GEMM (_group_forward): a laid-out group deciding together (or a
        group of one), a router that scores, no autograd through the base weights (those stay the modules' own
        parameters for autograd's sake), x in the weights' dtype."""
        lead, cfg = self.siblings[0], self.cfg
        if lead.W_group is None or args or kwargs or cfg.router == "fixed" or cfg.pool == "layer" \
                or (cfg.pool == "module" and len(self.siblings) > 1) or x.dtype != lead.W_group.dtype:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.base_layer.weight.requires_grad):
            return False
        # Eager, at prefill sizes, the per-module path: the group's outputs are column slices of one matrix, and
        # eager elementwise kernels downstream (rotary, SiLU * up) run their slow strided variants on them (H200,
        # 8 x 512 tokens: 1.19x the base instead of 1.11x). Inductor reads the slices in its fused kernels.
        if not torch.compiler.is_compiling() and x.numel() > kernels.DECODE_MAX * x.shape[-1]:
            return False
        return self._fused_ok(x)

    def _group_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path for a laid-out input group: the first member called runs one GEMM against W_group
        (every member's base output and scores), decides for the group (Triton kernel on a GPU, routing.py's
        code elsewhere), applies every member's delta and hands each sibling its output; a sibling called with
        the same input returns it. On a GPU, at decode sizes and where apply="auto" gathers (_gathers), the apply
        is one expand_group launch for the whole group (only the chosen experts' U Sigma columns, in place);
        otherwise each member's dense apply
        (in place with addmm_ in eager; out of place under torch.compile, where Inductor fuses the add into the
        output's consumer instead of copying the base output first)."""
        dims = x.shape[:-1]
        got = self.pending_out
        if got is not None:
            self.pending_out = None
            if got[0] is x:
                self._record(got[2], got[3], dims)
                return got[1].view(*dims, -1)
        members, lead, cfg, st = self.siblings, self.siblings[0], self.cfg, self.routing_state
        xf = x.reshape(-1, x.shape[-1])
        t, M = xf.shape[0], len(members)
        if cfg.scoring == "fp8":  # the base outputs alone, the scores from the fp8 GEMM
            Y = xf @ lead.W_group[:lead.group_n].T
            P = self._project_group(members, xf)
        else:
            Y = xf @ lead.W_group.T
            P = Y[:, lead.group_n:]
        outs = list(Y[:, :lead.group_n].split(lead.group_outs, dim=1))
        Cs = None
        if self._kernel_ok(xf):
            S, rank, s = self._stacked(members)
            # Gathered: one expand_group launch into Y itself, at decode sizes and, under apply="auto"'s rule
            # (_gathers), at the larger sizes that reach this path (under torch.compile), with the rows filed by
            # first choice. (A per-member expand into a column slice of Y faulted under Inductor: session 9.)
            gathered = lead.group_bn is not None and kernels.expand_group is not None and cfg.apply != "dense" \
                and (t <= kernels.DECODE_MAX or self._gathers(xf))
            order = kernels.new_order(t, self.E, xf.device) if gathered else None
            C, idx, vals = kernels.route(P, S, rank, s, st.allowed(self, t), M=M, E=self.E, k=cfg.top_k,
                                         router=cfg.router, score=cfg.score, rank_normalize=cfg.rank_normalize,
                                         weighting=cfg.weighting, temperature=cfg.temperature, combine=cfg.combine,
                                         compact=gathered, order=order)
            vals_of = [vals[:, m] for m in range(M)]
            if gathered:
                kernels.expand_group(Y, C, idx, lead.US_group, lead.group_starts,
                                     lead.group_bn if order is None else lead.group_bn_sorted, order)
            else:
                Cs = C.split(lead.group_sizes, dim=1) if M > 1 else (C,)
        else:
            res = self._decide_group(xf, batch_shape(dims), P)
            Cs, idx, vals_of = [r[0] for r in res], res[0][2], [r[1] for r in res]
        if Cs is not None and cfg.apply == "grouped":
            for o, C, m in zip(outs, Cs, members):
                routing.apply_sorted(o, C.view(t, m.E, -1), idx, m.US)
        elif Cs is not None:
            if torch.compiler.is_compiling():
                outs = [o + C.to(o.dtype) @ _gemm_weight(m.US.T) for o, C, m in zip(outs, Cs, members)]
            else:
                for o, C, m in zip(outs, Cs, members):
                    o.addmm_(C.to(o.dtype), m.US.T)
        if st.active:
            for m, o, v in zip(members, outs, vals_of):
                if m is not self:
                    m.pending_out = (x, o, idx, v)
        self._record(idx, vals_of[self.slot], dims)
        return outs[self.slot].view(*dims, -1)

    def _record(self, idx: torch.Tensor | None, vals: torch.Tensor | None, dims: torch.Size) -> None:
        if self.recorder is not None and self.recorder.enabled and idx is not None:
            self.recorder.record(self.name, idx.view(*dims, -1), vals.view(*dims, -1))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._group_ok(x, args, kwargs):
            return self._group_forward(x)
        y = self.base_layer(x, *args, **kwargs)
        lead = x.shape[:-1]
        shape = batch_shape(lead)
        cfg = self.cfg
        if self._fused_ok(x):
            return self._fused_forward(x, y, shape)
        dy, vals, idx = self.delta(x.reshape(-1, x.shape[-1]), shape, x)
        self._record(idx, vals, lead)
        return y + dy.view(*lead, -1).to(y.dtype)
