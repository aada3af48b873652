"""Round-two routing options on tiny models with known answers: calibration from the weights alone
(calibrate), a running mean over the prompt (prompt_mean), evidence across depth (depth_evidence) and
attention following the MLP below (attn_follows_mlp). Padding and generate() with its cache are covered
with the other options in test_pooling.py; fused against plain in test_fused.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from spectr.runtime import RouterConfig, load_bundle, read_bundle, routing, set_router, trace_routing, write_bundle
from spectr.runtime.spectrum import AdapterSpectra, ModuleSpectrum

D = 12
EYE = torch.eye(D)


def make_bundle(folder, modules: dict[str, list[list[int]]], arch: str = "One"):
    """One expert per entry of each module's list: expert e's input subspace is spanned by those coordinates."""
    n = len(next(iter(modules.values())))
    experts = []
    for e in range(n):
        spectra = {}
        for m, coords in modules.items():
            r = len(coords[e])
            spectra[m] = ModuleSpectrum(U=EYE[:, 8:8 + r] if r <= 4 else EYE[:, :r], S=torch.linspace(2, 1, r),
                                        V=EYE[:, coords[e]], scaling=1.0)
        rank = max(len(modules[m][e]) for m in modules)
        experts.append(({"name": f"e{e}", "version": 1, "content_sha256": "0" * 64, "rank": rank, "alpha": rank},
                        AdapterSpectra(modules=spectra, method="exact", params={})))
    base = {"name": "net", "architecture": arch, "model_type": "none", "config_sha256": "0" * 64,
            "modules": {m: [D, D] for m in modules}}
    return read_bundle(write_bundle(folder, base=base, experts=experts))


def unit(**coords: float) -> torch.Tensor:
    """A (D,) token with the given coordinates (c0=..., c2=...), scaled to norm 3 (evidence is per unit norm)."""
    x = torch.zeros(D)
    for k, v in coords.items():
        x[int(k[1:])] = v
    return 3 * x / x.norm()


def top1(model, x, **kw):
    with trace_routing(model) as trace:
        model(x, **kw)
    return {m: trace.choices(m)[0][..., 0] for m in trace.calls}


# ---- calibrate -------------------------------------------------------------------------------------

class One(nn.Module):
    def __init__(self, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D, bias=False)
        if weight is not None:
            self.proj.weight.data.copy_(weight)

    def forward(self, x):
        return self.proj(x)


@pytest.fixture(scope="module")
def two_subspaces(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("cal") / "b", {"proj": [[0, 1], [2, 3]]})


@torch.no_grad()
@pytest.mark.parametrize("impl", ["fused", "plain"])
def test_base_weight_calibration_lets_the_unusually_aligned_expert_lose(two_subspaces, impl):
    # the base reads mostly coordinates 0 and 1 (e0's subspace): columns of norm 3 there, 1 elsewhere
    W = torch.diag(torch.tensor([3.0, 3.0] + [1.0] * (D - 2)))
    net = load_bundle(One(W), two_subspaces, router="spectr", top_k=1, pool="module", impl=impl)
    set_router(net, calibrate="base_weight")
    c = net.proj.calibration()
    # c_e = ||W V_e||_F / ||W||_F: sqrt(18/28) and sqrt(2/28)
    torch.testing.assert_close(c, torch.tensor([(18 / 28) ** 0.5, (2 / 28) ** 0.5]))
    x = unit(c0=0.8, c2=0.6)[None, None]  # raw: e0 (0.8 > 0.6); calibrated: 0.8/0.80 < 0.6/0.27, e1
    set_router(net, calibrate="none")
    assert top1(net, x)["proj"].item() == 0
    set_router(net, calibrate="base_weight")
    assert top1(net, x)["proj"].item() == 1
    set_router(net, calibrate="isotropic")  # equal ranks: the same ranking as the raw score
    assert top1(net, x)["proj"].item() == 0
    # a token well inside e0's subspace still goes to e0 (calibration scales, it does not forbid)
    set_router(net, calibrate="base_weight")
    assert top1(net, unit(c0=0.95, c2=0.3)[None, None])["proj"].item() == 0


@torch.no_grad()
def test_isotropic_calibration_is_rank_normalisation(tmp_path):
    bundle = make_bundle(tmp_path / "mixed", {"proj": [[0, 1, 2, 3], [4]]})  # ranks 4 and 1
    net = load_bundle(One(), bundle, router="spectr", top_k=1, pool="module", calibrate="isotropic")
    torch.testing.assert_close(net.proj.calibration(), torch.tensor([(4 / D) ** 0.5, (1 / D) ** 0.5]))
    # energy 0.6 spread over e0's four directions, 0.4 on e1's one: raw ||V^T x|| 0.77 vs 0.63 picks the
    # rank-4 expert; per expected score 1.34 vs 2.19 picks the rank-1 one, as rank_normalize does
    x = torch.zeros(D)
    x[:4], x[4] = (0.6 / 4) ** 0.5, 0.4 ** 0.5
    assert top1(net, x[None, None])["proj"].item() == 1
    set_router(net, calibrate="none")
    assert top1(net, x[None, None])["proj"].item() == 0
    set_router(net, rank_normalize=True)
    assert top1(net, x[None, None])["proj"].item() == 1


def test_calibration_of_an_absent_expert_is_one_and_mistakes_are_refused():
    Vt = torch.cat([EYE[:, :2].T, torch.zeros(2, D)])
    c = routing.calibration(Vt, torch.tensor([2, 0]), 2, torch.eye(D), "base_weight")
    assert c[1] == 1.0 and c[0] == pytest.approx((2 / D) ** 0.5)
    with pytest.raises(ValueError, match="calibrate"):
        RouterConfig(calibrate="data").validate()
    with pytest.raises(ValueError, match="base module's weight"):
        routing.calibration(Vt, torch.tensor([2, 0]), 2, None, "base_weight")


# ---- prompt_mean ------------------------------------------------------------------------------------

def mean_loop(e, real, prev=None, count=None):
    """The definition, one token at a time."""
    B, T, E = e.shape
    out = torch.zeros_like(e)
    for b in range(B):
        total = torch.zeros(E, dtype=e.dtype) if prev is None else prev[b].clone()
        n = 0.0 if count is None else float(count[b])
        for t in range(T):
            if real[b, t]:
                total, n = total + e[b, t], n + 1
            out[b, t] = total / max(n, 1.0)
    return out


def test_running_mean_matches_the_definition_and_carries_across_calls():
    g = torch.Generator().manual_seed(3)
    e = torch.rand(3, 29, 4, generator=g, dtype=torch.float64)
    real = torch.ones(3, 29, dtype=torch.bool)
    real[1, :5] = False  # left padding
    real[2, 20:] = False  # right padding
    m, total, n = routing.running_mean(e, real)
    torch.testing.assert_close(m, mean_loop(e, real), rtol=1e-12, atol=1e-12)
    assert n.tolist() == [29, 24, 20]
    m1, total1, n1 = routing.running_mean(e[:, :11], real[:, :11])
    parts = [m1]
    for t in range(11, 29):  # decode steps, one token each, carrying (sum, count)
        mt, total1, n1 = routing.running_mean(e[:, t:t + 1], real[:, t:t + 1], total1, n1)
        parts.append(mt)
    torch.testing.assert_close(torch.cat(parts, 1), m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total1, total, rtol=1e-12, atol=1e-12)


def switch_tokens(n_old: int, n_new: int) -> torch.Tensor:
    """n_old tokens in e0's subspace, then n_new in e1's (evidence (1, 0) then (0, 1)), norms varying."""
    x = torch.zeros(n_old + n_new, D)
    x[:n_old, 0], x[n_old:, 2] = 1.0, 1.0
    return x * torch.linspace(1, 3, n_old + n_new)[:, None]


@torch.no_grad()
@pytest.mark.parametrize("w,delay", [(0.0, 0), (0.5, 0), (0.9, 3), (1.0, 4)])
def test_prompt_mean_switches_at_the_known_token(two_subspaces, w, delay):
    # after j+1 new tokens: e1 = (1 - w) + w (j+1)/(5+j), e0 = w 4/(5+j). w = 0.9 flips at j = 3
    # (0.55 > 0.45; 0.486 < 0.514 at j = 2); w = 1 needs more new than old tokens (j = 4; j = 3 ties)
    net = load_bundle(One(), two_subspaces, router="spectr", top_k=1, pool="module", prompt_mean=w)
    got = top1(net, switch_tokens(4, 8)[None])["proj"][0].tolist()
    if w == 1.0:
        assert got[:4] == [0] * 4 and got[4 + 4:] == [1] * 4 and got[4 + 3] in (0, 1)  # j = 3 is a tie
        assert got[4:4 + 3] == [0] * 3
    else:
        assert got == [0] * (4 + delay) + [1] * (8 - delay)


def test_prompt_mean_and_smooth_are_one_or_the_other():
    with pytest.raises(ValueError, match="smooth and prompt_mean"):
        RouterConfig(smooth=0.5, prompt_mean=0.5).validate()
    with pytest.raises(ValueError, match="prompt_mean"):
        RouterConfig(prompt_mean=1.5).validate()


# ---- depth_evidence and attn_follows_mlp --------------------------------------------------------------

class Stack(nn.Module):
    """Two layers, each an attention module and an MLP module, each reading its own slice of the input:
    x (B, T, 4 D) -> layers.0.self_attn.q_proj, layers.0.mlp.up_proj, layers.1.self_attn.q_proj, layers.1.mlp.up_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.self_attn, block.mlp = nn.Module(), nn.Module()
            block.self_attn.q_proj = nn.Linear(D, D, bias=False)
            block.mlp.up_proj = nn.Linear(D, D, bias=False)
            self.layers.append(block)

    def forward(self, x):
        parts = x.split(D, dim=-1)
        outs = []
        for i, block in enumerate(self.layers):
            outs.append(block.self_attn.q_proj(parts[2 * i]))
            outs.append(block.mlp.up_proj(parts[2 * i + 1]))
        return torch.cat(outs, dim=-1)


MODS = ["layers.0.self_attn.q_proj", "layers.0.mlp.up_proj", "layers.1.self_attn.q_proj", "layers.1.mlp.up_proj"]


@pytest.fixture(scope="module")
def stack_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("stack") / "b", {m: [[0, 1], [2, 3]] for m in MODS}, "Stack")


def tokens(*evidence: tuple[float, float]) -> torch.Tensor:
    """One token whose input at each of the 4 modules (in call order) has cosines (to e0, to e1)."""
    return torch.cat([unit(c0=a, c2=b) for a, b in evidence])[None, None]


@torch.no_grad()
@pytest.mark.parametrize("mode,decay,want", [
    ("none", 0.5, [0, 0, 1, 1]),  # each module on its own evidence
    # cumulative: layer 1 attention sums 0.9+0.8+0.6 = 2.3 for e0 against 0.44+0.6+0.8 = 1.84; its MLP
    # 2.8 against 2.70
    ("cumulative", 1.0, [0, 0, 0, 0]),
    # decayed 0.5: layer 1 attention 0.6 + 0.5 (0.8 + 0.5 0.9) = 1.225 vs 0.8 + 0.5 (0.6 + 0.5 0.44) = 1.21;
    # its MLP 0.5 + 0.61 = 1.11 vs 0.87 + 0.60 = 1.47
    ("decayed", 0.5, [0, 0, 0, 1]),
    ("decayed", 0.2, [0, 0, 1, 1]),
])
def test_depth_evidence_adds_the_same_tokens_evidence_below(stack_bundle, mode, decay, want):
    net = load_bundle(Stack(), stack_bundle, router="spectr", top_k=1, pool="module", depth_evidence=mode,
                      depth_decay=decay)
    x = tokens((0.9, 0.436), (0.8, 0.6), (0.6, 0.8), (0.5, 0.866))
    got = top1(net, x)
    assert [got[m].item() for m in MODS] == want
    # a module called on its own (outside a model forward) decides on its own evidence
    alone = net.layers[1].self_attn.q_proj.delta(x[0, 0, 2 * D:3 * D][None])[2]
    assert alone[0, 0].item() == 1


@torch.no_grad()
def test_depth_evidence_follows_the_expected_sums(stack_bundle):
    """The decided evidence is the cumulative sum in call order (per token, several tokens at once)."""
    net = load_bundle(Stack(), stack_bundle, router="spectr", top_k=1, pool="module", depth_evidence="cumulative")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 9, 4 * D, generator=g)
    parts = x[0].split(D, dim=-1)
    ev = [torch.stack([p[:, :2].norm(dim=-1), p[:, 2:4].norm(dim=-1)], -1) / p.norm(dim=-1, keepdim=True) for p in parts]
    want = torch.stack(ev).cumsum(0).argmax(-1)
    got = top1(net, x)
    for i, m in enumerate(MODS):
        assert torch.equal(got[m][0], want[i]), m


@torch.no_grad()
@pytest.mark.parametrize("pool", ["module", "input"])
def test_attention_follows_the_mlp_decision_of_the_layer_below(stack_bundle, pool):
    net = load_bundle(Stack(), stack_bundle, router="spectr", top_k=1, pool=pool)
    x = tokens((0.2, 0.98), (0.9, 0.436), (0.2, 0.98), (0.1, 0.995))
    assert [top1(net, x)[m].item() for m in MODS] == [1, 0, 1, 1]
    set_router(net, attn_follows_mlp=True)
    # layer 0's attention has nothing below it and decides alone; layer 1's takes layer 0's MLP choice (e0)
    assert [top1(net, x)[m].item() for m in MODS] == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="attn_follows_mlp"):
        set_router(net, pool="layer")
