"""Optional Triton kernel for the fused path on a GPU: score -> pool -> top-k -> weights -> coefficients.

One launch per input group replaces the twenty-odd small tensor ops of routing.py for that step (on a GPU
an eager forward is bound by their launches). It computes exactly what routing.py says, per token:
  g_me   = ||V_me^T x|| (or ||Sigma V^T x||, or Arrow's |v_1^T x|), / sqrt(rank) if rank-normalised,
           -inf where expert e does not adapt member m or the token may not use e (set_expert_mask);
  ev_e   = sum over members of the finite g_me (-inf where none is finite)  -- the pooled evidence;
  T      = top-k of ev (ties: lowest index first);
  w_me   = softmax(g_me / temperature) or 1/|finite| over T, 0 elsewhere;
  C_m    = w_m s_m P_m (output mix)  or  w_m (sum_e w_me s_me P_me) (factor merge).

The gathered apply (`expand`, like Punica's SGMV expand but with a per-token choice): y_t += sum_k
U_e Sigma_e c_tk for e = idx[t, k], from the compact coefficients c (t, k, r) that `route(compact=True)`
writes; it reads only the chosen experts' columns of U Sigma (r per token instead of E*r) and adds into the
base output in place. For many tokens the rows are visited sorted by expert (`order`), so a block of rows
meets few experts and each expert's U Sigma tile is one tensor-core product for the whole block.

Imported only where CUDA is present (or under TRITON_INTERPRET=1, for testing the kernels on a CPU);
`route`/`expand` are None where Triton is missing (the torch code runs then).
"""
from __future__ import annotations

import os

import torch

route = None
expand = None
expand_group = None
order = None
DECODE_MAX = 64  # at or below this many token rows: eager takes the group GEMM, and a GPU applies with expand_group
SORT_MIN = 128  # order(): at or below this many tokens the rows are visited as they are (decode)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if torch.cuda.is_available() or INTERPRET:
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - a CUDA build without Triton: the torch path runs
        triton = None

    if triton is not None:

        @triton.jit
        def _route_kernel(P, S, rank, s, allowed, C, idx_out, vals_out, stride_p, stride_c, stride_a, inv_temp,
                          M: tl.constexpr, E: tl.constexpr, R: tl.constexpr, EP: tl.constexpr, RP: tl.constexpr,
                          K: tl.constexpr, ARROW: tl.constexpr, SIGMA: tl.constexpr, RANK_NORM: tl.constexpr,
                          SOFTMAX: tl.constexpr, FACTOR: tl.constexpr, HAS_MASK: tl.constexpr,
                          COMPACT: tl.constexpr):
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
                if COMPACT:  # only the chosen experts' rows: (t, M, K, R)
                    for k in tl.static_range(K):
                        ck = tl.sum(tl.where((pos == k)[:, None], c, 0.0), axis=0)
                        tl.store(C + ((t * M + m) * K + k) * R + r, ck.to(C.dtype.element_ty), mask=r < R)
                else:
                    tl.store(C + t * stride_c + m * E * R + offs, c.to(C.dtype.element_ty), mask=er)

        @triton.jit
        def _expand_kernel(Y, Cc, idx, perm, US, t, N, stride_y, stride_c, stride_u,
                           K: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr,
                           BN: tl.constexpr, SORTED: tl.constexpr, IEEE: tl.constexpr,
                           O1: tl.constexpr, O2: tl.constexpr):
            # a group's output (expand_group): columns from O1 on belong to member 1, from O2 on to member 2,
            # whose coefficients follow member 0's by K*R per member in each row of Cc; BN divides O1 and O2
            i = tl.program_id(0) * BT + tl.arange(0, BT)
            row_ok = i < t
            if SORTED:
                rows = tl.load(perm + i, mask=row_ok, other=0).to(tl.int64)
            else:
                rows = i.to(tl.int64)
            n0 = tl.program_id(1) * BN
            member = (n0 >= O1).to(tl.int64) + (n0 >= O2).to(tl.int64)
            n = n0.to(tl.int64) + tl.arange(0, BN)
            n_ok = n < N
            r = tl.arange(0, RP)
            r_ok = r < R
            big = 1 << 30
            acc = tl.zeros([BT, BN], tl.float32)
            for k in tl.static_range(K):
                e_rows = tl.load(idx + rows * K + k, mask=row_ok, other=0).to(tl.int32)
                c = tl.load(Cc + rows[:, None] * stride_c + member * K * R + k * R + r[None, :],
                            mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                cur = tl.min(tl.where(row_ok, e_rows, big), axis=0)
                while cur < big:  # each expert met in this block of rows: one product over the block
                    a = tl.where((e_rows == cur)[:, None], c, tl.zeros_like(c))
                    u = tl.load(US + n[:, None] * stride_u + cur * R + r[None, :],
                                mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(a.dtype)
                    if IEEE:
                        acc += tl.dot(a, tl.trans(u), input_precision="ieee")
                    else:
                        acc += tl.dot(a, tl.trans(u))
                    cur = tl.min(tl.where(row_ok & (e_rows > cur), e_rows, big), axis=0)
            yp = Y + rows[:, None] * stride_y + n[None, :]
            ok = row_ok[:, None] & n_ok[None, :]
            y = tl.load(yp, mask=ok, other=0.0).to(tl.float32)
            tl.store(yp, (y + acc).to(Y.dtype.element_ty), mask=ok)

        def order(idx: torch.Tensor) -> torch.Tensor | None:
            """The token rows sorted by first-choice expert (for `expand`), or None for few rows."""
            return torch.argsort(idx[:, 0]) if idx.shape[0] > SORT_MIN else None

        def expand(y: torch.Tensor, c: torch.Tensor, idx: torch.Tensor, US: torch.Tensor,
                   perm: torch.Tensor | None = None) -> torch.Tensor:
            """y (t, N) += sum_k US[:, idx[t,k]*R : +R] @ c[t, k], in place; returns y.

            c (t, K, R) with c.stride(1) == R, c.stride(2) == 1 (a member's slice of route's compact output);
            idx (t, K) int64; US (N, E*R) with unit column stride; perm: order(idx) or None.
            """
            t, N = y.shape
            K, R = c.shape[1], c.shape[2]
            if y.stride(1) != 1:
                raise ValueError("expand: y needs unit column stride")
            RP = max(16, 1 << (R - 1).bit_length())
            BT = 64 if perm is not None else 16
            BN = 128 if perm is not None else 64
            grid = (triton.cdiv(t, BT), triton.cdiv(N, BN))
            _expand_kernel[grid](y, c, idx, perm if perm is not None else idx, US, t, N, y.stride(0),
                                 c.stride(0), US.stride(0), K=K, R=R, RP=RP, BT=BT, BN=BN,
                                 SORTED=perm is not None, IEEE=c.dtype == torch.float32, O1=1 << 30, O2=1 << 30,
                                 num_warps=4)
            return y

        def expand_group(y: torch.Tensor, c: torch.Tensor, idx: torch.Tensor, US: torch.Tensor,
                         starts: list[int], bn: int) -> torch.Tensor:
            """`expand` for an input group's joint output, in one launch: y (t, >= N) holds the members'
            outputs side by side from column 0 (member m's from starts[m]); c (t, M, K, R) contiguous, route's
            compact output for the group; US (N, E*R) the members' U Sigma stacked the same way; bn divides every
            start. Rows as they come (decode sizes). In place; returns y."""
            t, N = y.shape[0], US.shape[0]
            M, K, R = c.shape[1], c.shape[2], c.shape[3]
            if y.stride(1) != 1 or not c.is_contiguous() or M > 3 or any(o % bn for o in starts):
                raise ValueError("expand_group: y needs unit column stride, c contiguous, at most 3 members, "
                                 "bn dividing every member's start")
            far = 1 << 30
            O1 = starts[1] if M > 1 else far
            O2 = starts[2] if M > 2 else far
            RP = max(16, 1 << (R - 1).bit_length())
            grid = (triton.cdiv(t, 16), triton.cdiv(N, bn))
            _expand_kernel[grid](y, c, idx, idx, US, t, N, y.stride(0), c.stride(0), US.stride(0), K=K, R=R, RP=RP,
                                 BT=16, BN=bn, SORTED=False, IEEE=c.dtype == torch.float32, O1=O1, O2=O2,
                                 num_warps=4)
            return y

        def route(P: torch.Tensor, S: torch.Tensor, rank: torch.Tensor, s: torch.Tensor,
                  allowed: torch.Tensor | None, *, M: int, E: int, k: int, router: str, score: str,
                  rank_normalize: bool, weighting: str, temperature: float, combine: str, compact: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """P (t, M*E*R) -> (C (t, M*E*R), idx (t, k) int64, vals (t, M, k) float32) for one input group;
            P may be a column slice of a wider tensor (unit column stride; the group GEMM's score columns);
            compact: C holds only the chosen experts' coefficients, (t, M, k, R), for `expand`.

            S (M, E, R), rank (M, E), s (M, E) on P's device (any dtype); allowed bool (t, E), (E,) or None.
            """
            t, R = P.shape[0], S.shape[2]
            k = min(k, E)
            if P.stride(1) != 1:
                raise ValueError("route: P needs unit column stride")
            C = P.new_empty(t, M, k, R) if compact else P.new_empty(t, P.shape[1])
            idx = torch.empty(t, k, dtype=torch.int64, device=P.device)
            vals = torch.empty(t, M, k, dtype=torch.float32, device=P.device)
            # a copy, not a uint8 view: Inductor cannot lower a bool -> uint8 bitcast
            mask = allowed.to(torch.uint8) if allowed is not None else rank
            stride_a = 0 if allowed is None or allowed.dim() == 1 else mask.stride(0)
            EP, RP = 1 << (E - 1).bit_length(), 1 << (R - 1).bit_length()
            _route_kernel[(t,)](
                P, S, rank, s, mask, C, idx, vals, P.stride(0), C.stride(0), stride_a, 1.0 / temperature,
                M=M, E=E, R=R, EP=EP, RP=RP, K=k, ARROW=router == "arrow", SIGMA=score == "sigma",
                RANK_NORM=rank_normalize, SOFTMAX=weighting == "softmax", FACTOR=combine == "factor",
                HAS_MASK=allowed is not None, COMPACT=compact, num_warps=4 if EP * RP >= 512 else 2,
            )
            return C, idx, vals
