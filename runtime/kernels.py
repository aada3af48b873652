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
base output in place. For many tokens the rows are visited sorted by expert (the routing kernel files each
row under its first choice: `new_order`), so a block of rows meets few experts and each expert's U Sigma tile
is one tensor-core product for the whole block.

Imported only where CUDA is present (or under TRITON_INTERPRET=1, for testing the kernels on a CPU);
`route`/`expand` are None where Triton is missing (the torch code runs then).
"""
from __future__ import annotations

import os

import torch

route = None
expand = None
expand_group = None
launch_expand = None
order = None
new_order = None
quantize_rows = None
DECODE_MAX = 64  # at or below this many token rows: eager takes the group GEMM, and a GPU applies with expand_group
ROUTE_BLOCK = 4096  # route(): (token, expert, rank) entries per program, so BT = ROUTE_BLOCK // (E*r) tokens
ROUTE_BLOCK_DECODE = 2048  # at or below DECODE_MAX rows: smaller programs, more of them (session 12's decode setting)
ROUTE_WARPS = 4
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
        def _member_scores(p, S, rank, e, r, e_ok, er, offs, m, E: tl.constexpr, R: tl.constexpr,
                           ARROW: tl.constexpr, SIGMA: tl.constexpr, RANK_NORM: tl.constexpr):
            # member m's scores g (BT, EP) from its projections p (BT, EP, RP), and its rank row (EP,)
            if ARROW:
                g = tl.sum(tl.where(r[None, None, :] == 0, tl.abs(p), 0.0), axis=2)
            elif SIGMA:
                sv = tl.load(S + m * E * R + offs, mask=er, other=0.0).to(tl.float32)[None, :, :]
                g = tl.sqrt(tl.sum(p * sv * p * sv, axis=2))
            else:
                g = tl.sqrt(tl.sum(p * p, axis=2))
            rk = tl.load(rank + m * E + e, mask=e_ok, other=0).to(tl.float32)
            if RANK_NORM and not ARROW:
                g = g / tl.sqrt(tl.maximum(rk, 1.0))[None, :]
            return g, rk

        @triton.jit
        def _route_kernel(P, S, rank, s, allowed, C, idx_out, vals_out, counts, bucket, T, stride_p, stride_c,
                          stride_a, inv_temp, M: tl.constexpr, E: tl.constexpr, R: tl.constexpr,
                          EP: tl.constexpr, RP: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                          ARROW: tl.constexpr, SIGMA: tl.constexpr, RANK_NORM: tl.constexpr, SOFTMAX: tl.constexpr,
                          FACTOR: tl.constexpr, HAS_MASK: tl.constexpr, COMPACT: tl.constexpr, ORDER: tl.constexpr):
            # BT tokens per program, as (token, expert, rank) blocks: GPU time on the H200 at 4096 tokens, E = 64,
            # 3 members, rows filed: 27 us at 4096 entries a program, 36 us at 1024 (bench_apply.py)
            tt = tl.program_id(0) * BT + tl.arange(0, BT)
            t_ok = tt < T
            t64 = tt.to(tl.int64)
            e = tl.arange(0, EP)
            r = tl.arange(0, RP)
            e_ok = e < E
            er = e_ok[:, None] & (r[None, :] < R)
            offs = e[:, None] * R + r[None, :]
            ter = t_ok[:, None, None] & er[None, :, :]
            prow = P + t64[:, None, None] * stride_p + offs[None, :, :]
            ninf = float("-inf")
            if HAS_MASK:
                te = t_ok[:, None] & e_ok[None, :]
                ok = te & (tl.load(allowed + t64[:, None] * stride_a + e[None, :], mask=te, other=0) != 0)
            else:
                ok = t_ok[:, None] & e_ok[None, :]
            ev = tl.zeros([BT, EP], tl.float32)
            present = ev < 0  # all False
            for m in tl.static_range(M):  # pass 1: pooled evidence
                p = tl.load(prow + m * E * R, mask=ter, other=0.0).to(tl.float32)
                g, rk = _member_scores(p, S, rank, e, r, e_ok, er, offs, m, E, R, ARROW, SIGMA, RANK_NORM)
                has = (rk > 0)[None, :] & ok
                ev += tl.where(has, g, 0.0)
                present = present | has
            # top-k on the pooled evidence: chosen -> -inf key, absent -> lowest finite key (picked last)
            key = tl.where(present, ev, -3.0e38)
            pos = tl.full([BT, EP], -1, tl.int32)
            for k in tl.static_range(K):
                j = tl.argmax(key, axis=1)
                tl.store(idx_out + t64 * K + k, j.to(tl.int64), mask=t_ok)
                if ORDER and k == 0:  # file the token under its first choice, for expand's sorted rows
                    slot = tl.atomic_add(counts + j, 1, mask=t_ok)
                    tl.store(bucket + j.to(tl.int64) * T + slot, tt, mask=t_ok)
                hit = e[None, :] == j[:, None]
                pos = tl.where(hit, k, pos)
                key = tl.where(hit, ninf, key)
            chosen = pos >= 0
            for m in tl.static_range(M):  # pass 2: each member's weights over the chosen, its coefficients
                p = tl.load(prow + m * E * R, mask=ter, other=0.0).to(tl.float32)
                g, rk = _member_scores(p, S, rank, e, r, e_ok, er, offs, m, E, R, ARROW, SIGMA, RANK_NORM)
                live = (rk > 0)[None, :] & ok
                for k in tl.static_range(K):
                    sel = (pos == k) & live
                    v = tl.sum(tl.where(sel, g, 0.0), axis=1)
                    any_k = tl.sum(sel.to(tl.int32), axis=1) > 0
                    tl.store(vals_out + (t64 * M + m) * K + k, tl.where(any_k, v, ninf), mask=t_ok)
                use = chosen & live
                if SOFTMAX:
                    top = tl.max(tl.where(use, g, ninf), axis=1)
                    top = tl.where(top == ninf, 0.0, top)
                    ex = tl.where(use, tl.exp((g - top[:, None]) * inv_temp), 0.0)
                    w = ex / tl.maximum(tl.sum(ex, axis=1), 1e-30)[:, None]
                else:
                    n = tl.sum(use.to(tl.float32), axis=1)
                    w = use.to(tl.float32) / tl.maximum(n, 1.0)[:, None]
                ws = w * tl.load(s + m * E + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
                if FACTOR:
                    z = tl.sum(ws[:, :, None] * p, axis=1)
                    c = w[:, :, None] * z[:, None, :]
                else:
                    c = ws[:, :, None] * p
                if COMPACT:  # only the chosen experts' rows: (t, M, K, R)
                    for k in tl.static_range(K):
                        ck = tl.sum(tl.where((pos == k)[:, :, None], c, 0.0), axis=1)
                        tl.store(C + ((t64[:, None] * M + m) * K + k) * R + r[None, :], ck.to(C.dtype.element_ty),
                                 mask=t_ok[:, None] & (r[None, :] < R))
                else:
                    tl.store(C + t64[:, None, None] * stride_c + m * E * R + offs[None, :, :],
                             c.to(C.dtype.element_ty), mask=ter)

        @triton.jit
        def _expand_kernel(Y, Cc, idx, bucket, counts, US, t, N, stride_y, stride_c, stride_un, stride_ur,
                           K: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
                           BT: tl.constexpr, BN: tl.constexpr, SORTED: tl.constexpr, IEEE: tl.constexpr,
                           O1: tl.constexpr, O2: tl.constexpr):
            # a group's output (expand_group): columns from O1 on belong to member 1, from O2 on to member 2,
            # whose coefficients follow member 0's by K*R per member in each row of Cc; BN divides O1 and O2
            i = tl.program_id(0) * BT + tl.arange(0, BT)
            row_ok = i < t
            if SORTED:  # sorted position i -> its expert's bucket (counts' running sum) -> the token filed there
                ei = tl.arange(0, EP)
                cnt = tl.load(counts + ei, mask=ei < E, other=0)
                ends = tl.cumsum(cnt, axis=0)
                first = tl.sum((ends[None, :] <= i[:, None]).to(tl.int32), axis=1)
                start = tl.sum(tl.where(ei[None, :] == first[:, None], (ends - cnt)[None, :], 0), axis=1)
                rows = tl.load(bucket + first.to(tl.int64) * t + (i - start), mask=row_ok, other=0).to(tl.int64)
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
                    u = tl.load(US + n[:, None] * stride_un + (cur * R + r[None, :]) * stride_ur,
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

        @triton.jit
        def _quantize_kernel(X, Q, scale, D, stride_x, stride_q, FMAX: tl.constexpr, BD: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            amax = tl.zeros([BD], tl.float32)
            for d0 in range(0, D, BD):
                d = d0 + tl.arange(0, BD)
                amax = tl.maximum(amax, tl.abs(tl.load(X + row * stride_x + d, mask=d < D, other=0.0).to(tl.float32)))
            sc = tl.maximum(tl.max(amax, axis=0), 1.1754943508222875e-38) / FMAX
            for d0 in range(0, D, BD):
                d = d0 + tl.arange(0, BD)
                x = tl.load(X + row * stride_x + d, mask=d < D, other=0.0).to(tl.float32)
                tl.store(Q + row * stride_q + d, (x / sc).to(Q.dtype.element_ty), mask=d < D)
            tl.store(scale + row, sc)

        def quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """routing.quantize_rows in one launch (a read and a float8 write of a; torch's version makes about
            six passes in float32: 199-222 us against 42 us for 4096 x 4096 on the H200, bench_apply.py)."""
            n, D = a.shape
            if a.stride(1) != 1:
                a = a.contiguous()
            q = torch.empty(n, D, dtype=torch.float8_e4m3fn, device=a.device)
            scale = torch.empty(n, 1, dtype=torch.float32, device=a.device)
            BD = min(4096, 1 << (D - 1).bit_length())
            _quantize_kernel[(n,)](a, q, scale, D, a.stride(0), q.stride(0), FMAX=448.0, BD=BD,
                                   num_warps=8 if BD >= 2048 else 4)
            return q, scale

        def new_order(t: int, E: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
            """Storage for `route(order=...)` to file t token rows by first-choice expert: (bucket (E*t,) int32,
            counts (E,) int32 zeroed); None at or below SORT_MIN rows (decode: `expand` visits rows as they come)."""
            if t <= SORT_MIN:
                return None
            return (torch.empty(E * t, dtype=torch.int32, device=device),
                    torch.zeros(E, dtype=torch.int32, device=device))

        def order(idx: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            """What `route(order=new_order(...))` files, from the choices idx (t, k) in torch (for callers without
            route's output, and the tests): bucket e holds the rows whose first choice is e, in any order."""
            t = idx.shape[0]
            got = new_order(t, E, idx.device)
            if got is None:
                return None
            bucket, counts = got
            first = idx[:, 0]
            counts.scatter_add_(0, first, torch.ones_like(first, dtype=torch.int32))
            rows = torch.argsort(first)
            slot = torch.arange(t, device=idx.device) - (counts.cumsum(0) - counts)[first[rows]]
            bucket[first[rows] * t + slot] = rows.to(torch.int32)
            return bucket, counts

        def expand(y: torch.Tensor, c: torch.Tensor, idx: torch.Tensor, US: torch.Tensor,
                   order: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
            """y (t, N) += sum_k US[:, idx[t,k]*R : +R] @ c[t, k], in place; returns y.

            c (t, K, R) with c.stride(1) == R, c.stride(2) == 1 (a member's slice of route's compact output);
            idx (t, K) int64; US (N, E*R), any strides (the layer stores it transposed); order: the rows filed
            by first choice (route's order=, or order(idx, E)), visited sorted so a block of rows meets few
            experts; None: as they come.
            """
            if y.stride(1) != 1:
                raise ValueError("expand: y needs unit column stride")
            # sorted: 32 x 256 tiles measured fastest (bench_apply.py, H200: 126 us at N = 14336 against 134 us
            # for 64 x 128 and 217 us for the dense apply at E = 64)
            BT, BN = (32, 256) if order is not None else (16, 64)
            return launch_expand(y, c, idx, US, order, BT, BN)

        def expand_group(y: torch.Tensor, c: torch.Tensor, idx: torch.Tensor, US: torch.Tensor,
                         starts: list[int], bn: int,
                         order: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
            """`expand` for an input group's joint output, in one launch: y (t, >= N) holds the members'
            outputs side by side from column 0 (member m's from starts[m]); c (t, M, K, R) contiguous, route's
            compact output for the group; US (N, E*R) the members' U Sigma stacked the same way; bn divides every
            start; order: as for `expand` (sorted rows, for many tokens), None: rows as they come. In place;
            returns y."""
            M = c.shape[1]
            if y.stride(1) != 1 or not c.is_contiguous() or M > 3 or any(o % bn for o in starts):
                raise ValueError("expand_group: y needs unit column stride, c contiguous, at most 3 members, "
                                 "bn dividing every member's start")
            far = 1 << 30
            return launch_expand(y, c, idx, US, order, 32 if order is not None else 16, bn,
                                 O1=starts[1] if M > 1 else far, O2=starts[2] if M > 2 else far)

        def launch_expand(y: torch.Tensor, c: torch.Tensor, idx: torch.Tensor, US: torch.Tensor,
                          order: tuple[torch.Tensor, torch.Tensor] | None, BT: int, BN: int, O1: int = 1 << 30,
                          O2: int = 1 << 30, **launch: int) -> torch.Tensor:
            """The one _expand_kernel launch behind `expand` and `expand_group` (and bench_apply.py's tile sweep):
            BT x BN tiles over the rows of y and U Sigma's N = US.shape[0] columns; c (t, ..., K, R); O1, O2: where
            the second and third members' columns start. launch: Triton's num_warps (4) or num_stages."""
            t, N = y.shape[0], US.shape[0]
            K, R = c.shape[-2], c.shape[-1]
            bucket, counts = order if order is not None else (idx, idx)
            E = counts.shape[0] if order is not None else 1
            _expand_kernel[(triton.cdiv(t, BT), triton.cdiv(N, BN))](
                y, c, idx, bucket, counts, US, t, N, y.stride(0), c.stride(0), US.stride(0), US.stride(1), K=K, R=R,
                RP=max(16, 1 << (R - 1).bit_length()), E=E, EP=max(16, 1 << (E - 1).bit_length()), BT=BT, BN=BN,
                SORTED=order is not None, IEEE=c.dtype == torch.float32, O1=O1, O2=O2, **{"num_warps": 4, **launch})
            return y

        def route(P: torch.Tensor, S: torch.Tensor, rank: torch.Tensor, s: torch.Tensor,
                  allowed: torch.Tensor | None, *, M: int, E: int, k: int, router: str, score: str,
                  rank_normalize: bool, weighting: str, temperature: float, combine: str, compact: bool = False,
                  order: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """P (t, M*E*R) -> (C (t, M*E*R), idx (t, k) int64, vals (t, M, k) float32) for one input group;
            P may be a column slice of a wider tensor (unit column stride; the group GEMM's score columns);
            compact: C holds only the chosen experts' coefficients, (t, M, k, R), for `expand`;
            order: new_order(t, E)'s storage, filled with the rows by first choice (for `expand`).

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
            block = ROUTE_BLOCK if t > DECODE_MAX else ROUTE_BLOCK_DECODE
            BT = max(1, min(block // (EP * RP), 1 << (t - 1).bit_length()))
            bucket, counts = order if order is not None else (idx, idx)
            _route_kernel[(triton.cdiv(t, BT),)](
                P, S, rank, s, mask, C, idx, vals, counts, bucket, t, P.stride(0), C.stride(0), stride_a,
                1.0 / temperature, M=M, E=E, R=R, EP=EP, RP=RP, K=k, BT=BT, ARROW=router == "arrow",
                SIGMA=score == "sigma", RANK_NORM=rank_normalize, SOFTMAX=weighting == "softmax",
                FACTOR=combine == "factor", HAS_MASK=allowed is not None, COMPACT=compact, ORDER=order is not None,
                num_warps=ROUTE_WARPS if BT * EP * RP >= 512 else 2,
            )
            return C, idx, vals
