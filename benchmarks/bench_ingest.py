"""A whole ingest's time, split into read+hash, validate, SVD and write, stage by stage in one run.

The adapter is a real PEFT-format folder (adapter_config.json + adapter_model.safetensors, float32)
with Llama-3-8B shapes, rank 16, all linear modules, random factors; the base model is only its
config.json (validation instantiates it on the meta device). `--library DIR` adds every adapter folder
under DIR (e.g. ../shared/experts).

    python benchmarks/bench_ingest.py --out-json benchmarks/results/ingest_cpu.json
    python benchmarks/bench_ingest.py --library ../shared/experts --base-config PATH_TO_SMOLLM2_FOLDER
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


from spectr.pipeline.basemodel import resolve_base_model  # noqa: E402
from spectr.pipeline.fetch import fetch  # noqa: E402
from spectr.pipeline.spectra import adapter_spectra  # noqa: E402
from spectr.pipeline.persist import store_version, write_spectra_blob  # noqa: E402
from spectr.pipeline.validate import adapter_content_sha256, load_adapter  # noqa: E402
from spectr.registry.store import Registry  # noqa: E402

LLAMA3_8B_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
)
MODULES = {  # short name -> (out, in)
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}


def write_llama3_adapter(root: Path, rank: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """(base folder with config.json, adapter folder in PEFT's layout)."""
    from peft import LoraConfig

    base = root / "Meta-Llama-3-8B"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LLAMA3_8B_CONFIG["num_hidden_layers"]):
        for short, (out_f, in_f) in MODULES.items():
            part = "self_attn" if short.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{short}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
    adapter = root / "llama3-8b-r16"
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=sorted(MODULES), task_type="CAUSAL_LM")
    config.base_model_name_or_path = "meta-llama/Meta-Llama-3-8B"
    config.save_pretrained(adapter)
    return base, adapter


def time_ingest(folder: Path, base_dir: Path, registry: Registry, device: str | None) -> dict[str, float]:
    t = {}
    t0 = time.perf_counter()
    adapter_content_sha256(folder)  # reads every byte once
    t["read+hash"] = time.perf_counter() - t0
    base = resolve_base_model(base_dir)
    t0 = time.perf_counter()
    adapter = load_adapter(fetch(str(folder)), base)  # headers, keys, shapes, NaN/Inf (also hashes)
    t["validate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    spectra = adapter_spectra(adapter, device=device)
    t["svd"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    blob = write_spectra_blob(registry.blobs, adapter, spectra)
    store_version(registry, adapter, blob)
    t["write"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    t["blob_mb"] = blob.size_bytes / 1e6
    t["modules"] = len(spectra.modules)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", type=Path, help="also time every adapter folder under this directory")
    ap.add_argument("--base-config", type=Path, help="base model folder (config.json) for --library")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out-json", type=Path)
    args = ap.parse_args()
    results = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        registry = Registry(f"sqlite:///{root / 'registry.db'}", str(root / "blobs"))
        base, adapter = write_llama3_adapter(root / "llama3")
        size = (adapter / "adapter_model.safetensors").stat().st_size / 1e6
        results["runs"]["llama3-8b-r16"] = {**time_ingest(adapter, base, registry, args.device), "file_mb": size}
        if args.library:
            for folder in sorted(p for p in args.library.iterdir() if (p / "adapter_config.json").is_file()):
                results["runs"][folder.name] = time_ingest(folder, args.base_config, registry, args.device)
    stages = ["read+hash", "validate", "svd", "write", "total"]
    print(f"{'adapter':18}" + "".join(f"{s:>11}" for s in stages) + f"{'modules':>9}")
    for name, t in results["runs"].items():
        print(f"{name:18}" + "".join(f"{t[s]:10.3f}s" for s in stages) + f"{t['modules']:9d}")
        print(f"{'':18}" + "".join(f"{100 * t[s] / t['total']:10.1f}%" for s in stages))
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
