"""Spectra of expert updates: delta W = scaling * U diag(S) V^T.

exact_spectrum: from LoRA factors, QR(B) = Qb Rb, QR(A^T) = Qa Ra, SVD(Rb Ra^T) = Uc S Vc^T,
U = Qb Uc, V = Qa Vc; O((in + out) r^2), never forming the out x in matrix.
randomized_spectrum: Halko et al. truncated SVD of a dense delta, or of B @ A applied through the
factors, with captured energy ||S_k||^2 / ||delta||_F^2.
Outputs are float32 with canonical signs (largest-|.| entry of each V column positive) and the
directions of zero singular values set to zero (they are not part of the update's subspace).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor

from spectr.pipeline.types import LoadedAdapter
from spectr.runtime.spectrum import AdapterSpectra, ModuleSpectrum

Progress = Callable[[int, int], None]


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for the many small factor QRs/SVDs: measured on the shared 2-core box, the 8
    experts' exact spectra took 2.3-4.2 s with 2 threads and 0.3-0.5 s with 1 (bit-identical results)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _zero_tolerance(S: Tensor, rows: int, cols: int) -> Tensor:
    """Numerical-rank cutoff per batch item (as numpy's matrix_rank): S_max * max(dims) * eps."""
    eps = torch.finfo(S.dtype).eps
    return S.amax(dim=-1, keepdim=True) * max(rows, cols) * eps


def _canonical(U: Tensor, S: Tensor, V: Tensor, rows: int, cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """Batched (..., n, k) U and V: fix signs, zero out null directions."""
    idx = V.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(V, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    keep = (S > _zero_tolerance(S, rows, cols)).to(S.dtype)
    S = S * keep
    U = U * (sign * keep.unsqueeze(-2))
    V = V * (sign * keep.unsqueeze(-2))
    return U, S, V


def _exact_batch(A: Tensor, B: Tensor, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """A: (n, r, in), B: (n, out, r) -> U (n, out, r), S (n, r), V (n, in, r), float32 on CPU."""
    out_f, in_f = B.shape[-2], A.shape[-1]
    Bd = B.to(device=device, dtype=dtype)
    Ad = A.to(device=device, dtype=dtype)
    Qb, Rb = torch.linalg.qr(Bd)
    Qa, Ra = torch.linalg.qr(Ad.transpose(-1, -2))
    # The small r x r core is solved on CPU in float64 so the (sign-sensitive) SVD does not depend
    # on the device's LAPACK.
    core = (Rb.to("cpu", torch.float64) @ Ra.to("cpu", torch.float64).transpose(-1, -2))
    Uc, S, Vch = torch.linalg.svd(core)
    Uc, Vc = Uc.to(device, dtype), Vch.transpose(-1, -2).to(device, dtype)
    U = Qb @ Uc
    V = Qa @ Vc
    U, S, V = _canonical(U, S.to(device, dtype), V, out_f, in_f)
    return U.float().cpu(), S.float().cpu(), V.float().cpu()


def exact_spectrum(
    A: Tensor, B: Tensor, scaling: float, *, device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> ModuleSpectrum:
    """Exact SVD of B @ A (A: r x in, B: out x r) through its factors; energy is 1.0."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"exact_spectrum: factor shapes do not chain: B {tuple(B.shape)} @ A {tuple(A.shape)}")
    U, S, V = _exact_batch(A.unsqueeze(0), B.unsqueeze(0), default_device(device), dtype)
    return ModuleSpectrum(U=U[0].contiguous(), S=S[0].contiguous(), V=V[0].contiguous(), scaling=float(scaling), energy=1.0)


def _frobenius_sq_factors(B: Tensor, A: Tensor) -> Tensor:
    """||B A||_F^2 = <B^T B, A A^T>, r x r work only."""
    return ((B.transpose(-1, -2) @ B) * (A @ A.transpose(-1, -2))).sum()


def randomized_spectrum(
    delta: Tensor | tuple[Tensor, Tensor], rank: int, scaling: float = 1.0, *, niter: int = 4,
    oversample: int = 8, seed: int = 0, device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> ModuleSpectrum:
    """Randomized rank-`rank` SVD of a dense out x in delta, or of B @ A given as (B, A)."""
    dev = default_device(device)
    if isinstance(delta, tuple):
        B, A = (t.to(device=dev, dtype=dtype) for t in delta)
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"randomized_spectrum: factor shapes do not chain: B {tuple(B.shape)} @ A {tuple(A.shape)}")
        out_f, in_f = B.shape[0], A.shape[1]
        matmul = lambda X: B @ (A @ X)  # noqa: E731
        rmatmul = lambda Y: A.transpose(0, 1) @ (B.transpose(0, 1) @ Y)  # noqa: E731
        total = _frobenius_sq_factors(B, A)
    else:
        M = delta.to(device=dev, dtype=dtype)
        if M.ndim != 2:
            raise ValueError(f"randomized_spectrum: expected a 2-D delta, got shape {tuple(M.shape)}")
        out_f, in_f = M.shape
        matmul = lambda X: M @ X  # noqa: E731
        rmatmul = lambda Y: M.transpose(0, 1) @ Y  # noqa: E731
        total = (M * M).sum()
    if rank < 1:
        raise ValueError(f"randomized_spectrum: rank must be >= 1, got {rank}")
    k = min(rank, out_f, in_f)
    width = min(k + oversample, out_f, in_f)
    # The test matrix comes from a CPU generator so CPU and GPU runs start from the same Omega.
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(in_f, width, generator=gen, dtype=torch.float64).to(dev, dtype)
    Q = torch.linalg.qr(matmul(omega)).Q
    for _ in range(niter):
        Z = torch.linalg.qr(rmatmul(Q)).Q
        Q = torch.linalg.qr(matmul(Z)).Q
    small = rmatmul(Q).transpose(0, 1)  # width x in = Q^T delta
    Us, S, Vh = torch.linalg.svd(small, full_matrices=False)
    U = (Q @ Us)[:, :k]
    V = Vh.transpose(0, 1)[:, :k]
    S = S[:k]
    U, S, V = _canonical(U, S, V, out_f, in_f)
    total_f = float(total)
    energy = 1.0 if total_f == 0.0 else min(1.0, float((S * S).sum()) / total_f)
    return ModuleSpectrum(
        U=U.float().cpu().contiguous(), S=S.float().cpu().contiguous(), V=V.float().cpu().contiguous(),
        scaling=float(scaling), energy=energy,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def adapter_spectra(
    adapter: LoadedAdapter, *, method: str = "exact", rank: int | None = None, niter: int = 4,
    device: str | None = None, progress: Progress | None = None, oversample: int = 8, seed: int = 0,
    dtype: torch.dtype = torch.float64, exact_device: str = "cpu",
) -> AdapterSpectra:
    """Spectra of every module of a loaded adapter.

    method "exact": SVD through the factors, batched over modules of equal shape; with rank below a
    module's rank the exact SVD is truncated (optimal) and its energy recorded.
    method "randomized": Halko through the factors (B (A x)) at `rank`, on `device`. Dense deltas
    always use it.
    The exact path runs on `exact_device`, CPU by default, whatever `device` says: QR on a GPU differs
    from CPU LAPACK in the last float64 bits, which flips float32 roundings (measured on an H200: 381
    of 42M values of a Llama-3-8B-shaped adapter), and the blob must not depend on the device. It is
    O((in + out) r^2), so the CPU costs little; pass exact_device="cuda" to trade bytes for speed.
    """
    if method not in ("exact", "randomized"):
        raise ValueError(f"adapter_spectra: unknown method {method!r} (exact or randomized)")
    dev = default_device(device)
    exact_dev = torch.device(exact_device)
    if adapter.dense_deltas:
        method = "randomized"
    names = sorted(adapter.dense_deltas) if adapter.dense_deltas else sorted(adapter.modules)
    total = len(names)
    out: dict[str, ModuleSpectrum] = {}
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if method == "randomized":
        target = rank if rank is not None else adapter.rank
        for name in names:
            if adapter.dense_deltas:
                delta, scaling = adapter.dense_deltas[name], 1.0
            else:
                f = adapter.modules[name]
                delta, scaling = (f.B, f.A), f.scaling
            out[name] = randomized_spectrum(
                delta, target, scaling, niter=niter, oversample=oversample, seed=seed, device=dev, dtype=dtype
            )
            tick(1)
        params = {"rank": target, "niter": niter, "oversample": oversample, "seed": seed,
                  "dtype": _dtype_name(dtype), "device": dev.type}
        return AdapterSpectra(modules=out, method="randomized", params=params)

    groups: dict[tuple[int, int, int], list[str]] = {}
    for name in names:
        f = adapter.modules[name]
        groups.setdefault((f.B.shape[0], f.A.shape[1], f.rank), []).append(name)
    for members in groups.values():
        A = torch.stack([adapter.modules[n].A for n in members])
        B = torch.stack([adapter.modules[n].B for n in members])
        if exact_dev.type == "cpu":
            with _one_thread():
                U, S, V = _exact_batch(A, B, exact_dev, dtype)
        else:
            U, S, V = _exact_batch(A, B, exact_dev, dtype)
        for i, n in enumerate(members):
            out[n] = _truncate(U[i], S[i], V[i], adapter.modules[n].scaling, rank)
        tick(len(members))
    out = {n: out[n] for n in names}
    params = {"rank": rank, "dtype": _dtype_name(dtype), "device": exact_dev.type}
    return AdapterSpectra(modules=out, method="exact", params=params)


def _truncate(U: Tensor, S: Tensor, V: Tensor, scaling: float, rank: int | None) -> ModuleSpectrum:
    energy = 1.0
    if rank is not None and rank < S.shape[0]:
        total = float((S.double() ** 2).sum())
        kept = float((S[:rank].double() ** 2).sum())
        energy = 1.0 if total == 0.0 else kept / total
        U, S, V = U[:, :rank], S[:rank], V[:, :rank]
    return ModuleSpectrum(U=U.contiguous(), S=S.contiguous(), V=V.contiguous(), scaling=float(scaling), energy=energy)
