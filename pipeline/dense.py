"""A fully fine-tuned checkpoint minus its base, ingested as an expert (delta W per linear module).

Weights are read with safetensors only (single model.safetensors or a sharded index), never unpickled.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from spectr.digest import canonical_json, update_with_file
from spectr.pipeline.types import AdapterError, AdapterSource, BaseModelInfo, LoadedAdapter

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    single, index = folder / _SINGLE, folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise AdapterError(f"{index}: unreadable safetensors index ({e})") from None
        files = {k: folder / v for k, v in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise AdapterError(f"{index}: shard {f.name} is missing")
        return files
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as st:
                return {k: single for k in st.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise AdapterError(f"{single}: not a readable safetensors file ({e})") from None
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise AdapterError(f"{folder}: only pickle weights found; safetensors required")
    raise AdapterError(f"{folder}: no {_SINGLE} or {_INDEX}")


def _read(files: dict[str, Path], key: str) -> torch.Tensor:
    with safe_open(str(files[key]), framework="pt") as st:
        return st.get_tensor(key)


def _content_sha256(folder: Path, files: dict[str, Path]) -> str:
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(canonical_json(json.loads(cfg.read_text())).encode())
    for f in sorted(set(files.values())):
        h.update(f.name.encode())
        update_with_file(h, f)
    return h.hexdigest()


def load_dense(
    finetuned: AdapterSource, base_dir: Path, base: BaseModelInfo, *,
    target_modules: list[str] | None = None, rank: int = 16,
) -> LoadedAdapter:
    """delta W = W_finetuned - W_base for the targeted linear modules (default: all but lm_head)."""
    ft_dir, base_dir = Path(finetuned.path), Path(base_dir)
    ft_files, base_files = _weight_files(ft_dir), _weight_files(base_dir)
    wanted = set(target_modules) if target_modules else None
    names = [
        n for n in sorted(base.modules)
        if (wanted is None and n.rsplit(".", 1)[-1] != "lm_head") or (wanted and n.rsplit(".", 1)[-1] in wanted)
    ]
    if wanted:
        found = {n.rsplit(".", 1)[-1] for n in names}
        if wanted - found:
            raise AdapterError(f"{ft_dir}: target modules {sorted(wanted - found)} are not linear modules of {base.name}")
    deltas: dict[str, torch.Tensor] = {}
    for name in names:
        key = f"{name}.weight"
        shape = base.modules[name]
        expect = (shape.in_features, shape.out_features) if shape.conv1d else (shape.out_features, shape.in_features)
        for files, folder in ((ft_files, ft_dir), (base_files, base_dir)):
            if key not in files:
                raise AdapterError(f"{folder}: module {name}: tensor {key} missing")
        w_ft, w_base = _read(ft_files, key), _read(base_files, key)
        for w, files in ((w_ft, ft_files), (w_base, base_files)):
            if tuple(w.shape) != expect:
                raise AdapterError(
                    f"{files[key]}: module {name}: weight shape {tuple(w.shape)}, base model expects {expect}"
                )
        delta = w_ft.float() - w_base.float()
        if shape.conv1d:  # Conv1D stores W as in x out
            delta = delta.transpose(0, 1)
        if not torch.isfinite(delta).all():
            raise AdapterError(f"{ft_files[key]}: module {name}: non-finite weights, shape {tuple(w_ft.shape)}")
        if torch.count_nonzero(delta) == 0:
            continue
        deltas[name] = delta.contiguous()
    if not deltas:
        raise AdapterError(f"{ft_dir}: no targeted module differs from the base {base_dir}")
    short = sorted({n.rsplit(".", 1)[-1] for n in deltas})
    cfg_path = ft_dir / "config.json"
    ft_config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    config = {
        "peft_type": "DENSE", "r": rank, "lora_alpha": rank, "target_modules": short,
        "base_model_name_or_path": base.name, "finetune_config": ft_config,
    }
    return LoadedAdapter(
        source=finetuned, config=config, base=base, modules={},
        content_sha256=_content_sha256(ft_dir, ft_files), rank=rank, alpha=float(rank),
        target_modules=short, dense_deltas=deltas,
    )
