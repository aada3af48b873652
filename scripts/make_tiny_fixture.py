"""Writes a tiny Llama base model and two PEFT LoRA adapters for it (the wheel smoke test's inputs).

    python scripts/make_tiny_fixture.py OUT   ->  OUT/base/, OUT/adapters/{tiny-a,tiny-b}/
Needs peft (the dev extra); the installed wheel under test does not.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def main(out: Path) -> None:
    base = tiny_llama()
    base.config.name_or_path = "tiny-org/tiny-llama"
    base.save_pretrained(out / "base")
    for seed, name in enumerate(["tiny-a", "tiny-b"]):
        torch.manual_seed(100 + seed)
        # init_lora_weights=False: random B, so the update is not zero.
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(tiny_llama(), cfg)
        peft_model.peft_config["default"].base_model_name_or_path = "tiny-org/tiny-llama"
        peft_model.save_pretrained(out / "adapters" / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
