"""Make the small experts shipped in examples/experts/ from a full expert library.

Each expert's update s·B·A is cut to its top `--rank` singular directions per module and written back
with PEFT's own save_pretrained (bf16), so the demo ships real PEFT adapters in a few MB.

    python benchmarks/make_demo_experts.py --library ../shared/experts --base /path/to/SmolLM2-135M-Instruct \
        --domains code_python,bible_es,math_dm,email --rank 2 --out examples/experts
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM


def truncate(library: Path, base: Path, domain: str, rank: int, out: Path) -> None:
    cfg = json.loads((library / domain / "adapter_config.json").read_text())
    weights = load_file(library / domain / "adapter_model.safetensors")
    scaling = cfg["lora_alpha"] / cfg["r"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    lora = LoraConfig(
        r=rank,
        lora_alpha=scaling * rank,  # keeps the update's scale: alpha / r is unchanged
        target_modules=cfg["target_modules"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    state = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
        root = s[:rank].sqrt()
        module = key.removesuffix(".lora_A.weight")
        state[f"{module}.lora_A.default.weight"] = (root[:, None] * vh[:rank]).float()
        state[f"{module}.lora_B.default.weight"] = (u[:, :rank] * root[None, :]).float()
    missing = peft_model.load_state_dict(state, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"{domain}: unexpected keys {missing.unexpected_keys[:3]}")
    peft_model.peft_config["default"].base_model_name_or_path = cfg["base_model_name_or_path"]
    peft_model.to(torch.bfloat16).save_pretrained(out / domain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", type=Path, required=True)
    ap.add_argument("--base", type=Path, required=True, help="base model folder (config.json is enough)")
    ap.add_argument("--domains", required=True)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    for domain in args.domains.split(","):
        truncate(args.library, args.base, domain, args.rank, args.out)
        size = (args.out / domain / "adapter_model.safetensors").stat().st_size
        print(f"{domain}: rank {args.rank}, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
