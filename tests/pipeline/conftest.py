"""Helpers for the fetch/basemodel/validate tests: corrupt copies of real adapters, a fake HF cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file, save_file

from spectr.pipeline.types import BaseModelInfo

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"

SMOLLM2_CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    head_dim=64,
)


def clone(src: Path, dst: Path) -> Path:
    """A private copy of an adapter folder, safe to corrupt."""
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    file = folder / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


def edit_weights(folder: Path, fn: Callable[[dict], dict]) -> None:
    """Rewrite adapter_model.safetensors through fn(tensors) -> tensors (a real safetensors file)."""
    file = folder / "adapter_model.safetensors"
    save_file(fn(dict(load_file(file))), file)


def make_hub_cache(root: Path, repo_id: str, files_from: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """An HF_HUB_CACHE layout: models--org--name/{refs/<ref>, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        if f.is_file():
            shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline: the hub reads the ref verbatim
    return repo


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF cache, with huggingface_hub forced offline (its constants are read at import)."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir) -> BaseModelInfo:
    from spectr.pipeline.basemodel import resolve_base_model

    return resolve_base_model(tiny_base_dir)
