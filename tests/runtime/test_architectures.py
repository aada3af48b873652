"""Qwen2, Mistral and Gemma through the whole path: PEFT adapter -> validate -> exact spectra -> bundle ->
routed model, where the fixed router must equal PEFT's own LoRA forward."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from spectr.pipeline.basemodel import base_model_from_config
from spectr.pipeline.spectra import adapter_spectra
from spectr.pipeline.types import AdapterSource
from spectr.pipeline.validate import load_adapter
from spectr.runtime import load_bundle, unload_bundle, write_bundle

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 11]])


def _model(kind: str):
    from transformers import GemmaConfig, GemmaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**SMALL)).eval()
    return GemmaForCausalLM(GemmaConfig(**SMALL, head_dim=16)).eval()


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "gemma"])
@torch.no_grad()
def test_fixed_router_equals_peft_on(kind, tmp_path):
    folder = tmp_path / f"{kind}-expert"
    torch.manual_seed(1)
    peft = get_peft_model(_model(kind), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(folder)
    peft.eval()

    model = _model(kind)
    base = base_model_from_config(model.config.to_dict(), f"tiny/{kind}")
    adapter = load_adapter(AdapterSource(name=folder.name, path=folder, source=str(folder)), base)
    assert len(adapter.modules) == 14  # 7 linear modules x 2 layers, Qwen2's q/k/v biases notwithstanding
    spectra = adapter_spectra(adapter)
    info = {"name": folder.name, "version": 1, "content_sha256": adapter.content_sha256, "rank": 4, "alpha": 8}
    bundle = write_bundle(tmp_path / "bundle", base=base.manifest(), experts=[(info, spectra)])
    before = model(IDS).logits
    routed = load_bundle(model, bundle, router="fixed", expert=folder.name)
    want = peft(IDS).logits
    assert (want - before).abs().max() > 1e-3
    assert (routed(IDS).logits - want).abs().max() <= 1e-5
    assert torch.equal(unload_bundle(routed)(IDS).logits, before)
