"""Test helpers: exact spectra of PEFT adapter folders (SVD of B @ A in float64) and bundles from them."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from spectr.runtime.spectrum import AdapterSpectra, ModuleSpectrum
from spectr.runtime import write_bundle
from spectr.runtime.bundle import module_shape

PREFIX = "base_model.model."


def spectra_from_adapter(folder: Path) -> AdapterSpectra:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = load_file(folder / "adapter_model.safetensors")
    modules = {}
    for key, A in sd.items():
        if ".lora_A." not in key:
            continue
        name = key[len(PREFIX):].split(".lora_A.")[0]
        B = sd[key.replace(".lora_A.", ".lora_B.")]
        r = A.shape[0]
        U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
        modules[name] = ModuleSpectrum(
            U=U[:, :r].float(), S=S[:r].float(), V=Vh[:r].T.float(), scaling=cfg["lora_alpha"] / r
        )
    return AdapterSpectra(modules=modules, method="exact", params={"rank": cfg["r"]})


def base_of(model, modules) -> dict:
    return {
        "name": "tiny-org/tiny-llama",
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "config_sha256": "0" * 64,
        "modules": {m: list(module_shape(model.get_submodule(m))) for m in modules},
    }


def bundle_from_adapters(out: Path, folders: list[Path], model) -> Path:
    experts = []
    for f in folders:
        sp = spectra_from_adapter(f)
        cfg = json.loads((f / "adapter_config.json").read_text())
        info = {"name": f.name, "version": 1, "content_sha256": "0" * 64, "rank": cfg["r"], "alpha": cfg["lora_alpha"]}
        experts.append((info, sp))
    modules = sorted({m for _, sp in experts for m in sp.modules})
    return write_bundle(out, base=base_of(model, modules), experts=experts)


def uneven_bundle(make_adapter, folder: Path, prefix: str, seed: int) -> Path:
    """Four experts of unequal ranks (4, 2, 4, 4), the third adapting attention only: a group's stacked V^T
    and the experts absent from a module must still split and route right."""
    folders = [make_adapter(f"{prefix}-alpha", seed=seed, r=4), make_adapter(f"{prefix}-beta", seed=seed + 1, r=2),
               make_adapter(f"{prefix}-gamma", seed=seed + 2, r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
               make_adapter(f"{prefix}-delta", seed=seed + 3, r=4)]
    from tests.conftest import build_tiny_llama

    return bundle_from_adapters(folder, folders, build_tiny_llama())


def left_pad(rows: list[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded with 0 to `width`: (input_ids, attention_mask)."""
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask
