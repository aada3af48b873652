"""Registry fixtures: a fresh Registry per test and hand-built LoadedAdapter records."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save

from spectr.pipeline.types import AdapterSource, BaseModelInfo, LoadedAdapter
from spectr.registry import Registry

BASE = BaseModelInfo(
    name="tiny-org/tiny-llama",
    architecture="LlamaForCausalLM",
    model_type="llama",
    config={"hidden_size": 64, "num_hidden_layers": 2, "model_type": "llama"},
    config_sha256="b" * 64,
    modules={},
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: needs a PostgreSQL server at SPECTR_TEST_POSTGRES_URL")


def loaded(name: str, content: str, base: BaseModelInfo = BASE, rank: int = 4) -> LoadedAdapter:
    """A LoadedAdapter as the pipeline would hand it over (factors are not needed by the registry)."""
    return LoadedAdapter(
        source=AdapterSource(name=name, path=Path("/adapters") / name, source=f"/adapters/{name}"),
        config={"r": rank, "lora_alpha": 2 * rank, "target_modules": ["v_proj", "q_proj"]},
        base=base,
        modules={},
        content_sha256=content * 64 if len(content) == 1 else content,
        rank=rank,
        alpha=2.0 * rank,
        target_modules=["v_proj", "q_proj"],
    )


def spectra_bytes(seed: int) -> bytes:
    """Real safetensors bytes shaped like one module's spectra."""
    g = torch.Generator().manual_seed(seed)
    return save({"m.U": torch.randn(8, 4, generator=g), "m.S": torch.rand(4, generator=g),
                 "m.V": torch.randn(6, 4, generator=g)})


@pytest.fixture()
def registry(spectr_home: Path):
    reg = Registry()
    yield reg
    reg.close()


@pytest.fixture()
def add(registry: Registry) -> Callable[..., tuple]:
    """add(name, content_char, seed=0, **kw) -> (VersionInfo, created), storing a real spectra blob first."""

    def _add(name: str, content: str, seed: int = 0, reg: Registry | None = None, **kw):
        reg = reg or registry
        data = spectra_bytes(seed)
        blob = reg.blobs.put(data)
        kw.setdefault("method", "exact")
        kw.setdefault("params", {"dtype": "float64"})
        return reg.add_version(
            loaded(name, content, **{k: kw.pop(k) for k in ("base", "rank") if k in kw}),
            blob, energy=kw.pop("energy", 1.0), n_modules=1, size_bytes=len(data), **kw,
        )

    return _add
