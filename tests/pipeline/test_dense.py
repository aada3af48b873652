"""Dense experts: a full fine-tune minus its base, read with safetensors only."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spectr.pipeline.dense import load_dense
from spectr.pipeline.spectra import adapter_spectra
from spectr.pipeline.types import AdapterError, AdapterSource
from tests.conftest import build_tiny_llama
from tests.pipeline.test_spectra import base_info

Q0 = "model.layers.0.self_attn.q_proj"
D1 = "model.layers.1.mlp.down_proj"


def _low_rank(out_f: int, in_f: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g)


@pytest.fixture(scope="module")
def updates() -> dict[str, torch.Tensor]:
    return {Q0: _low_rank(64, 64, 2, 1), D1: _low_rank(64, 128, 3, 2)}


def _finetune(folder: Path, updates: dict[str, torch.Tensor], **save_kwargs) -> Path:
    model = build_tiny_llama()  # same seed as tiny_base_dir: identical base weights
    with torch.no_grad():
        for name, delta in updates.items():
            model.get_submodule(name).weight += delta
    model.save_pretrained(folder, **save_kwargs)
    return folder


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, updates) -> Path:
    return _finetune(tmp_path_factory.mktemp("ft") / "tiny-ft", updates)


@pytest.fixture(scope="module")
def base():
    return base_info(build_tiny_llama())


def _source(path: Path) -> AdapterSource:
    return AdapterSource(name=path.name, path=path, source=str(path))


def test_recovers_known_low_rank_update(finetuned, tiny_base_dir, base, updates):
    ad = load_dense(_source(finetuned), tiny_base_dir, base, rank=4)
    assert set(ad.dense_deltas) == {Q0, D1}  # untouched modules have zero delta and are skipped
    assert ad.modules == {} and ad.rank == 4 and ad.alpha == 4.0
    assert ad.target_modules == ["down_proj", "q_proj"]
    for name, delta in updates.items():
        got = ad.dense_deltas[name]
        assert got.dtype == torch.float32 and got.shape == delta.shape
        torch.testing.assert_close(got, delta, rtol=0, atol=1e-6)
    sp = adapter_spectra(ad, device="cpu")
    assert sp.method == "randomized"
    for name, delta in updates.items():
        m = sp.modules[name]
        true_rank = int(torch.linalg.matrix_rank(delta.double()))
        want = torch.linalg.svdvals(delta.double())[:4]
        torch.testing.assert_close(m.S.double()[:true_rank], want[:true_rank], rtol=1e-4, atol=1e-6)
        # Beyond the true rank only float32 rounding noise of W_ft - W_base remains.
        assert torch.all(m.S[true_rank:] < 1e-6 * m.S[0])
        assert m.scaling == 1.0 and m.energy == pytest.approx(1.0, abs=1e-6)
        rebuilt = (m.U.double() * m.S.double()) @ m.V.double().T
        assert torch.linalg.norm(rebuilt - delta.double()) / torch.linalg.norm(delta.double()) < 1e-5


def test_sharded_checkpoint_and_targets(tmp_path, tiny_base_dir, base, updates, finetuned):
    sharded = _finetune(tmp_path / "sharded", updates, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ad = load_dense(_source(sharded), tiny_base_dir, base, target_modules=["q_proj"], rank=2)
    assert list(ad.dense_deltas) == [Q0] and ad.target_modules == ["q_proj"]
    torch.testing.assert_close(ad.dense_deltas[Q0], updates[Q0], rtol=0, atol=1e-6)
    with pytest.raises(AdapterError, match="nope_proj"):
        load_dense(_source(sharded), tiny_base_dir, base, target_modules=["nope_proj"])


def test_content_hash_tracks_weights(tmp_path, finetuned, tiny_base_dir, base, updates):
    a = load_dense(_source(finetuned), tiny_base_dir, base)
    again = load_dense(_source(finetuned), tiny_base_dir, base)
    other = load_dense(_source(_finetune(tmp_path / "other", {Q0: 2 * updates[Q0]})), tiny_base_dir, base)
    assert a.content_sha256 == again.content_sha256 != other.content_sha256
    assert len(a.content_sha256) == 64


def test_shape_mismatch_names_file_module_and_shapes(tmp_path, tiny_base_dir, base):
    wrong = tmp_path / "wide"
    build_tiny_llama(intermediate_size=96).save_pretrained(wrong)
    with pytest.raises(AdapterError, match=r"model\.safetensors: module model\.layers\.0\.mlp\.down_proj: weight shape \(64, 96\), base model expects \(64, 128\)"):
        load_dense(_source(wrong), tiny_base_dir, base)


def test_refuses_pickle_and_unchanged(tmp_path, tiny_base_dir, base):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(AdapterError, match="safetensors required"):
        load_dense(_source(pickled), tiny_base_dir, base)
    with pytest.raises(AdapterError, match="no targeted module differs"):
        load_dense(_source(tiny_base_dir), tiny_base_dir, base)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_dense(_source(broken), tiny_base_dir, base)
