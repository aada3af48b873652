"""Our arrow router against peft.create_arrow_model, and GPT-2 Conv1D (fan_in_fan_out) modules."""
from __future__ import annotations

import pytest
import torch

from spectr.runtime import PEFT_ARROW, load_bundle, plot_routing, trace_routing
from tests.conftest import build_tiny_llama
from tests.runtime.helpers import bundle_from_adapters, spectra_from_adapter

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 120, 1, 77, 31, 2]])


def gapped_adapter(out, seed):
    """A PEFT adapter whose every module has sigma2/sigma1 well below 0.8 (one dominant LoRA direction),
    so PEFT's 15 power iterations find v_1 to float32 accuracy."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_llama()  # seeds torch itself, so seed the LoRA init after it
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p[0] *= 6.0
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gapped(tmp_path_factory):
    root = tmp_path_factory.mktemp("gapped")
    folders = [gapped_adapter(root / f"task{i}", seed=20 + i) for i in range(4)]
    return folders, bundle_from_adapters(root / "bundle", folders, build_tiny_llama())


def test_gapped_adapters_have_a_spectral_gap(gapped):
    for folder in gapped[0]:
        ratios = [float(ms.S[1] / ms.S[0]) for ms in spectra_from_adapter(folder).modules.values()]
        assert max(ratios) < 0.8
    firsts = [spectra_from_adapter(f).modules["model.layers.0.self_attn.q_proj"].S[0].item() for f in gapped[0]]
    assert len(set(firsts)) == len(firsts)  # the experts really differ


@torch.no_grad()
@pytest.mark.parametrize("k,tau", [(2, 1.0), (3, 0.5)])
def test_arrow_matches_peft_create_arrow_model(gapped, k, tau):
    from peft import ArrowConfig, create_arrow_model

    folders, bundle = gapped
    peft = create_arrow_model(build_tiny_llama(), [str(f) for f in folders],
                              ArrowConfig(top_k=k, router_temperature=tau, rng_seed=0)).eval()
    want = peft(IDS).logits
    ours = load_bundle(build_tiny_llama(), bundle, **{**PEFT_ARROW, "top_k": k, "temperature": tau})(IDS).logits
    base = build_tiny_llama()(IDS).logits
    assert (want - base).abs().max() > 1e-2
    assert (ours - want).abs().max() <= 1e-4
    # the comparison can tell routers apart: 1/k weights instead of the softmax miss by far
    uniform = load_bundle(build_tiny_llama(), bundle, **{**PEFT_ARROW, "top_k": k, "weighting": "uniform"})(IDS).logits
    assert (uniform - want).abs().max() > 1e-2


@torch.no_grad()
def test_trace_heatmap(gapped, tmp_path):
    folders, bundle = gapped
    model = load_bundle(build_tiny_llama(), bundle, router="spectr", top_k=2)
    with trace_routing(model) as trace:
        model(IDS)
    idx, vals = trace.choices("model.layers.1.mlp.down_proj")
    assert idx.shape == (1, IDS.shape[1], 2) and (vals[..., 0] >= vals[..., 1]).all()
    grid = trace.top1_grid()
    assert grid.shape == (IDS.shape[1], 2) and grid.max() < len(folders)
    # the grid's cell is the most frequent top-1 over the layer's 7 modules
    layer0 = torch.stack([trace.choices(m)[0][0, :, 0] for m in trace.calls if ".layers.0." in m], 1)
    assert torch.equal(grid[:, 0], layer0.mode(dim=1).values)
    png = plot_routing(trace, tmp_path / "trace.png", [f.name for f in folders])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model(IDS)  # outside the block nothing is recorded
    assert trace.choices("model.layers.1.mlp.down_proj")[0].shape[1] == IDS.shape[1]


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64)).eval()


@torch.no_grad()
def test_gpt2_conv1d_fixed_equals_peft(make_adapter, tmp_path):
    from peft import PeftModel

    folder = make_adapter("gpt2-lora", seed=5, model=tiny_gpt2(), target_modules=["c_attn", "c_proj", "c_fc"],
                          fan_in_fan_out=True)
    model = tiny_gpt2()
    bundle = bundle_from_adapters(tmp_path / "gpt2", [folder], model)
    want = PeftModel.from_pretrained(tiny_gpt2(), folder).eval()(IDS).logits
    assert (want - model(IDS).logits).abs().max() > 1e-3
    got = load_bundle(model, bundle, router="fixed", expert="gpt2-lora")(IDS).logits
    assert (got - want).abs().max() <= 1e-5
