"""Exact and randomized spectra of LoRA updates and dense deltas."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spectr.registry.spectra_format import spectra_to_bytes
from spectr.pipeline.spectra import adapter_spectra, exact_spectrum, randomized_spectrum
from spectr.pipeline.types import AdapterSource, BaseModelInfo, LoadedAdapter, ModuleFactors, ModuleShape
from tests.conftest import build_tiny_llama


def base_info(model, name: str = "tiny-org/tiny-llama", path: Path | None = None) -> BaseModelInfo:
    modules = {
        n: ModuleShape(in_features=m.in_features, out_features=m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    return BaseModelInfo(
        name=name, architecture="LlamaForCausalLM", model_type="llama", config=model.config.to_dict(),
        config_sha256="0" * 64, modules=modules, path=path,
    )


def load_peft_folder(folder: Path, base: BaseModelInfo) -> LoadedAdapter:
    """A plain LoRA (no patterns, no rsLoRA) read from a PEFT folder: enough for these tests."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    modules: dict[str, ModuleFactors] = {}
    for key, A in weights.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        B = weights[key.replace(".lora_A.", ".lora_B.")]
        modules[name] = ModuleFactors(name=name, A=A.float(), B=B.float(), scaling=alpha / r)
    return LoadedAdapter(
        source=AdapterSource(name=folder.name, path=folder, source=str(folder)), config=cfg, base=base,
        modules=modules, content_sha256="0" * 64, rank=r, alpha=alpha,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in modules}),
    )


def _factors(out_f: int, in_f: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)


def _rebuild(m) -> torch.Tensor:
    return m.scaling * (m.U.double() * m.S.double()) @ m.V.double().T


@pytest.fixture(scope="module")
def tiny_adapter(make_adapter):
    return load_peft_folder(make_adapter("spec-r4", seed=1), base_info(build_tiny_llama()))


@pytest.mark.parametrize("shape", [(96, 64, 8), (40, 200, 16), (16, 16, 16)])
def test_exact_reconstructs_scaled_update(shape):
    out_f, in_f, r = shape
    A, B = _factors(out_f, in_f, r)
    m = exact_spectrum(A, B, 2.0)
    assert m.U.shape == (out_f, r) and m.S.shape == (r,) and m.V.shape == (in_f, r)
    assert m.U.dtype == m.S.dtype == m.V.dtype == torch.float32
    want = 2.0 * B.double() @ A.double()
    assert (torch.linalg.norm(_rebuild(m) - want) / torch.linalg.norm(want)) < 1e-5
    assert m.energy == 1.0
    assert torch.all(m.S[:-1] >= m.S[1:])


def test_exact_matches_dense_svd():
    A, B = _factors(50, 30, 6, seed=3)
    m = exact_spectrum(A, B, 1.0)
    dense = B.double() @ A.double()
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    torch.testing.assert_close(m.S.double(), S[:6], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.U.double() @ m.U.double().T, U[:, :6] @ U[:, :6].T, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.V.double() @ m.V.double().T, Vh[:6].T @ Vh[:6], rtol=0, atol=1e-6)
    torch.testing.assert_close(m.U.double().T @ m.U.double(), torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-6)


def test_canonical_signs_and_factor_invariance():
    A, B = _factors(32, 24, 4, seed=5)
    m1 = exact_spectrum(A, B, 1.0)
    # B A = (B R^-1)(R A): the spectrum must not depend on how the factors split it.
    R = torch.randn(4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    m2 = exact_spectrum((R @ A.double()), B.double() @ torch.linalg.inv(R), 1.0)
    m3 = exact_spectrum(-A, -B, 1.0)
    for m in (m2, m3):
        torch.testing.assert_close(m.U, m1.U, rtol=0, atol=1e-5)
        torch.testing.assert_close(m.V, m1.V, rtol=0, atol=1e-5)
    top = m1.V.gather(0, m1.V.abs().argmax(0, keepdim=True))
    assert torch.all(top > 0)


def test_rank_deficient_factors():
    A, B = _factors(30, 20, 6, seed=7)
    B[:, 3:] = B[:, :3]  # rank(B A) = 3 at most
    A[3:] = 0
    m = exact_spectrum(A, B, 1.0)
    assert torch.count_nonzero(m.S) == 3
    assert torch.all(m.U[:, 3:] == 0) and torch.all(m.V[:, 3:] == 0)
    torch.testing.assert_close(m.V[:, :3].T @ m.V[:, :3], torch.eye(3), rtol=0, atol=1e-5)
    want = B.double() @ A.double()
    assert torch.linalg.norm(_rebuild(m) - want) / torch.linalg.norm(want) < 1e-5


def test_zero_update():
    A, B = _factors(12, 10, 4)
    m = exact_spectrum(A, torch.zeros_like(B), 1.0)
    assert torch.all(m.S == 0) and torch.all(m.U == 0) and torch.all(m.V == 0)
    r = randomized_spectrum((torch.zeros_like(B), A), 2)
    assert torch.all(r.S == 0) and r.energy == 1.0


def test_exact_float32_option_close_to_float64():
    A, B = _factors(64, 48, 8, seed=11)
    m64 = exact_spectrum(A, B, 1.0)
    m32 = exact_spectrum(A, B, 1.0, dtype=torch.float32)
    torch.testing.assert_close(m32.S, m64.S, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m32.V, m64.V, rtol=0, atol=1e-3)


def test_exact_rejects_mismatched_factors():
    A, B = _factors(12, 10, 4)
    with pytest.raises(ValueError, match=r"B \(12, 4\) @ A \(3, 10\)"):
        exact_spectrum(A[:3], B, 1.0)


def _decaying(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = min(out_f, in_f)
    U = torch.linalg.qr(torch.randn(out_f, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_f, n, generator=g, dtype=torch.float64)).Q
    S = 0.7 ** torch.arange(n, dtype=torch.float64)
    return (U * S) @ V.T, S


def test_randomized_vs_exact_on_decaying_spectrum():
    M, S = _decaying(120, 90)
    k = 8
    m = randomized_spectrum(M.float(), k, niter=4, oversample=8, seed=0)
    torch.testing.assert_close(m.S.double(), S[:k], rtol=1e-5, atol=1e-6)
    # Eckart-Young: the best rank-k error is ||S[k:]||; the randomized one must be within 1%.
    err = torch.linalg.norm(M - (m.U.double() * m.S.double()) @ m.V.double().T)
    best = torch.linalg.norm(S[k:])
    assert err <= 1.01 * best
    want_energy = float((S[:k] ** 2).sum() / (S**2).sum())
    assert m.energy == pytest.approx(want_energy, rel=1e-5)
    # Same seed, same result; another seed agrees on the values.
    again = randomized_spectrum(M.float(), k, niter=4, seed=0)
    assert torch.equal(again.U, m.U) and torch.equal(again.S, m.S)
    other = randomized_spectrum(M.float(), k, niter=4, seed=1)
    torch.testing.assert_close(other.S, m.S, rtol=1e-5, atol=1e-6)


def test_randomized_without_power_iterations_is_worse():
    M, S = _decaying(200, 150, seed=2)
    M = M + 0.02 * torch.randn(200, 150, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    k = 10
    err = lambda m: torch.linalg.norm(M - (m.U.double() * m.S.double()) @ m.V.double().T)  # noqa: E731
    e0 = err(randomized_spectrum(M, k, niter=0, oversample=2))
    e4 = err(randomized_spectrum(M, k, niter=4, oversample=2))
    assert e4 < e0


def test_truncation_energy_rank16_to_4(make_adapter):
    ad = load_peft_folder(make_adapter("spec-r16", seed=2, r=16, lora_alpha=16), base_info(build_tiny_llama()))
    full = adapter_spectra(ad, method="exact")
    cut = adapter_spectra(ad, method="exact", rank=4)
    rnd = adapter_spectra(ad, method="randomized", rank=4, niter=6)
    assert cut.params["rank"] == 4 and rnd.method == "randomized" and rnd.params["rank"] == 4
    for name, f in ad.modules.items():
        S = full.modules[name].S.double()
        want = float((S[:4] ** 2).sum() / (S**2).sum())
        # The total is ||B A||_F^2 itself, not just the sum of the kept values.
        total = float(torch.linalg.norm(f.B.double() @ f.A.double()) ** 2)
        assert float((S**2).sum()) == pytest.approx(total, rel=1e-5)
        assert cut.modules[name].energy == pytest.approx(want, rel=1e-6)
        assert 0.0 < want < 1.0
        assert cut.modules[name].S.shape == (4,) and cut.modules[name].U.shape[1] == 4
        assert rnd.modules[name].energy == pytest.approx(want, rel=1e-3)
        torch.testing.assert_close(rnd.modules[name].S, full.modules[name].S[:4], rtol=1e-3, atol=1e-5)
    assert cut.energy == min(m.energy for m in cut.modules.values()) < 1.0


def test_adapter_spectra_exact_all_modules(tiny_adapter):
    seen: list[tuple[int, int]] = []
    sp = adapter_spectra(tiny_adapter, progress=lambda d, t: seen.append((d, t)), device="cpu")
    assert sp.method == "exact" and sp.params == {"rank": None, "dtype": "float64", "device": "cpu"}
    assert list(sp.modules) == sorted(tiny_adapter.modules) and len(sp.modules) == 14
    assert seen[-1] == (14, 14)
    for name, f in tiny_adapter.modules.items():
        m = sp.modules[name]
        assert m.scaling == 2.0
        want = f.scaling * f.B.double() @ f.A.double()
        assert torch.linalg.norm(_rebuild(m) - want) / torch.linalg.norm(want) < 1e-5
        single = exact_spectrum(f.A, f.B, f.scaling, device="cpu")
        torch.testing.assert_close(m.V, single.V, rtol=0, atol=1e-6)


def test_dense_deltas_use_randomized(tiny_adapter):
    M, S = _decaying(64, 48, seed=3)
    tiny_adapter_dense = type(tiny_adapter)(
        source=tiny_adapter.source, config={}, base=tiny_adapter.base, modules={}, content_sha256="0" * 64,
        rank=6, alpha=6.0, target_modules=["q_proj"], dense_deltas={"model.layers.0.self_attn.q_proj": M.float()},
    )
    sp = adapter_spectra(tiny_adapter_dense, device="cpu")
    assert sp.method == "randomized" and sp.params["rank"] == 6 and sp.params["device"] == "cpu"
    m = sp.modules["model.layers.0.self_attn.q_proj"]
    assert m.scaling == 1.0 and m.S.shape == (6,)
    torch.testing.assert_close(m.S.double(), S[:6], rtol=1e-5, atol=1e-6)


def test_randomized_factors_match_dense():
    A, B = _factors(80, 60, 12, seed=13)
    via_factors = randomized_spectrum((B, A), 5, 0.5)
    via_dense = randomized_spectrum(B @ A, 5, 0.5)
    assert via_factors.scaling == 0.5
    torch.testing.assert_close(via_factors.S, via_dense.S, rtol=1e-4, atol=1e-4)
    assert via_factors.energy == pytest.approx(via_dense.energy, rel=1e-5)


def test_exact_runs_on_cpu_whatever_the_device(tiny_adapter):
    # The exact blob must not depend on the device: its heavy part stays on exact_device (CPU).
    sp = adapter_spectra(tiny_adapter, device="meta")
    assert sp.params["device"] == "cpu"
    assert spectra_to_bytes(sp) == spectra_to_bytes(adapter_spectra(tiny_adapter, device="cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exact_blob_identical_on_cuda_and_cpu(tiny_adapter):
    cpu = spectra_to_bytes(adapter_spectra(tiny_adapter, device="cpu"))
    gpu = spectra_to_bytes(adapter_spectra(tiny_adapter, device="cuda"))
    assert cpu == gpu
    fast = adapter_spectra(tiny_adapter, device="cuda", exact_device="cuda")
    assert fast.params["device"] == "cuda"
