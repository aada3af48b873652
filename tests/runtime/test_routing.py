"""The routing math against a naive per-token dense reference, on small shapes with unequal ranks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from spectr.runtime.spectrum import AdapterSpectra, ModuleSpectrum
from spectr.runtime import load_bundle, read_bundle, routing, write_bundle

# D_OUT * 4 bytes: a 16-byte multiple, so apply="grouped" takes the fused grouped GEMM
D_IN, D_OUT, RANKS = 12, 12, (2, 3, 4, 3, 1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Linear(D_IN, D_OUT)

    def forward(self, x):
        return self.proj(x)


def _experts() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, r in enumerate(RANKS):
        U = torch.linalg.qr(torch.randn(D_OUT, r, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(D_IN, r, generator=g, dtype=torch.float64))[0]
        S = torch.sort(torch.rand(r, generator=g, dtype=torch.float64) + 0.5, descending=True).values
        out.append((U, S, V, 0.5 + i))
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    experts = [
        ({"name": f"e{i}", "version": 1, "content_sha256": "0" * 64, "rank": len(S), "alpha": 1.0},
         AdapterSpectra(modules={"proj": ModuleSpectrum(U=U.float(), S=S.float(), V=V.float(), scaling=s)},
                        method="exact", params={}))
        for i, (U, S, V, s) in enumerate(_experts())
    ]
    base = {"name": "net", "architecture": "Net", "model_type": "none", "config_sha256": "0" * 64,
            "modules": {"proj": [D_IN, D_OUT]}}
    return read_bundle(write_bundle(tmp_path_factory.mktemp("b") / "bundle", base=base, experts=experts))


def naive(x, k, combine, weighting="uniform", temperature=1.0, score="norm"):
    """Per token: score, pick, weight, then build the dense merged/mixed update explicitly."""
    experts = _experts()
    r_max = max(RANKS)
    out = []
    for xt in x.double():
        if score == "norm":
            g = torch.stack([(V.T @ xt).norm() for U, S, V, s in experts])
        else:
            g = torch.stack([(S * (V.T @ xt)).norm() for U, S, V, s in experts])
        vals, idx = torch.sort(g, descending=True)
        vals, idx = vals[:k], idx[:k]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weighting == "uniform" else torch.softmax(vals / temperature, 0)
        if combine == "mix":
            dW = sum(wi * experts[i][3] * experts[i][0] @ torch.diag(experts[i][1]) @ experts[i][2].T for wi, i in zip(w, idx))
        else:
            pad = lambda M: torch.cat([M, M.new_zeros(M.shape[0], r_max - M.shape[1])], 1)  # noqa: E731
            left = sum(wi * pad(experts[i][0] @ torch.diag(experts[i][1])) for wi, i in zip(w, idx))
            right = sum(wi * experts[i][3] * pad(experts[i][2]) for wi, i in zip(w, idx))
            dW = left @ right.T
        out.append(dW @ xt)
    return torch.stack(out)


@pytest.mark.parametrize("combine", ["factor", "mix"])
@pytest.mark.parametrize("k,weighting,score,apply", [
    (2, "uniform", "norm", "dense"), (3, "softmax", "norm", "grouped"), (2, "uniform", "sigma", "grouped"),
    (5, "uniform", "norm", "dense"), (1, "softmax", "sigma", "dense"),
])
def test_spectr_matches_naive_reference(bundle, combine, k, weighting, score, apply):
    net = Net()
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(3))
    base = net(x)
    load_bundle(net, bundle, router="spectr", top_k=k, combine=combine, weighting=weighting,
                temperature=0.7, score=score, apply=apply)
    got = net(x) - base
    want = naive(x, k, combine, weighting, 0.7, score).float()
    assert want.abs().max() > 1e-2  # the update is not trivially zero
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_factor_merge_differs_from_output_mix(bundle):
    # the cross terms of the factor merge are real: with k >= 2 the two combinations disagree
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(4))
    assert (naive(x, 3, "factor") - naive(x, 3, "mix")).abs().max() > 1e-3


@pytest.mark.parametrize("e", range(len(RANKS)))
def test_token_in_an_experts_subspace_is_routed_to_it(bundle, e):
    net = load_bundle(Net(), bundle, router="spectr", top_k=1)
    U, S, V, s = _experts()[e]
    x = (V @ torch.randn(V.shape[1], 4, generator=torch.Generator().manual_seed(e), dtype=torch.float64)).T.float()
    _, vals, idx = net.proj.delta(x)
    assert idx[:, 0].tolist() == [e] * 4
    torch.testing.assert_close(vals[:, 0], x.norm(dim=1))  # all its energy lies in the subspace


def test_rank_normalised_score_removes_the_rank_bias(bundle):
    # random tokens: raw scores grow with rank (energy r/d); normalised ones do not
    net = load_bundle(Net(), bundle, router="spectr", top_k=len(RANKS))
    x = torch.randn(4000, D_IN, generator=torch.Generator().manual_seed(5))
    from spectr.runtime import routing

    P = routing.project(x, net.proj.Vt, len(RANKS))
    raw = routing.scores(P, net.proj.S, net.proj.rank).pow(2).mean(0)
    norm = routing.scores(P, net.proj.S, net.proj.rank, rank_normalize=True).pow(2).mean(0)
    ranks = torch.tensor(RANKS, dtype=torch.float32)
    torch.testing.assert_close(raw / x.pow(2).sum(1).mean(), ranks / D_IN, atol=0.03, rtol=0.05)
    torch.testing.assert_close(norm, torch.full_like(norm, norm.mean().item()), rtol=0.08, atol=0)


def test_uniform_and_fixed_routers(bundle):
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(6))
    experts = _experts()
    net = Net()
    base = net(x)
    load_bundle(net, bundle, router="uniform", combine="mix")
    mean = sum(s * (U @ torch.diag(S) @ V.T) for U, S, V, s in experts) / len(experts)
    torch.testing.assert_close(net(x) - base, (x.double() @ mean.T).float(), atol=1e-5, rtol=1e-5)
    from spectr.runtime import set_router

    set_router(net, router="fixed", expert="e2")
    U, S, V, s = experts[2]
    torch.testing.assert_close(net(x) - base, (x.double() @ (s * U @ torch.diag(S) @ V.T).T).float(),
                               atol=1e-5, rtol=1e-5)


def test_bad_router_options_are_refused(bundle):
    with pytest.raises(ValueError, match="router"):
        load_bundle(Net(), bundle, router="nope")
    with pytest.raises(ValueError, match="no expert named"):
        load_bundle(Net(), bundle, router="fixed", expert="missing")


def test_the_shortcuts_for_complete_modules_and_one_choice_change_nothing():
    """pool(complete=True) is the plain sum, scores(complete=True) skips the -inf mask, and weights for k = 1
    skip the softmax: each equals the general form wherever its condition holds, and the general form still
    handles absent experts."""
    g = torch.Generator().manual_seed(0)
    P, S = torch.randn(64, 6, 4, generator=g), torch.rand(6, 4, generator=g)
    full, some = torch.full((6,), 4), torch.tensor([4, 0, 4, 2, 4, 0])
    evs = [routing.scores(P * (i + 1), S, full) for i in range(3)]
    assert torch.equal(routing.pool(evs, complete=True), routing.pool(evs))
    assert torch.equal(routing.scores(P, S, full, complete=True), routing.scores(P, S, full))
    partial = routing.scores(P, S, some)
    assert torch.isinf(partial[:, [1, 5]]).all() and torch.isfinite(routing.pool([partial, evs[0]])).all()
    masked = routing.restrict(evs[0], torch.rand(64, 6, generator=g) > 0.3)
    for mode in routing.WEIGHTS:
        vals, idx = routing.select(masked, 1)
        w = routing.weights(vals, idx, 6, mode=mode)
        want = torch.zeros(64, 6).scatter_(1, idx, torch.softmax(vals, dim=1).nan_to_num(0.0))
        assert torch.equal(w, want) and (w.sum(1) <= 1).all()


@pytest.mark.parametrize("router,score,combine,weighting,k", [
    ("spectr", "norm", "mix", "softmax", 1), ("spectr", "sigma", "factor", "uniform", 3),
    ("arrow", "norm", "mix", "softmax", 2), ("spectr", "norm", "mix", "uniform", "per-token")])
@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("mask", [None, "tokens", "experts"])
def test_route_stacked_equals_the_per_module_steps(router, score, combine, weighting, k, gaps, mask):
    """routing.route decides for M stacked modules at once exactly as the per-module steps do: each member's
    scores, their pooled sum, top-k, each member's own weights and coefficients (absent experts, masks, a
    per-token k)."""
    g = torch.Generator().manual_seed(1)
    t, M, E, r = 40, 3, 6, 4
    P, S = torch.randn(t, M, E, r, generator=g), torch.rand(M, E, r, generator=g)
    rank = torch.tensor([[4, 0, 4, 2, 4, 4], [4, 4, 0, 4, 4, 4], [4, 4, 4, 4, 1, 4]]) if gaps \
        else torch.full((M, E), 4)
    s = torch.rand(M, E, generator=g) + 0.5
    allowed = {None: None, "tokens": torch.rand(t, E, generator=g) > 0.3,
               "experts": torch.tensor([True, False, True, True, False, True])}[mask]
    k = torch.randint(1, 4, (t,), generator=g) if k == "per-token" else k
    opts = dict(router=router, score=score)
    C, vals, idx = routing.route(P, S, rank, s, k, allowed, **opts, weighting=weighting, temperature=0.7,
                                 combine=combine, complete=not gaps)
    gs = [routing.restrict(routing.scores(P[:, m], S[m], rank[m], **opts), allowed) for m in range(M)]
    want_idx = routing.select(routing.pool(gs), k)[1]
    assert torch.equal(idx, want_idx)
    for m in range(M):
        want_vals = routing.cut(gs[m].gather(1, idx), k)
        w = routing.weights(want_vals, idx, E, mode=weighting, temperature=0.7)
        assert torch.equal(vals[:, m], want_vals)
        assert torch.equal(C[:, m], routing.coefficients(P[:, m], w, S[m], s[m], combine=combine))


def test_one_choice_weights_of_complete_modules_are_the_general_ones():
    g = torch.Generator().manual_seed(2)
    vals, idx = routing.select(torch.rand(30, 5, generator=g), 1)
    for mode in routing.WEIGHTS:
        assert torch.equal(routing.weights(vals, idx, 5, mode=mode, complete=True),
                           routing.weights(vals, idx, 5, mode=mode))


def test_fp8_projection_dequantized_fallback_gives_the_fp8_gemm_numbers():
    """project_fp8 on hardware without fp8 GEMMs (native=False) computes from the same float8 factors; both are
    a few percent off the exact projection, and a zero token stays zero. On a GPU where there is one (a CPU
    _scaled_mm takes row-wise scales only from torch 2.12 on)."""
    g = torch.Generator().manual_seed(3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, Vt = torch.randn(32, 96, generator=g).to(dev), torch.randn(48, 96, generator=g).to(dev)
    x[3] = 0
    Vt8, scale = routing.quantize_rows(Vt)
    fast = routing.project_fp8(x, Vt8, scale.T.contiguous())
    slow = routing.project_fp8(x, Vt8, scale.T.contiguous(), native=False)
    exact = x @ Vt.T
    assert fast.dtype == slow.dtype == torch.bfloat16 and not fast[3].any()
    assert ((fast.float() - slow.float()).norm() / exact.norm()) < 0.01
    assert 0 < ((fast.float() - exact).norm() / exact.norm()) < 0.08
