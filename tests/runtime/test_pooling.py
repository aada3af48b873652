"""Evidence pooling (pool="input" | "layer") and smoothing over tokens (smooth=a) in the runtime."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from spectr.runtime.spectrum import AdapterSpectra, ModuleSpectrum
from spectr.runtime import REFERENCE, RouterConfig, load_bundle, read_bundle, routing, set_router, trace_routing, unload_bundle
from spectr.runtime import write_bundle
from tests.conftest import build_tiny_llama
from tests.runtime.helpers import bundle_from_adapters, left_pad

NAMES = ("alpha", "beta", "gamma", "delta")
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 120, 1, 77, 12, 90]])
QKV = ("q_proj", "k_proj", "v_proj")


@pytest.fixture(scope="module")
def bundle(make_adapter, tmp_path_factory):
    folders = [make_adapter(f"pool-{n}", seed=i + 30, r=4) for i, n in enumerate(NAMES)]
    return read_bundle(bundle_from_adapters(tmp_path_factory.mktemp("pool") / "four", folders, build_tiny_llama()))


def routed(bundle, **kw):
    """The reference configuration at k=2, changed by kw."""
    return load_bundle(build_tiny_llama(), bundle, **{**REFERENCE, "top_k": 2, **kw})


def choices(trace, module):
    return trace.choices(module)[0]


# ---- defaults and options ------------------------------------------------------------------------

@torch.no_grad()
def test_reference_is_bit_exact_and_leaves_no_state(bundle):
    assert (RouterConfig().pool, RouterConfig(**REFERENCE).pool, RouterConfig(**REFERENCE).smooth) == ("input", "module", 0.0)
    model = routed(bundle)
    q = model.model.layers[1].self_attn.q_proj
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))
    # the reference path, composed by hand from the routing primitives: bit for bit
    P = routing.project(x, q.Vt, q.E)
    vals, idx = routing.select(routing.scores(P, q.S, q.rank), 2)
    w = routing.weights(vals, idx, q.E)
    want = routing.apply_dense(routing.coefficients(P, w, q.S, q.s), q.US)
    dy, got_vals, got_idx = q.delta(x)
    assert torch.equal(dy, want) and torch.equal(got_idx, idx) and torch.equal(got_vals, vals)
    model(IDS)
    st = model.spectr.forward
    assert not st.active and not st.carry and not st.groups and st.real is None  # hooks stayed inert


def test_bad_options_are_refused_and_unload_removes_hooks(bundle):
    for bad in (dict(pool="token"), dict(smooth=1.0), dict(smooth=-0.1)):
        with pytest.raises(ValueError, match="pool|smooth"):
            routed(bundle, **bad)
    model = routed(bundle, pool="layer", smooth=0.5)
    assert model._forward_pre_hooks and model._forward_hooks
    with pytest.raises(ValueError, match="pool"):
        set_router(model, pool="tokens")
    assert model.model._forward_pre_hooks and model.model._forward_hooks  # the body is hooked too
    unload_bundle(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks


# ---- the moving average --------------------------------------------------------------------------

def ema_loop(e, a, real, prev=None, seen=None):
    """The definition, one token at a time."""
    B, T, E = e.shape
    out = torch.zeros_like(e)
    for b in range(B):
        y = None if prev is None or not seen[b] else prev[b].clone()
        for t in range(T):
            if real[b, t]:
                y = e[b, t].clone() if y is None else (1 - a) * e[b, t] + a * y
            out[b, t] = y if y is not None else (prev[b] if prev is not None else 0.0)
    return out


@pytest.mark.parametrize("a", [0.0, 0.3, 0.9])
def test_ema_scan_matches_the_definition_and_carries_across_calls(a):
    g = torch.Generator().manual_seed(1)
    e = torch.rand(3, 37, 5, generator=g, dtype=torch.float64)
    real = torch.ones(3, 37, dtype=torch.bool)
    real[1, :6] = False  # left padding
    real[2, 30:] = False  # right padding
    y, last, seen = routing.ema(e, a, real)
    torch.testing.assert_close(y, ema_loop(e, a, real), rtol=1e-12, atol=1e-12)
    if a == 0.0:
        assert torch.equal(y[real], e[real])  # a = 0 is no smoothing at all
    # a prefill of 20 tokens, then one token at a time, equals the whole sequence at once
    y1, last1, seen1 = routing.ema(e[:, :20], a, real[:, :20])
    parts = [y1]
    for t in range(20, 37):
        yt, last1, seen1 = routing.ema(e[:, t:t + 1], a, real[:, t:t + 1], last1, seen1)
        parts.append(yt)
    torch.testing.assert_close(torch.cat(parts, 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last1, last, rtol=1e-12, atol=1e-12)
    assert seen.all() and seen1.all()


def test_ema_cost_is_log_depth():
    # no Python loop over tokens: 2048 tokens take 11 vector steps; keep it well under a millisecond per token
    import time

    e = torch.rand(1, 2048, 8)
    routing.ema(e, 0.5)
    t0 = time.perf_counter()
    for _ in range(5):
        routing.ema(e, 0.5)
    assert (time.perf_counter() - t0) / 5 < 0.2


# ---- smoothing delays a switch by the expected number of tokens ----------------------------------

D = 12


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return self.proj(x)


@pytest.fixture(scope="module")
def two_subspaces(tmp_path_factory):
    """Two rank-2 experts on orthogonal input subspaces (e0: coordinates 0,1; e1: coordinates 2,3)."""
    eye = torch.eye(D)
    experts = []
    for i in range(2):
        V = eye[:, 2 * i:2 * i + 2]
        sp = AdapterSpectra(modules={"proj": ModuleSpectrum(U=eye[:, 4:6], S=torch.tensor([2.0, 1.0]), V=V,
                                                             scaling=1.0)}, method="exact", params={})
        experts.append(({"name": f"e{i}", "version": 1, "content_sha256": "0" * 64, "rank": 2, "alpha": 2}, sp))
    base = {"name": "net", "architecture": "Net", "model_type": "none", "config_sha256": "0" * 64,
            "modules": {"proj": [D, D]}}
    return read_bundle(write_bundle(tmp_path_factory.mktemp("two") / "b", base=base, experts=experts))


def switch_sequence(n_old: int, n_new: int, new_share: float) -> torch.Tensor:
    """n_old unit tokens all in e0's subspace, then n_new unit tokens with cosine new_share to e1's."""
    x = torch.zeros(n_old + n_new, D)
    x[:n_old, 0] = 1.0
    x[n_old:, 2] = new_share
    x[n_old:, 1] = (1 - new_share**2) ** 0.5
    return x * torch.linspace(1, 3, n_old + n_new)[:, None]  # token norms vary: evidence is per unit norm


@torch.no_grad()
@pytest.mark.parametrize("a,new_share,delay", [
    (0.5, 1.0, 1), (0.8, 1.0, 3), (0.9, 1.0, 6),  # equal margins: first n with a^(n+1) < 1/2
    (0.5, 0.8, 2),  # margins 1 then 0.8 - 0.6 = 0.2: a^(n+1) < 0.2 / 1.2
])
def test_smoothing_delays_the_switch_by_the_expected_tokens(two_subspaces, a, new_share, delay):
    net = load_bundle(Net(), two_subspaces, router="spectr", top_k=1)
    x = switch_sequence(8, 10, new_share)
    with trace_routing(net) as trace:
        net(x[None])
    assert choices(trace, "proj")[0, :, 0].tolist() == [0] * 8 + [1] * 10  # off: switches at once
    set_router(net, smooth=a)
    with trace_routing(net) as trace:
        net(x[None])
    assert choices(trace, "proj")[0, :, 0].tolist() == [0] * (8 + delay) + [1] * (10 - delay)
    # a tiny smoothing routes like none
    set_router(net, smooth=1e-6)
    with trace_routing(net) as trace:
        net(x[None])
    assert choices(trace, "proj")[0, :, 0].tolist() == [0] * 8 + [1] * 10


# ---- pooling on the tiny Llama -------------------------------------------------------------------

@torch.no_grad()
def test_input_pool_shares_one_decision_per_input(bundle):
    model = routed(bundle)
    with trace_routing(model) as trace:
        model(IDS)
    ref = {m: choices(trace, m) for m in model.spectr.modules}
    split = any(not torch.equal(ref[f"model.layers.{i}.self_attn.q_proj"], ref[f"model.layers.{i}.self_attn.{p}"])
                for i in range(2) for p in QKV[1:])
    assert split  # independent modules disagree somewhere, so the pooled equality below means something
    set_router(model, pool="input")
    with trace_routing(model) as trace:
        model(IDS)
    for i in range(2):
        att = [choices(trace, f"model.layers.{i}.self_attn.{p}") for p in QKV]
        mlp = [choices(trace, f"model.layers.{i}.mlp.{p}_proj") for p in ("gate", "up")]
        assert all(torch.equal(att[0], c) for c in att) and torch.equal(mlp[0], mlp[1])
    # the shared decision is the top-k of the summed per-unit-norm scores of q, k and v
    attn = model.model.layers[0].self_attn
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    total = sum(routing.cosine(m._scores(routing.project(x, m.Vt, m.E)), x) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    want = torch.topk(total, 2, dim=1).indices
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        dy, vals, idx = m.delta(x)
        assert torch.equal(idx, want)
        own = m._scores(routing.project(x, m.Vt, m.E))
        torch.testing.assert_close(vals, own.gather(1, want))  # each module's weights use its own scores
    # a module alone in its group (o_proj) decides as without pooling
    alone = attn.o_proj.delta(x)
    set_router(model, pool="module")
    assert torch.equal(alone[2], attn.o_proj.delta(x)[2]) and torch.equal(alone[0], attn.o_proj.delta(x)[0])


@torch.no_grad()
def test_layer_pool_makes_one_decision_per_layer(bundle):
    model = routed(bundle, pool="input")
    with trace_routing(model) as trace:
        model(IDS)
    first = choices(trace, "model.layers.0.self_attn.q_proj")
    assert not torch.equal(first, choices(trace, "model.layers.0.mlp.up_proj"))  # input pooling: two decisions
    set_router(model, pool="layer")
    with trace_routing(model) as trace:
        out = model(IDS).logits
    assert torch.isfinite(out).all()
    # layer 0 sees the same input as before: its attention input group decides for all 7 modules
    decided = [choices(trace, f"model.layers.{i}.self_attn.q_proj") for i in range(2)]
    assert torch.equal(decided[0], first)
    for i in range(2):
        mods = [m for m in model.spectr.modules if m.startswith(f"model.layers.{i}.")]
        assert len(mods) == 7
        assert all(torch.equal(choices(trace, m), decided[i]) for m in mods)
    assert not torch.equal(decided[0], decided[1])  # each layer decides for itself
    # calling the body alone (as evaluation code does to skip the LM head) routes the same way
    with trace_routing(model) as again:
        model.model(input_ids=IDS)
    assert all(torch.equal(choices(again, m), choices(trace, m)) for m in model.spectr.modules)
    assert model.spectr.forward.depth == 0 and not model.spectr.forward.active


# ---- generate and padding ------------------------------------------------------------------------

OPTIONS = [dict(pool="module", smooth=0.6), dict(pool="input", smooth=0.5), dict(pool="layer", smooth=0.7),
           # round two: the running mean over the prompt, evidence across depth, attention following the MLP
           dict(pool="input", prompt_mean=0.7, depth_evidence="cumulative"),
           dict(pool="module", prompt_mean=1.0, attn_follows_mlp=True, calibrate="base_weight"),
           dict(pool="input", depth_evidence="decayed", attn_follows_mlp=True, calibrate="isotropic"),
           dict(pool="layer", smooth=0.0)]


def opts_id(o: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in o.items())


@torch.no_grad()
@pytest.mark.parametrize("opts", OPTIONS, ids=opts_id)
def test_generate_with_cache_equals_without_and_equals_one_forward(bundle, opts):
    model = routed(bundle, **opts)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with trace_routing(model) as trace:
        cached = model.generate(IDS, use_cache=True, **kw)
    steps = {m: choices(trace, m) for m in model.spectr.modules}
    assert trace.calls["model.layers.0.mlp.up_proj"][1][0].shape[1] == 1  # decode steps see one token
    plain = model.generate(IDS, use_cache=False, **kw)
    assert torch.equal(cached, plain)
    # the carried state makes each decode step route exactly as one forward over the whole text
    with trace_routing(model) as trace:
        model(cached[:, :-1])
    for m, got in steps.items():
        assert torch.equal(got, choices(trace, m)), m


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("opts", OPTIONS[:6], ids=opts_id)
def test_padded_batch_equals_single_rows(bundle, opts, side):
    model = routed(bundle, **opts)
    rows = [IDS[0, :12], IDS[0, 3:8], IDS[0, 1:10]]
    if side == "left":
        ids, mask = left_pad(rows, 12)
    else:
        ids, mask = left_pad([r.flip(0) for r in rows], 12)
        ids, mask = ids.flip(1), mask.flip(1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with trace_routing(model) as trace:
        batch = model(ids, attention_mask=mask, position_ids=pos).logits
    got = {m: choices(trace, m) for m in model.spectr.modules}
    for i, r in enumerate(rows):
        real = mask[i].bool()
        with trace_routing(model) as trace:
            single = model(r[None]).logits[0]
        assert (batch[i, real] - single).abs().max() <= 1e-5
        for m in model.spectr.modules:
            assert torch.equal(got[m][i, real], choices(trace, m)[0]), (m, i)


@torch.no_grad()
@pytest.mark.parametrize("opts", [dict(smooth=0.6), dict(prompt_mean=0.8, depth_evidence="cumulative",
                                                     attn_follows_mlp=True)], ids=opts_id)
def test_generate_left_padded_batch_with_smoothing(bundle, opts):
    model = routed(bundle, pool="input", **opts)
    model.generation_config.eos_token_id = None  # generate all the tokens asked for
    ids, mask = left_pad([IDS[0, :12], IDS[0, 4:9]], 12)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    cached = model.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kw))
    alone = model.generate(IDS[:, 4:9], use_cache=True, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cached[1, 12:], alone[0, 5:])  # the padded row continues as it would alone
