"""The Triton kernels (runtime/kernels.py) against float64 references on fresh random inputs.

They run on a GPU, or on a CPU under TRITON_INTERPRET=1 with Triton installed (how they were written);
elsewhere kernels.route/expand are None and these tests skip (the torch code runs instead).
"""
from __future__ import annotations

import pytest
import torch

from spectr.runtime import kernels

pytestmark = pytest.mark.skipif(kernels.expand is None, reason="needs Triton on a CUDA device (or TRITON_INTERPRET=1)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def expand_reference(y, c, idx, US):
    R = c.shape[2]
    U = US.double().view(US.shape[0], -1, R).permute(1, 0, 2)  # (E, N, R)
    return y.double() + torch.einsum("tkr,tknr->tn", c.double(), U[idx])


@pytest.mark.parametrize("t,E,K,R,N", [(1, 8, 1, 16, 64), (32, 64, 1, 16, 200), (300, 64, 1, 16, 130),
                                       (257, 6, 2, 4, 33), (7, 4, 3, 2, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expand_adds_the_chosen_experts(t, E, K, R, N, dtype):
    if dtype == torch.bfloat16 and DEV == "cpu":
        pytest.skip("bf16 dots: on the GPU")
    g = torch.Generator().manual_seed(t * 31 + E)
    y = torch.randn(t, N, generator=g).to(DEV, dtype)
    c = torch.randn(t, K, R, generator=g).to(DEV, dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]).to(DEV)
    US = torch.randn(N, E * R, generator=g).to(DEV, dtype)
    want = expand_reference(y, c, idx, US)
    perm = kernels.order(idx, E)
    assert (perm is None) == (t <= kernels.SORT_MIN)
    got = kernels.expand(y.clone(), c, idx, US, perm).double()
    err = ((got - want).norm() / want.norm()).item()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2), err
    # a member's slice of route's compact output (rows strided over the group) reads right too
    wide = torch.randn(t, 3, K, R, generator=g).to(DEV, dtype)
    wide[:, 1] = c
    got = kernels.expand(y.clone(), wide[:, 1], idx, US, perm).double()
    assert ((got - want).norm() / want.norm()).item() <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("combine", ["mix", "factor"])
@pytest.mark.parametrize("k", [1, 2])
def test_route_compact_holds_the_dense_coefficients_of_the_chosen(combine, k):
    g = torch.Generator().manual_seed(5 + k)
    t, M, E, R = 40, 3, 8, 16
    P = torch.randn(t, M * E * R, generator=g).to(DEV)
    S = torch.rand(M, E, R, generator=g).sort(dim=-1, descending=True).values.to(DEV)
    rank = torch.full((M, E), R, device=DEV)
    rank[2, 5] = 0  # an expert missing from one member
    s = torch.rand(M, E, generator=g).to(DEV) + 0.5
    kw = dict(M=M, E=E, k=k, router="spectr", score="norm", rank_normalize=False, weighting="softmax",
              temperature=1.0, combine=combine)
    C, idx, vals = kernels.route(P, S, rank, s, None, **kw)
    Cc, idx2, vals2 = kernels.route(P, S, rank, s, None, compact=True, **kw)
    assert torch.equal(idx, idx2) and torch.equal(vals, vals2)
    dense = C.view(t, M, E, R)
    want = torch.stack([dense[:, m].gather(1, idx[:, :, None].expand(t, k, R)) for m in range(M)], dim=1)
    assert Cc.shape == (t, M, k, R)
    assert torch.allclose(Cc, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("E,k", [(8, 1), (64, 1), (6, 2)])
def test_route_files_each_row_under_its_first_choice_for_expand(E, k):
    g = torch.Generator().manual_seed(E + k)
    t, M, R, N = 300, 2, 16, 72
    P = torch.randn(t, M * E * R, generator=g).to(DEV)
    S = torch.rand(M, E, R, generator=g).to(DEV)
    rank = torch.full((M, E), R, device=DEV)
    s = torch.ones(M, E, device=DEV)
    kw = dict(M=M, E=E, k=k, router="spectr", score="norm", rank_normalize=False, weighting="softmax",
              temperature=1.0, combine="mix")
    order = kernels.new_order(t, E, torch.device(DEV))
    C, idx, vals = kernels.route(P, S, rank, s, None, compact=True, order=order, **kw)
    C0, idx0, _ = kernels.route(P, S, rank, s, None, compact=True, **kw)
    assert torch.equal(idx, idx0) and torch.equal(C, C0)  # filing the rows changes nothing else
    bucket, counts = order
    first = idx[:, 0].cpu()
    assert counts.cpu().tolist() == torch.bincount(first, minlength=E).tolist()
    for e, n in enumerate(counts.cpu().tolist()):
        filed = bucket[e * t:e * t + n].cpu().sort().values
        assert torch.equal(filed.long(), (first == e).nonzero().flatten())
    assert int(counts.sum()) == t
    US = torch.randn(N, E * R, generator=g).to(DEV)
    y = torch.randn(t, N, generator=g).to(DEV)
    want = expand_reference(y, C[:, 1], idx, US)
    got = kernels.expand(y.clone(), C[:, 1], idx, US, order).double()
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


@pytest.mark.parametrize("n,D", [(5, 64), (33, 4096), (3, 14336), (2, 100)])
def test_quantize_rows_kernel_equals_the_torch_quantizer(n, D):
    from spectr.runtime import routing

    if DEV == "cpu":
        pytest.skip("float8 conversion: the interpreter's emulation carries rounding badly across binades (31.9 -> 16)")

    g = torch.Generator().manual_seed(n + D)
    a = (torch.randn(n, D, generator=g) * torch.logspace(-3, 2, n)[:, None]).to(DEV, torch.bfloat16)
    a[0] = 0  # a zero row keeps a tiny scale
    q, scale = kernels.quantize_rows(a)
    q0, scale0 = routing.quantize_rows(a)
    assert q.dtype == q0.dtype and q.shape == q0.shape and scale.shape == scale0.shape
    assert torch.allclose(scale, scale0, rtol=1e-6, atol=0)
    # the same float8 values, up to one float8 step where the two conversions round differently
    ref = q0.float().abs()
    step = torch.where(ref < 2 ** -6, torch.full_like(ref, 2 ** -9), 2.0 ** (ref.clamp(min=2 ** -6).log2().floor() - 3))
    assert ((q.float() - q0.float()).abs() <= step).all()
    assert (q.float() != q0.float()).float().mean().item() < 0.01
