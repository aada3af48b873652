"""set_token_top_k: each token row routes with its own k inside one batch.

A row with k=1 equals the model loaded with top_k=1 and a row with k=2 the model with top_k=2, in one padded
batch and through generate() and its cache, for both impls, both combine modes and both weightings; the
fused path agrees with the plain one and compiles without graph breaks.
"""
from __future__ import annotations

import pytest
import torch

from spectr.runtime import (load_bundle, read_bundle, routing, set_expert_mask, set_router, set_token_top_k,
                            trace_routing)
from tests.conftest import build_tiny_llama
from tests.runtime.helpers import bundle_from_adapters

NAMES = ("alpha", "beta", "gamma", "delta")
E = len(NAMES)
ROWS = [torch.tensor([5, 17, 99, 3, 42, 8, 64, 120, 1, 77, 12, 90]), torch.tensor([33, 7, 61, 2, 18, 44, 101])]
KS = torch.tensor([1, 2])  # row 0 routes with k=1, row 1 with k=2
MODES = [dict(impl=i, combine=c, weighting=w) for i in ("plain", "fused") for c in ("mix", "factor")
         for w in ("softmax", "uniform")]
POOLS = {"input": dict(), "module": dict(pool="module"), "layer": dict(pool="layer"),
         "arrow": dict(router="arrow", pool="module"), "smooth": dict(smooth=0.5)}


def label(opts: dict) -> str:
    return "-".join(str(v) for v in opts.values()) or "defaults"


@pytest.fixture(scope="module")
def bundle(make_adapter, tmp_path_factory):
    folders = [make_adapter(f"topk-{n}", seed=i + 80, r=4) for i, n in enumerate(NAMES)]
    return read_bundle(bundle_from_adapters(tmp_path_factory.mktemp("topk") / "four", folders, build_tiny_llama()))


def padded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded batch of ROWS: ids, attention mask, position ids."""
    width = max(len(r) for r in ROWS)
    ids = torch.zeros(len(ROWS), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(ROWS):
        ids[i, width - len(r):], attn[i, width - len(r):] = r, 1
    return ids, attn, (attn.cumsum(1) - 1).clamp(min=0)


def per_row_k(model) -> None:
    """A forward pre-hook giving every token of batch row i the k KS[i] (as the server does per forward)."""
    def hook(_, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        set_token_top_k(model, KS.repeat_interleave(ids.shape[1]))
    model.register_forward_pre_hook(hook, with_kwargs=True)


@torch.no_grad()
@pytest.mark.parametrize("opts", MODES, ids=label)
def test_rows_with_k1_and_k2_equal_top_k_1_and_2_in_one_padded_batch(bundle, opts):
    ids, attn, pos = padded()
    want = [load_bundle(build_tiny_llama(), bundle, top_k=k, **opts)(ids, attention_mask=attn, position_ids=pos)
            .logits for k in (1, 2)]
    assert (want[0] - want[1])[attn.bool()].abs().max() > 1e-4  # k changes the output, so the check means something
    model = load_bundle(build_tiny_llama(), bundle, top_k=1, **opts)
    set_token_top_k(model, KS.repeat_interleave(ids.shape[1]))
    got = model(ids, attention_mask=attn, position_ids=pos).logits
    for i, k in enumerate(KS.tolist()):
        real = attn[i].bool()
        assert (got[i, real] - want[k - 1][i, real]).abs().max() <= 1e-5, (i, k)
    set_token_top_k(model, None)  # cleared: the config's top_k=1 everywhere again
    assert (model(ids, attention_mask=attn, position_ids=pos).logits - want[0]).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("name", list(POOLS))
def test_pool_options_and_impls_agree_with_per_row_k(bundle, name):
    """Per row k under every pool option, arrow and smoothing: equal to the whole-batch top_k, plain == fused."""
    ids, attn, pos = padded()
    k_rows = KS.repeat_interleave(ids.shape[1])
    got = {}
    for impl in ("plain", "fused"):
        model = load_bundle(build_tiny_llama(), bundle, top_k=2, impl=impl, **POOLS[name])
        set_token_top_k(model, k_rows)
        got[impl] = model(ids, attention_mask=attn, position_ids=pos).logits
    assert (got["plain"] - got["fused"]).abs().max() <= 1e-5
    for k in (1, 2):
        ref = load_bundle(build_tiny_llama(), bundle, top_k=k, **POOLS[name])
        want = ref(ids, attention_mask=attn, position_ids=pos).logits
        i, real = k - 1, attn[k - 1].bool()
        assert (got["fused"][i, real] - want[i, real]).abs().max() <= 1e-5, k


@torch.no_grad()
@pytest.mark.parametrize("opts", [MODES[0], MODES[7]], ids=label)
def test_generate_with_per_row_k_equals_each_top_k(bundle, opts):
    ids, attn, _ = padded()
    want = [load_bundle(build_tiny_llama(), bundle, top_k=k, **opts)
            .generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False, pad_token_id=0) for k in (1, 2)]
    assert not torch.equal(want[0], want[1])
    model = load_bundle(build_tiny_llama(), bundle, top_k=1, **opts)
    per_row_k(model)
    with trace_routing(model) as trace:
        got = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got[0], want[0][0]) and torch.equal(got[1], want[1][1])
    idx, vals = trace.choices(model.spectr.modules[0])
    assert vals.shape[-1] == E and torch.isfinite(vals).sum(-1).max() == 2  # ranked all, at most k chosen
    assert torch.isfinite(vals[0]).sum(-1).max() == 1


@torch.no_grad()
def test_per_token_k_at_one_module_with_a_mask(bundle):
    """Module level, token by token: k_t rows equal top_k=k_t rows; k beyond the allowed experts takes them all."""
    model = load_bundle(build_tiny_llama(), bundle, pool="module", impl="plain")
    q = model.model.layers[1].self_attn.q_proj
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    each = {}
    for k in (1, 2, 3, 4):
        set_router(model, top_k=k)
        each[k] = q.delta(x)[0]
    set_router(model, top_k=1)
    k = torch.tensor([1, 2, 3, 4, 4, 3, 2, 1])
    set_token_top_k(model, k)
    dy, vals, _ = q.delta(x)
    for t in range(8):
        assert torch.allclose(dy[t], each[int(k[t])][t], atol=1e-6), t
    assert torch.equal(torch.isfinite(vals).sum(1), k)
    allowed = torch.zeros(8, E, dtype=torch.bool)
    allowed[:, :2] = True  # two experts allowed: k=3 or 4 picks those two
    set_expert_mask(model, allowed)
    dy, vals, _ = q.delta(x)
    assert torch.equal(torch.isfinite(vals).sum(1), k.clamp(max=2))
    set_token_top_k(model, None)
    set_router(model, top_k=2)  # the whole batch at k=2 under the same mask: the tokens with k >= 2 alike
    assert torch.allclose(q.delta(x)[0][k >= 2], dy[k >= 2], atol=1e-6)


def test_cut_keeps_each_tokens_first_k():
    vals = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, float("-inf")]])
    got = routing.cut(vals, torch.tensor([1, 3]))
    assert torch.equal(torch.isfinite(got), torch.tensor([[True, False, False], [True, True, False]]))
    assert routing.cut(vals, 2) is vals


@torch.no_grad()
def test_fused_with_per_token_k_compiles_without_graph_breaks(bundle):
    ids = ROWS[0][None]
    model = load_bundle(build_tiny_llama(), bundle, top_k=1)
    k = torch.tensor([1, 2] * 6)
    set_token_top_k(model, k)
    want = model(ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert (compiled(ids).logits - want).abs().max() <= 1e-5
    set_token_top_k(model, 3 - k)  # new values, same shape: a graph input
    got = compiled(ids).logits
    set_router(model, impl="plain")
    assert (got - model(ids).logits).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_cuda_fused_with_per_token_k_equals_plain(bundle):
    """On a GPU a per-token k bypasses the Triton kernel for the torch code: still equal to the plain path."""
    ids, attn, pos = (t.cuda() for t in padded())
    got = {}
    for impl in ("plain", "fused"):
        model = load_bundle(build_tiny_llama(), bundle, impl=impl).cuda()
        set_token_top_k(model, KS.repeat_interleave(ids.shape[1]).cuda())
        got[impl] = model(ids, attention_mask=attn, position_ids=pos).logits
    assert (got["plain"] - got["fused"]).abs().max() <= 1e-3


def test_bad_k_is_refused(bundle):
    model = load_bundle(build_tiny_llama(), bundle)
    with pytest.raises(ValueError, match=r"\(5,\).*12 token rows"):
        set_token_top_k(model, torch.ones(5, dtype=torch.long))
        with torch.no_grad():
            model(ROWS[0][None])
    with pytest.raises(ValueError, match="integer"):
        set_token_top_k(model, torch.ones(12))
    with pytest.raises(ValueError, match=r"shape \(2, 6\)"):
        set_token_top_k(model, torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 1, got 0"):
        set_token_top_k(model, torch.tensor([1, 0, 2]))
