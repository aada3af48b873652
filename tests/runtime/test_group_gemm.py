"""The group GEMM (layer.layout_group): an input group's base weights and expert V^T in one matrix.

The base weights become views of the lead's W_group (no second copy), the routed forward runs one GEMM per input
group and hands each sibling its output, and the results are those of the per-module path: the same choices, the
same logits within float rounding; model.to() keeps the views, unload_bundle gives the weights their own storage.
"""
from __future__ import annotations

import copy

import pytest
import torch

from spectr.runtime import kernels, load_bundle, read_bundle, trace_routing, unload_bundle
from tests.conftest import build_tiny_llama
from tests.runtime.helpers import left_pad, uneven_bundle

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 120, 1, 77, 12, 90]])


@pytest.fixture(scope="module")
def bundle(make_adapter, tmp_path_factory):
    return read_bundle(uneven_bundle(make_adapter, tmp_path_factory.mktemp("group") / "four", "group", 80))


def shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def run(model, ids, **kw):
    with trace_routing(model) as trace:
        out = model(ids, **kw).logits
    return out, {m: trace.choices(m)[0].clone() for m in trace.calls}


def per_module(model, ids, **kw):
    """The same model through the per-module fused path: grad mode with weights that require grad keeps the
    base weights' own autograd (no group GEMM)."""
    with torch.enable_grad():
        out, idx = run(model, ids, **kw)
    return out.detach(), idx


def test_layout_views_the_base_weights_and_keeps_their_values(bundle):
    base = build_tiny_llama()
    before = [(p, p.detach().clone()) for p in base.parameters()]  # the same Parameter objects throughout
    model = load_bundle(base, bundle)
    attn = model.model.layers[0].self_attn
    members = attn.q_proj.siblings
    lead = members[0]
    assert [m.name.rsplit(".", 1)[1] for m in members] == ["k_proj", "q_proj", "v_proj"]
    assert lead.W_group.shape[0] == sum(m.base_layer.out_features + m.Vt.shape[0] for m in members)
    for m in members:
        assert shares(m.base_layer.weight, lead.W_group) and shares(m.Vt, lead.W_group)
        assert shares(m.US, lead.US_group)
    assert all(torch.equal(p, value) for p, value in before)
    unload_bundle(model)
    assert [id(p) for p in model.parameters()] == [id(p) for p, _ in before]
    for p, value in before:
        assert torch.equal(p, value)
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()  # its own storage again


@torch.no_grad()
@pytest.mark.parametrize("opts", [dict(), dict(top_k=2, combine="factor", weighting="uniform"),
                                  dict(router="arrow", top_k=3), dict(top_k=2, smooth=0.5), dict(router="uniform"),
                                  dict(pool="module", top_k=2)])
def test_group_gemm_equals_the_per_module_path(bundle, opts):
    model = load_bundle(build_tiny_llama(), bundle, **opts)
    calls = []
    hooks = [m.base_layer.register_forward_hook(lambda *a: calls.append(1))
             for m in model.modules() if hasattr(m, "base_layer")]
    ids, mask = left_pad([IDS[0, :12], IDS[0, 3:8], IDS[0, 1:10]], 12)
    kw = dict(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    got, got_idx = run(model, ids, **kw)
    # pool=module decides per module: q, k, v and gate, up keep the per-module path (o, down: groups of one)
    assert len(calls) == (2 * 5 if opts.get("pool") == "module" else 0)
    calls.clear()
    want, want_idx = per_module(model, ids, **kw)
    assert len(calls) == 2 * 7  # the per-module path calls every base layer
    for h in hooks:
        h.remove()
    assert (got - want).abs().max() <= 1e-5
    assert got_idx.keys() == want_idx.keys()
    for m in want_idx:
        assert torch.equal(got_idx[m], want_idx[m]), m


@torch.no_grad()
def test_generate_with_cache_and_moves_keep_the_layout(bundle):
    model = load_bundle(build_tiny_llama(), bundle)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(IDS, use_cache=False, **kw)
    assert torch.equal(model.generate(IDS, use_cache=True, **kw), want)
    logits = model(IDS).logits
    model.to(torch.float64)
    lead = model.model.layers[1].mlp.gate_proj.siblings[0]
    assert lead.W_group.dtype == torch.float64
    for m in lead.siblings:
        assert shares(m.base_layer.weight, lead.W_group) and m.base_layer.weight.dtype == torch.float64
    model.to(torch.float32)
    assert (model(IDS).logits - logits).abs().max() <= 1e-6
    twin = copy.deepcopy(model)  # Parameter's deepcopy clones: the twin's weights are copies of equal value
    assert not shares(twin.model.layers[1].mlp.gate_proj.siblings[0].W_group, lead.W_group)
    assert torch.equal(twin(IDS).logits, model(IDS).logits)


@torch.no_grad()
def test_a_sibling_called_with_another_input_computes_its_own_output(bundle):
    model = load_bundle(build_tiny_llama(), bundle)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(1, 5, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    alone = attn.k_proj(x2)  # outside a model forward: nothing is handed over
    st = model.spectr.forward
    st.begin(model, (), {})
    attn.q_proj(x1)  # hands k and v their outputs for x1
    got = attn.k_proj(x2)  # another input (cross-attention): not x1's output
    st.end()
    assert (got - alone).abs().max() <= 1e-6


@pytest.mark.skipif(kernels.expand_group is None, reason="needs Triton on a CUDA device (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("t,E,K,R,outs", [(1, 8, 1, 16, [64, 32, 32]), (20, 64, 1, 16, [64]), (5, 4, 2, 4, [32, 16]),
                                          (33, 8, 1, 16, [128, 64]), (300, 8, 1, 16, [64, 32, 32]),
                                          (257, 64, 2, 8, [32, 96])])
def test_expand_group_adds_each_members_chosen_experts(t, E, K, R, outs):
    """Rows as they come (decode sizes) and, past kernels.SORT_MIN rows, visited sorted by first choice."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(t + E)
    M, N = len(outs), sum(outs)
    Y = torch.randn(t, N + 40, generator=g)  # the members' outputs, then the group's score columns
    c = torch.randn(t, M, K, R, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
    US = torch.randn(N, E * R, generator=g)
    starts = [sum(outs[:m]) for m in range(M)]
    want = Y.double().clone()
    U = US.double().view(N, E, R)
    for m in range(M):
        cols = slice(starts[m], starts[m] + outs[m])
        want[:, cols] += torch.einsum("tkr,tknr->tn", c[:, m].double(), U[cols].permute(1, 0, 2)[idx])
    order = kernels.order(idx.to(dev), E)
    assert (order is None) == (t <= kernels.SORT_MIN)
    bn = 16 if order is None else 32
    got = kernels.expand_group(Y.to(dev).clone(), c.to(dev), idx.to(dev), US.to(dev), starts, bn,
                               order).double().cpu()
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert torch.equal(got[:, N:], Y[:, N:].double())  # the score columns are left alone
