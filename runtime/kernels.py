"""Optional Triton kernel for the fused path on a GPU: score -> pool -> top-k -> weights -> coefficients.

One launch per input group replaces the twenty-odd small tensor ops of routing.py for that step (on a GPU
an eager forward is bound by their launches). It computes exactly what routing.py says, per token:
  g_me   = ||V_me^T x|| (or ||Sigma V^T x||, or Arrow's |v_1^T x|), / sqrt(rank) if rank-normalised,
           -inf where expert e does not adapt member m or the token may not use e (set_expert_mask);
  ev_e   = sum over members of the finite g_me (-inf where none is finite)  -- the pooled evidence;
  T      = top-k of ev (ties: lowest index first);
  w_me   = softmax(g_me / temperature) or 1/|finite| over T, 0 elsewhere;
  C_m    = w_m s_m P_m (output mix)  or  w_m (sum_e w_me s_me P_me) (factor merge).
Imported only where CUDA is present; `route` is None where Triton is missing (the torch code runs then).
"""
from __future__ import annotations

import torch

route = None

if torch.cuda.is_available():
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - a CUDA build without Triton: the torch path runs
        triton = None

    if triton is not None:

        @triton.jit
        def _route_kernel(P, S, rank, s, allowed, C, idx_out, vals_out, stride_p, stride_a, inv_temp,
                          M: tl.constexpr, E: tl.constexpr, R: tl.constexpr, EP: tl.constexpr, RP: tl.constexpr,
                          K: tl.constexpr, ARROW: tl.constexpr, SIGMA: tl.constexpr, RANK_NORM: tl.constexpr,
                          SOFTMAX: tl.constexpr, FACTOR: tl.constexpr, HAS_MASK: tl.constexpr):
            t = tl.program_id(0).to(tl.int64)
            e = tl.arange(0, EP)
            r = tl.arange(0, RP)
            e_ok = e < E
            er = e_ok[:, None] & (r[None, :] < R)
            offs = e[:, None] * R + r[None, :]
            ninf = float("-inf")
            if HAS_MASK:
                ok = e_ok & (tl.load(allowed + t * stride_a + e, mask=e_ok, other=0) != 0)
            else:
                ok = e_ok
            ev = tl.zeros([EP], tl.float32)
            present = e < 0  # all False
            for m in tl.static_range(M):  # pass 1: pooled evidence
                p = tl.load(P + t * stride_p + m * E * R + offs, mask=er, other=0.0).to(tl.float32)
                if ARROW:
                    g = tl.sum(tl.where(r[None, :] == 0, tl.abs(p), 0.0), axis=1)
                elif SIGMA:
                    sv = tl.load(S + m * E * R + offs, mask=er, other=0.0).to(tl.float32)
                    g = tl.sqrt(tl.sum(p * sv * p * sv, axis=1))
                else:
                    g = tl.sqrt(tl.sum(p * p, axis=1))
                rk = tl.load(rank + m * E + e, mask=e_ok, other=0).to(tl.float32)
                if RANK_NORM and not ARROW:
                    g = g / tl.sqrt(tl.maximum(rk, 1.0))
                has = (rk > 0) & ok
                ev += tl.where(has, g, 0.0)
                present = present | has
            # top-k on the pooled evidence: chosen -> -inf key, absent -> lowest finite key (picked last)
            key = tl.where(present, ev, -3.0e38)
            pos = tl.full([EP], -1, tl.int32)
            for k in tl.static_range(K):
                j = tl.argmax(key, axis=0)
                tl.store(idx_out + t * K + k, j.to(tl.int64))
                pos = tl.where(e == j, k, pos)
                key = tl.where(e == j, ninf, key)
            chosen = pos >= 0
            for m in tl.static_range(M):  # pass 2: each member's weights over the chosen, its coefficients
                p = tl.load(P + t * stride_p + m * E * R + offs, mask=er, other=0.0).to(tl.float32)
                if ARROW:
                    g = tl.sum(tl.where(r[None, :] == 0, tl.abs(p), 0.0), axis=1)
                elif SIGMA:
                    sv = tl.load(S + m * E * R + offs, mask=er, other=0.0).to(tl.float32)
                    g = tl.sqrt(tl.sum(p * sv * p * sv, axis=1))
                else:
                    g = tl.sqrt(tl.sum(p * p, axis=1))
                rk = tl.load(rank + m * E + e, mask=e_ok, other=0).to(tl.float32)
                if RANK_NORM and not ARROW:
                    g = g / tl.sqrt(tl.maximum(rk, 1.0))
                live = (rk > 0) & ok
                for k in tl.static_range(K):
                    v = tl.sum(tl.where((pos == k) & live, g, 0.0), axis=0)
                    any_k = tl.sum(((pos == k) & live).to(tl.int32), axis=0) > 0
                    tl.store(vals_out + (t * M + m) * K + k, tl.where(any_k, v, ninf))
                use = chosen & live
                if SOFTMAX:
                    top = tl.max(tl.where(use, g, ninf), axis=0)
                    top = tl.where(top == ninf, 0.0, top)
                    ex = tl.where(use, tl.exp((g - top) * inv_temp), 0.0)
                    w = ex / tl.maximum(tl.sum(ex, axis=0), 1e-30)
                else:
                    n = tl.sum(use.to(tl.float32), axis=0)
                    w = use.to(tl.float32) / tl.maximum(n, 1.0)
                ws = w * tl.load(s + m * E + e, mask=e_ok, other=0.0).to(tl.float32)
                if FACTOR:
                    z = tl.sum(ws[:, None] * p, axis=0)
                    c = w[:, None] * z[None, :]
                else:
                    c = ws[:, None] * p
                tl.store(C + t * stride_p + m * E * R + offs, c.to(C.dtype.element_ty), mask=er)

        def route(P: torch.Tensor, S: torch.Tensor, rank: torch.Tensor, s: torch.Tensor,
                  allowed: torch.Tensor | None, *, M: int, E: int, k: int, router: str, score: str,
                  rank_normalize: bool, weighting: str, temperature: float, combine: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """P (t, M*E*R) -> (C like P, idx (t, k) int64, vals (t, M, k) float32) for one input group.

            S (M, E, R), rank (M, E), s (M, E) on P's device (any dtype); allowed bool (t, E), (E,) or None.
            """
            t, R = P.shape[0], S.shape[2]
            k = min(k, E)
            C = torch.empty_like(P)
            idx = torch.empty(t, k, dtype=torch.int64, device=P.device)
            vals = torch.empty(t, M, k, dtype=torch.float32, device=P.device)
            mask = allowed if allowed is not None else rank
            stride_a = 0 if allowed is None or allowed.dim() == 1 else allowed.stride(0)
            if allowed is not None:
                mask = allowed.view(torch.uint8)
            EP, RP = 1 << (E - 1).bit_length(), 1 << (R - 1).bit_length()
            _route_kernel[(t,)](
                P, S, rank, s, mask, C, idx, vals, P.stride(0), stride_a, 1.0 / temperature,
                M=M, E=E, R=R, EP=EP, RP=RP, K=k, ARROW=router == "arrow", SIGMA=score == "sigma",
                RANK_NORM=rank_normalize, SOFTMAX=weighting == "softmax", FACTOR=combine == "factor",
                HAS_MASK=allowed is not None, num_warps=4 if EP * RP >= 512 else 2,
            )
            return C, idx, vals
