"""set_expert_mask: per-token restriction of which experts the routers may use."""
from __future__ import annotations

import pytest
import torch

from spectr.runtime import (REFERENCE, load_bundle, read_bundle, routing, set_expert_mask, trace_routing,
                            unload_bundle)
from tests.conftest import build_tiny_llama
from tests.runtime.helpers import bundle_from_adapters, left_pad

NAMES = ("alpha", "beta", "gamma", "delta")
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 120, 1, 77, 12, 90]])
E = len(NAMES)
# every router and both combine modes; pool/smooth variants of the scoring routers
ROUTERS = {
    "defaults": dict(),
    "reference": dict(REFERENCE),
    "arrow": dict(router="arrow", top_k=3, pool="module"),
    "spectr-k2-factor-layer": dict(top_k=2, combine="factor", pool="layer"),
    "spectr-k2-smooth": dict(top_k=2, smooth=0.5),
    "uniform": dict(router="uniform"),
}


@pytest.fixture(scope="module")
def bundle(make_adapter, tmp_path_factory):
    folders = [make_adapter(f"mask-{n}", seed=i + 50, r=4) for i, n in enumerate(NAMES)]
    return read_bundle(bundle_from_adapters(tmp_path_factory.mktemp("mask") / "four", folders, build_tiny_llama()))


def rows_mask(T: int) -> torch.Tensor:
    """A different allowed subset for each token: two experts, rotating."""
    m = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T):
        m[t, t % E] = m[t, (t + 1) % E] = True
    return m


@torch.no_grad()
@pytest.mark.parametrize("name", ["defaults", "reference", "arrow", "spectr-k2-factor-layer", "spectr-k2-smooth"])
def test_routers_pick_only_allowed_experts(bundle, name):
    model = load_bundle(build_tiny_llama(), bundle, **ROUTERS[name])
    T = IDS.shape[1]
    allowed = rows_mask(T)
    with trace_routing(model) as trace:
        model(IDS)
    free = {m: trace.choices(m)[0][0] for m in model.spectr.modules}
    set_expert_mask(model, allowed)
    with trace_routing(model) as trace:
        model(IDS)
    changed = False
    for m in model.spectr.modules:
        idx, vals = trace.choices(m)
        idx, picked = idx[0], torch.isfinite(vals[0])  # -inf: top-k ran past the allowed experts
        assert picked[:, 0].all(), m  # every token picks at least one allowed expert
        assert allowed.gather(1, idx)[picked].all(), m
        assert not allowed.gather(1, idx)[~picked].any(), m
        changed |= not torch.equal(idx, free[m])
    assert changed  # the unrestricted routing did use other experts


@torch.no_grad()
@pytest.mark.parametrize("name", list(ROUTERS))
def test_one_allowed_expert_equals_the_fixed_router(bundle, name):
    model = load_bundle(build_tiny_llama(), bundle, **ROUTERS[name])
    fixed = load_bundle(build_tiny_llama(), bundle, router="fixed", expert=2)
    only = torch.tensor([False, False, True, False])
    set_expert_mask(model, only)
    want = fixed(IDS).logits
    assert (model(IDS).logits - want).abs().max() <= 1e-5
    set_expert_mask(model, only.expand(IDS.numel(), -1).clone())  # the same, one row per token
    assert (model(IDS).logits - want).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("name", list(ROUTERS) + ["fixed"])
def test_no_allowed_expert_gives_the_base_model(bundle, name):
    opts = dict(router="fixed", expert=1) if name == "fixed" else ROUTERS[name]
    base = build_tiny_llama()
    want = base(IDS).logits
    model = load_bundle(build_tiny_llama(), bundle, **opts)
    assert (model(IDS).logits - want).abs().max() > 1e-4  # the experts do change the output
    set_expert_mask(model, torch.zeros(E, dtype=torch.bool))
    assert torch.equal(model(IDS).logits, want)
    set_expert_mask(model, None)  # cleared: routed again
    assert (model(IDS).logits - want).abs().max() > 1e-4


@torch.no_grad()
def test_per_token_rows_at_one_module(bundle):
    """Module level, per token: one allowed -> that expert's LoRA; none -> 0; uniform -> mean of the allowed."""
    model = load_bundle(build_tiny_llama(), bundle)
    q = model.model.layers[1].self_attn.q_proj
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    allowed = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]]).bool()
    lora = torch.stack([routing.apply_fixed(x, q.Vt, q.US, q.s, e, E) for e in range(E)], dim=1)  # (t, E, out)
    set_expert_mask(model, allowed)
    dy, _, idx = q.delta(x)
    for t, e in ((0, 0), (1, 1), (2, 3)):
        assert torch.allclose(dy[t], lora[t, e], atol=1e-6)
    assert torch.equal(dy[3], torch.zeros_like(dy[3]))
    assert allowed[4, idx[4, 0]] and allowed[5, idx[5, 0]]
    model.spectr.config.router = "uniform"
    dy, _, _ = q.delta(x)
    mean = (lora * allowed[..., None]).sum(1) / allowed.sum(1, keepdim=True).clamp(min=1)
    assert torch.allclose(dy, mean, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("name", ["defaults", "spectr-k2-smooth"])
def test_padded_batch_with_row_masks_equals_single_rows(bundle, name):
    model = load_bundle(build_tiny_llama(), bundle, **ROUTERS[name])
    rows = [IDS[0, :12], IDS[0, 3:8]]
    ids, attn = left_pad(rows, 12)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    per_row = [rows_mask(12), ~rows_mask(12)]  # the padded row's mask is aligned with its padded positions
    set_expert_mask(model, torch.cat(per_row))
    with trace_routing(model) as trace:
        batch = model(ids, attention_mask=attn, position_ids=pos).logits
    got = {m: trace.choices(m)[0] for m in model.spectr.modules}
    for i, r in enumerate(rows):
        real = attn[i].bool()
        set_expert_mask(model, per_row[i][real])
        with trace_routing(model) as trace:
            single = model(r[None]).logits[0]
        assert (batch[i, real] - single).abs().max() <= 1e-5
        for m in model.spectr.modules:
            assert torch.equal(got[m][i, real], trace.choices(m)[0][0]), (m, i)


@torch.no_grad()
def test_generate_with_an_expert_subset(bundle):
    model = load_bundle(build_tiny_llama(), bundle, top_k=2)
    set_expert_mask(model, torch.tensor([True, False, True, False]))
    with trace_routing(model) as trace:
        model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for m in model.spectr.modules:
        assert set(trace.choices(m)[0].unique().tolist()) <= {0, 2}, m


def test_bad_masks_are_refused(bundle):
    model = load_bundle(build_tiny_llama(), bundle)
    with pytest.raises(ValueError, match=r"\(5, 4\).*12 token rows"):
        set_expert_mask(model, torch.ones(5, E, dtype=torch.bool))
        with torch.no_grad():
            model(IDS)
    with pytest.raises(ValueError, match=r"shape \(12, 3\).*\(N, 4\)"):
        set_expert_mask(model, torch.ones(12, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        set_expert_mask(model, torch.ones(E))
    unload_bundle(model)
    with pytest.raises(ValueError, match="no bundle"):
        set_expert_mask(model, None)
