"""The routing math of SpectR (Fleshman & Van Durme 2025), one token per row.

For expert i at one linear module: delta W_i = s_i U_i Sigma_i V_i^T (U: out x r, V: in x r).
A module's experts are stacked with ranks padded to r = max_i r_i by zero columns:
  Vt:  (E*r, d_in)   rows e*r .. e*r+r-1 are V_e^T      -> one GEMM gives every V_e^T x
  US:  (d_out, E*r)  columns e*r .. are U_e Sigma_e     -> one GEMM applies every expert
  S:   (E, r)        singular values, descending, zero-padded
  s:   (E,)          LoRA scaling per expert
  rank:(E,)          true rank; 0 where the expert does not adapt this module

Scores (how they compare): ||V^T x|| lies in [0, ||x||]; its square is the energy of x inside the
expert's input subspace. A random direction leaves a fraction r/d_in of its energy in a rank-r
subspace, so raw scores favour high ranks; the rank-normalised score ||V^T x|| / sqrt(r) has the
same expectation, ||x|| / sqrt(d_in), for every rank on random x. Arrow's |v_1^T x| uses only the
top direction and needs no normalising. Padding with zero directions changes no score.

Factor merge with unequal ranks: the canonical factors are merged column by column after padding
to r, i.e. z = sum_j w_j s_j V_j^T x in R^r and delta y = sum_i w_i U_i Sigma_i z; column c of a
rank-r_i expert is zero for c >= r_i, so those coordinates of z reach only higher-rank experts.

Pooling evidence (RouterConfig.pool, RouterConfig.smooth; both off by default = the reference code,
which decides independently per token, per module, per layer):
- Evidence. When an option is on, a module's selection uses its cosine scores g / ||x|| (a norm score is
  then the fraction of the token's norm inside the expert's subspace, in [0, 1]): per token this is the
  same ranking as g, but sums and averages of it no longer favour modules or tokens with large ||x||.
  Differences in rank still need rank_normalize, exactly as without pooling.
- pool="input": modules that read one input tensor (q, k, v; gate, up) share one decision per token,
  the top-k of the sum of their evidence. An expert missing from one module adds nothing there.
- pool="layer": one decision per layer per token. Causal, so it cannot wait for o_proj or down_proj
  (their inputs exist only later): the first input group the layer calls (q, k, v) decides for the
  whole layer, from its pooled evidence; every later module of the layer reuses that decision.
  (Decisions are shared within one forward of the model or its body; a module called on its own
  pools over its input group only.)
- smooth=a: a causal exponential moving average over tokens of each module's evidence,
  e'_t = (1 - a) e_t + a e'_{t-1}, with e'_0 = e_0 at the first real token of a prompt. Padding is
  transparent (the average passes through it unchanged), and during generate() the average is
  carried from one decode step to the next, so cached and uncached generation route alike. At a
  domain switch at token t0, where the new expert's evidence margin is m_new after and the old one's
  m_old before, the decision flips at token t0 + n for the first n with a^(n+1) < m_new / (m_old + m_new)
  (a = 0.5, equal margins: n = 1): smoothing trades a delay of n tokens at a boundary for decisions
  that no longer flicker on single ambiguous tokens.
- Weights (uniform 1/k or softmax) always come from the module's own current scores at the chosen
  experts; pooling and smoothing change which experts are chosen, not how a module mixes them.
- A per-token k (set_token_top_k): select() ranks every expert and cut() sets the ranks past each token's
  k to -inf, so a token's choices, weights and counted decisions are those of top_k = k_t, at static shapes.

Round two (RouterConfig fields; all off by default, docs/RESULTS.md has the measurements):
- Calibration from the weights alone (calibrate): the selection evidence of expert e at a module is divided
  by c_e, the score a "typical" unit input would get, so an expert whose subspace happens to lie along
  directions every input has does not win everywhere:
    "isotropic":   c_e = sqrt(r_e / d_in), the expected ||V_e^T x|| of a random unit x (rank_normalize,
                   scaled so that every module's calibrated evidence is about 1 on random input);
    "base_weight": c_e = ||W V_e||_F / ||W||_F, the expected ||V_e^T x|| when x is drawn from the base
                   weight's own input directions (the rows of W, weighted by their norms): the share of
                   what the base module reads that falls inside the expert's subspace.
  Calibrated evidence (g / ||x||) / c_e is about 1 where an input is "as expected" for the expert, above
  where it is aligned with the expert's subspace more than the base's inputs usually are.
- A running mean over the prompt (prompt_mean=w): e'_t = (1 - w) e_t + w m_t, m_t the mean of the
  evidence of the real tokens 1..t of the text so far (padding skipped; carried across decode steps
  like smooth). w = 1 is the pure mean: stable on long single-domain texts, but after a switch at t0
  it needs about as many new tokens as there were old ones; w < 1 keeps a share of the token's own say.
- Evidence across depth (depth_evidence): within one forward, the decision groups are called in depth
  order (layer 0 attention, layer 0 MLP, layer 1 ...), each with its own evidence D_g (t, E). With
  "cumulative" a group decides on A_g = D_g + A_{g-1}, with "decayed" on A_g = D_g + d A_{g-1}
  (d = depth_decay): a token's decision at a module uses the evidence that the same token gave at the
  modules below it, never a later token's or a later module's (causal in depth and time).
- attn_follows_mlp: the attention modules of layer l (q, k, v, o) take the decision that layer l-1's
  MLP input group (gate, up) made for the same token; layer 0 decides on its own evidence.

Measured on the real SmolLM2 library (8 experts, k = 4, CPU; small sample: 2 test documents per
domain x 128 tokens, switching on 8 domain pairs x 2 sequences): top-1 accuracy / mean tokens to
switch: reference 0.538 / 6.5, input 0.585 / 6.5, layer 0.559 / 5.6, smooth 0.5 0.592 / 7.4,
input + smooth 0.5 0.640 / 8.5. Input pooling helps without slowing the switch; smoothing buys
accuracy with 1-2 tokens of delay. ema() over 2048 tokens x 8 experts takes about 0.3 ms.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

ROUTERS = ("spectr", "arrow", "uniform", "fixed")
SCORES = ("norm", "sigma")
WEIGHTS = ("uniform", "softmax")
COMBINES = ("factor", "mix")
POOLS = ("module", "input", "layer")
CALIBRATIONS = ("none", "isotropic", "base_weight")
DEPTH_EVIDENCE = ("none", "cumulative", "decayed")
SCORINGS = ("exact", "fp8")  # the precision of the scoring GEMM (RouterConfig.scoring)


def project(x: torch.Tensor, Vt: torch.Tensor, E: int) -> torch.Tensor:
    """P[t, e, :] = V_e^T x_t for all experts with one GEMM. x: (t, d_in) -> (t, E, r)."""
    return (x @ Vt.T).view(x.shape[0], E, -1)


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # float8 e4m3's largest finite value


def quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (n, d) in float8 e4m3 with one float32 scale per row (n, 1): a ~ a8 * scale, each row's largest
    entry at FP8_MAX (a zero row keeps a tiny scale)."""
    scale = a.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
    return (a.float() / scale).to(FP8), scale


def fp8_native(Vt: torch.Tensor) -> bool:
    """Whether torch._scaled_mm runs x @ Vt^T in float8: on a CUDA GPU of compute capability 8.9+ (Ada, Hopper)
    with both widths multiples of 16. Not on a CPU: there some torch versions (2.11) take per-tensor scales only,
    and float8 is no faster there."""
    if not Vt.is_cuda:
        return False
    return torch.cuda.get_device_capability(Vt.device) >= (8, 9) and Vt.shape[0] % 16 == 0 and Vt.shape[1] % 16 == 0


def project_fp8(x: torch.Tensor, Vt8: torch.Tensor, v_scale: torch.Tensor, native: bool = True,
                quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """x @ V^T (t, N) from one float8 GEMM (scoring="fp8"): x quantized per token, Vt8 (N, d_in) per direction
    with v_scale (1, N); bf16 out (what row-wise scaled fp8 GEMMs produce). About 4% relative error per entry
    on random data; Hopper GPUs run it at twice the bf16 rate. native=False (fp8_native): the same numbers
    from the dequantized factors. quantize: quantize_rows or a kernel computing the same (kernels.py)."""
    x8, xs = (quantize or quantize_rows)(x)
    if not native:
        return ((x8.float() * xs) @ (Vt8.float() * v_scale.T).T).to(torch.bfloat16)
    return torch._scaled_mm(x8, Vt8.T, scale_a=xs, scale_b=v_scale, out_dtype=torch.bfloat16)


def scores(
    P: torch.Tensor,
    S: torch.Tensor,
    rank: torch.Tensor,
    *,
    router: str = "spectr",
    score: str = "norm",
    rank_normalize: bool = False,
    complete: bool = False,
) -> torch.Tensor:
    """Routing scores (t, E) in float32; -inf for experts that do not adapt this module (complete: every
    expert adapts it, nothing to set). Stacked modules: P (t, M, E, r), S (M, E, r), rank (M, E) -> (t, M, E).

    spectr: ||V_e^T x|| ("norm") or ||Sigma_e V_e^T x|| ("sigma"); arrow: |v_e1^T x|.
    """
    P32 = P.float()
    if router == "arrow":
        g = P32[..., 0].abs()
    elif score == "sigma":
        g = (P32 * S.float()).norm(dim=-1)
    elif score == "norm":
        g = P32.norm(dim=-1)
    else:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
    if rank_normalize and router != "arrow":
        g = g / rank.clamp(min=1).float().sqrt()
    return g if complete else g.masked_fill(rank == 0, float("-inf"))


def restrict(g: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Scores or evidence (t, E) with the experts a token may not use set to -inf (never weighted).

    allowed: bool (t, E) or (E,) (set_expert_mask); None = every expert.
    """
    return g if allowed is None else g.masked_fill(~allowed, float("-inf"))


def select(g: torch.Tensor, k: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token: (values, indices), each (t, k).

    k per token, an int tensor (t,) (set_token_top_k): every expert is ranked, so the shape stays (t, E)
    whatever the k (static, no host sync), and the values past each token's own k are -inf (cut()).
    """
    if isinstance(k, torch.Tensor):
        vals, idx = torch.topk(g, g.shape[1], dim=1)
        return cut(vals, k), idx
    return torch.topk(g, min(k, g.shape[1]), dim=1)


def cut(vals: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Ranked choices (t, K) with the ranks >= k_t of each token set to -inf: not chosen, never weighted,
    not counted as decisions. An int k (one for every token) changes nothing."""
    if not isinstance(k, torch.Tensor):
        return vals
    ranks = torch.arange(vals.shape[-1], device=vals.device)
    return vals.masked_fill(ranks >= k.to(vals.device).view(-1, *[1] * (vals.dim() - 1)), float("-inf"))


def weights(
    vals: torch.Tensor, idx: torch.Tensor, E: int, *, mode: str = "uniform", temperature: float = 1.0,
    complete: bool = False,
) -> torch.Tensor:
    """Dense (t, E) float32 weights, zero off the selected set (stacked modules: vals and idx (t, M, k) -> (t, M, E)).

    uniform: 1/k over the selected experts that adapt the module (the paper's code);
    softmax: softmax(score / temperature) over the selected set (Arrow).
    complete: every value is finite (every expert adapts the module, no mask, one k for all tokens).
    """
    if vals.shape[-1] == 1 and mode in WEIGHTS and complete:  # one choice, always valid: weight 1
        return vals.new_zeros(*vals.shape[:-1], E).scatter_(-1, idx, 1.0)
    valid = torch.isfinite(vals)
    if vals.shape[-1] == 1 and mode in WEIGHTS:  # one choice: weight 1 either way (0 where it is not allowed)
        w_sel = valid.float()
    elif mode == "uniform":
        w_sel = valid.float() / valid.sum(dim=-1, keepdim=True).clamp(min=1)
    elif mode == "softmax":
        w_sel = torch.softmax(vals / temperature, dim=-1).nan_to_num(0.0)
    else:
        raise ValueError(f"unknown weighting {mode!r}; expected one of {WEIGHTS}")
    return vals.new_zeros(*vals.shape[:-1], E).scatter_(-1, idx, w_sel)


def all_weights(t: int, rank: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The uniform router: every (allowed) expert that adapts the module, equal weights, whatever the scores."""
    present = (rank > 0).expand(t, -1)
    if allowed is not None:
        present = present & allowed
    present = present.float()
    return present / present.sum(dim=1, keepdim=True).clamp(min=1)


def coefficients(
    P: torch.Tensor, w: torch.Tensor, S: torch.Tensor, s: torch.Tensor, *, combine: str = "factor"
) -> torch.Tensor:
    """C (t, E, r) such that delta y_t = sum_e U_e Sigma_e C[t, e] (i.e. C.view(t, E*r) @ US^T); stacked
    modules: P (t, M, E, r), w (t, M, E), s (M, E) -> (t, M, E, r).

    mix:    C[t, e] = w_te s_e Sigma_e V_e^T x_t                              (output mix)
    factor: C[t, e] = w_te Sigma_e z_t,  z_t = sum_j w_tj s_j V_j^T x_t       (factor merge)
    (Sigma_e is folded into US, so here only the non-Sigma parts remain.)
    """
    ws = (w * s).to(P.dtype).unsqueeze(-1)  # (t, E, 1)
    if combine == "mix":
        return ws * P
    if combine == "factor":
        z = (ws * P).sum(dim=-2, keepdim=True)  # (t, 1, r)
        return w.to(P.dtype).unsqueeze(-1) * z
    raise ValueError(f"unknown combine {combine!r}; expected one of {COMBINES}")


def route(
    P: torch.Tensor,
    S: torch.Tensor,
    rank: torch.Tensor,
    s: torch.Tensor,
    k: int | torch.Tensor,
    allowed: torch.Tensor | None = None,
    *,
    router: str = "spectr",
    score: str = "norm",
    rank_normalize: bool = False,
    weighting: str = "softmax",
    temperature: float = 1.0,
    combine: str = "mix",
    complete: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decision for M modules that read one input (pool="input"; M = 1 decides alone), all at once.

    P (t, M, E, r): every member's projections; S (M, E, r), rank and s (M, E). The experts are the top-k of
    the pooled scores; each member weights them by its own scores. Returns C (t, M, E, r), the chosen
    experts' scores (t, M, k) and the experts (t, k): what kernels.route computes in one launch on a GPU.
    complete: every member has every expert (rank > 0), so only a mask can leave a score at -inf.
    """
    g = scores(P, S, rank, router=router, score=score, rank_normalize=rank_normalize, complete=complete)
    if allowed is not None:
        g = restrict(g, allowed.unsqueeze(-2))  # (t, 1, E) or (1, E): the same for every member
    M = g.shape[1]
    idx = select(g[:, 0] if M == 1 else pool(list(g.unbind(1)), complete and allowed is None), k)[1]
    each = idx.unsqueeze(1).expand(-1, M, -1)
    vals = cut(g.gather(2, each), k)
    finite = complete and allowed is None and not isinstance(k, torch.Tensor)
    w = weights(vals, each, P.shape[2], mode=weighting, temperature=temperature, complete=finite)
    return coefficients(P, w, S, s, combine=combine), vals, idx


def apply_fixed(x: torch.Tensor, Vt: torch.Tensor, US: torch.Tensor, s: torch.Tensor, e: int, E: int) -> torch.Tensor:
    """Plain LoRA of expert e: delta y = s_e U_e Sigma_e V_e^T x, touching only that expert's slices."""
    r = Vt.shape[0] // E
    cols = slice(e * r, (e + 1) * r)
    return (x @ Vt[cols].T * s[e]) @ US[:, cols].T


def apply_dense(C: torch.Tensor, US: torch.Tensor) -> torch.Tensor:
    """delta y = C @ US^T: one GEMM against all experts side by side (zero rows for unselected)."""
    return C.reshape(C.shape[0], -1) @ US.T


def apply_grouped(C: torch.Tensor, w: torch.Tensor, US: torch.Tensor) -> torch.Tensor:
    """delta y with one GEMM per expert over only the tokens that selected it."""
    t, E, r = C.shape
    out = C.new_zeros(t, US.shape[0])
    chosen = w != 0
    for e in range(E):
        rows = chosen[:, e].nonzero().squeeze(1)
        if rows.numel():
            out.index_add_(0, rows, C[rows, e] @ US[:, e * r : (e + 1) * r].T)
    return out


def apply_sorted(y: torch.Tensor, C: torch.Tensor, idx: torch.Tensor, US: torch.Tensor) -> torch.Tensor:
    """y += delta y in place, reading only the chosen experts' columns of U Sigma: apply_grouped's sum with static
    shapes and no host sync. The (token, choice) rows are sorted by expert, one grouped GEMM (torch._grouped_mm)
    multiplies each expert's rows by its U_e Sigma_e, and the products are added back by token.

    C: (t, E, r) coefficients (zero off the chosen experts); idx: (t, k) the chosen experts."""
    t, k = idx.shape
    E, r = C.shape[1], C.shape[2]
    rows = C.gather(1, idx.unsqueeze(-1).expand(t, k, r)).reshape(t * k, r)
    e = idx.reshape(-1)
    perm = e.argsort()
    ones = torch.ones_like(e, dtype=torch.int32)
    counts = torch.zeros(E, dtype=torch.int32, device=e.device).scatter_add_(0, e, ones)  # static shape: no bincount
    experts = US.view(US.shape[0], E, r).permute(1, 2, 0)  # (E, r, d_out), each U_e Sigma_e transposed
    out = torch._grouped_mm(rows[perm].to(US.dtype), experts, offs=counts.cumsum(0, dtype=torch.int32))
    return y.index_add_(0, perm // k, out.to(y.dtype))


def sorted_ok(US: torch.Tensor, E: int) -> bool:
    """Whether apply_sorted runs for U Sigma (d_out, E*r): torch has _grouped_mm, its operands' strides are whole
    16-byte multiples (the (t*k, r) coefficient rows and the experts' (E, r, d_out) view), and the weights are
    bf16 (its grouped GEMM's dtype on a GPU, and what torch.compile traces it with) or, eager on a CPU, any float."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    experts = US.view(US.shape[0], E, -1).permute(1, 2, 0)
    if any(st != 1 and (st * US.element_size()) % 16 for st in (*experts.stride(), experts.shape[1])):
        return False
    return US.dtype == torch.bfloat16 or (not US.is_cuda and not torch.compiler.is_compiling())


def cosine(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Scores per unit of token norm, g / ||x|| (t, E); -inf stays -inf, a zero token scores 0."""
    return g / x.float().norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def pool(evidence: list[torch.Tensor], complete: bool = False) -> torch.Tensor:
    """Sum of several modules' (t, E) evidence; an expert absent (-inf) from one module adds nothing
    there and stays -inf only where every module lacks it. complete: no -inf anywhere (every module has
    every expert, no mask), so the plain sum."""
    if complete:
        return sum(evidence[1:], evidence[0])
    present = torch.stack([torch.isfinite(e) for e in evidence]).any(0)
    total = sum(e.masked_fill(~torch.isfinite(e), 0.0) for e in evidence)
    return total.masked_fill(~present, float("-inf"))


def ema(
    e: torch.Tensor,
    a: float,
    real: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal moving average over tokens, e'_t = (1 - a) e_t + a e'_{t-1}, of e (B, T, E) (finite).

    real (B, T) bool marks real tokens (None: all): padding passes the average through unchanged.
    prev (B, E) / seen (B,) carry the average of earlier tokens (a decode step); without an earlier
    real token the first real one starts the average (e'_t = e_t). Returns (e', last e' (B, E), seen).
    Computed as a log-depth scan of y_t = c_t y_{t-1} + b_t: log2(T) vector steps, no loop over tokens.
    """
    B, T, _ = e.shape
    real = torch.ones(B, T, dtype=torch.bool, device=e.device) if real is None else real.to(e.device, torch.bool)
    before = (real.long().cumsum(1) - real.long()) > 0  # an earlier real token in this call
    if seen is not None:
        before = before | seen.to(e.device)[:, None]
    blend = real & before
    c = (~real).to(e.dtype).masked_fill(blend, a).unsqueeze(-1)  # (B, T, 1): a, 0 at a start, 1 on padding
    b = torch.where(blend.unsqueeze(-1), (1 - a) * e, torch.where(real.unsqueeze(-1), e, 0.0))
    d = 1
    while d < T:  # compose (c, b) pairs over distances 1, 2, 4, ...: b_t += c_t b_{t-d}, c_t *= c_{t-d}
        b = torch.cat([b[:, :d], b[:, d:] + c[:, d:] * b[:, :-d]], dim=1)
        c = torch.cat([c[:, :d], c[:, d:] * c[:, :-d]], dim=1)
        d *= 2
    if prev is not None:
        b = b + c * prev.to(b.dtype)[:, None]
    now_seen = real.any(1) if seen is None else real.any(1) | seen.to(e.device)
    return b, b[:, -1], now_seen


def calibration(Vt: torch.Tensor, rank: torch.Tensor, E: int, weight: torch.Tensor | None, mode: str) -> torch.Tensor:
    """c_e (E,) float32 for calibrate=mode (see above); 1 where an expert does not adapt the module.

    Vt: (E*r, d_in) stacked V_e^T; weight: the base module's W (d_out, d_in), needed by "base_weight".
    """
    d_in = Vt.shape[1]
    if mode == "none":
        return torch.ones(E)
    if mode == "isotropic":
        c = (rank.float() / d_in).sqrt()
    elif mode == "base_weight":
        if weight is None:
            raise ValueError("calibrate='base_weight' needs the base module's weight")
        W = weight.detach().float().to(Vt.device)
        energy = (Vt.float() @ W.T).view(E, -1, W.shape[0]).pow(2).sum(dim=(1, 2))  # ||W V_e||_F^2
        c = (energy / W.pow(2).sum().clamp(min=torch.finfo(torch.float32).tiny)).sqrt().cpu()
    else:
        raise ValueError(f"unknown calibrate {mode!r}; expected one of {CALIBRATIONS}")
    c = c.cpu()
    return torch.where(rank.cpu() > 0, c.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(c))


def running_mean(
    e: torch.Tensor,
    real: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal mean over the real tokens so far, m_t = (sum of e_s over real s <= t) / (their number), of e (B, T, E).

    prev (B, E) / count (B,) carry the sum and number of earlier real tokens (a decode step). Padding
    passes the mean of the tokens before it through (0 before any real token). Returns (m, sum, count).
    """
    B, T, _ = e.shape
    real = torch.ones(B, T, dtype=torch.bool, device=e.device) if real is None else real.to(e.device, torch.bool)
    total = (e * real.unsqueeze(-1).to(e.dtype)).cumsum(1)
    n = real.to(e.dtype).cumsum(1)
    if prev is not None:
        total = total + prev.to(e.dtype)[:, None]
        n = n + count.to(e.dtype)[:, None]
    m = total / n.clamp(min=1).unsqueeze(-1)
    return m, total[:, -1], n[:, -1]


def accumulate(evidence: torch.Tensor, below: torch.Tensor | None, decay: float) -> torch.Tensor:
    """A_g = D_g + decay * A_{g-1} over the experts present in D_g (depth_evidence); -inf stays -inf.

    below: the accumulated evidence of the groups below (finite, 0 for absent experts), or None.
    """
    if below is None:
        return evidence
    return evidence + decay * below.to(evidence.dtype)
