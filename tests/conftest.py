"""Shared fixtures: a tiny Llama base model and a factory for real PEFT adapters."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest

# Before anything imports prefect or huggingface_hub: no network, no analytics, private homes.
_TMP = Path(tempfile.mkdtemp(prefix="spectr-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", str(_TMP / "prefect"))
os.environ["SPECTR_HOME"] = str(_TMP / "spectr-home")
os.environ.pop("SPECTR_REGISTRY_URL", None)
os.environ.pop("SPECTR_BLOB_URL", None)

import torch  # noqa: E402

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
TINY_BASE_NAME = "tiny-org/tiny-llama"


def build_tiny_llama(seed: int = 0, **overrides: Any):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY_LLAMA, **overrides})
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (config.json + model.safetensors) whose name is tiny-org/tiny-llama."""
    d = tmp_path_factory.mktemp("bases") / "tiny-llama"
    build_tiny_llama().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory, tiny_base_dir) -> Callable[..., Path]:
    """make_adapter(name, seed=0, **lora_kwargs) -> folder written by PEFT's own save_pretrained.

    Defaults: r=4, lora_alpha=8, all linear modules of the tiny Llama, random (non-zero) B.
    Pass model=<a transformers model> to adapt another base (e.g. a tiny GPT-2).
    """
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    made: dict[tuple, Path] = {}

    def _make(name: str, seed: int = 0, model=None, **lora_kwargs: Any) -> Path:
        key = (name, seed, repr(sorted(lora_kwargs.items())), id(model))
        if key in made:
            return made[key]
        base = model if model is not None else build_tiny_llama()
        kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        kwargs.update(lora_kwargs)
        torch.manual_seed(seed)
        peft_model = get_peft_model(base, LoraConfig(**kwargs))
        peft_model.peft_config["default"].base_model_name_or_path = TINY_BASE_NAME
        out = root / name
        peft_model.save_pretrained(out)
        made[key] = out
        return out

    return _make


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary server and database), started once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def spectr_home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty SPECTR_HOME (embedded SQLite registry + local blob folder) for one test."""
    home = tmp_path / "spectr-home"
    monkeypatch.setenv("SPECTR_HOME", str(home))
    monkeypatch.delenv("SPECTR_REGISTRY_URL", raising=False)
    monkeypatch.delenv("SPECTR_BLOB_URL", raising=False)
    return home
