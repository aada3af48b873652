"""The gathered apply at decode sizes on one GPU: kernels.expand_group with rows as they come (1 and 32 rows),
U Sigma stored row-major (session 12) against transposed (the layer's layout since session 13), at each column
block the group's offsets allow. Llama-3-8B's groups (q,k,v; gate,up; o; down), E = 64, r = 16, top-1.
GPU time: bench_apply.timed (CUDA-graph replays of ten calls).

    python benchmarks/bench_apply_decode.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_apply import timed  # noqa: E402

from spectr.runtime import kernels  # noqa: E402

E, R = 64, 16
GROUPS = {"q,k,v": [4096, 1024, 1024], "gate,up": [14336, 14336], "o": [4096], "down": [4096]}


def main() -> None:
    torch.manual_seed(0)
    for name, outs in GROUPS.items():
        N, M = sum(outs), len(outs)
        starts = [sum(outs[:i]) for i in range(M)]
        blocks = [b for b in (16, 32, 64, 128) if all(o % b == 0 for o in starts)]
        U = torch.randn(N, E * R, device="cuda", dtype=torch.bfloat16)
        layouts = {"row-major": U.contiguous(), "transposed": U.T.contiguous().T}
        for t in (1, 32):
            y = torch.randn(t, N, device="cuda", dtype=torch.bfloat16)
            c = torch.randn(t, M, 1, R, device="cuda", dtype=torch.bfloat16)
            idx = torch.randint(0, E, (t, 1), device="cuda")
            res = {f"{lay} bn={b}": timed(lambda: kernels.expand_group(y, c, idx, US, starts, b))
                   for lay, US in layouts.items() for b in blocks}
            print(f"{name} t={t}: " + ", ".join(f"{k} {v:.1f} us" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
