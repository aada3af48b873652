"""The apply and scoring steps of one routed module alone, on one GPU, at prefill size (issue 7, E = 64).

Where the routed prefill's time goes at large E, kernel by kernel and side by side: the pass over the base
output any apply makes (y *= 1, read and write), the dense apply (addmm_, K = E*r), the gathered apply
(kernels.expand: rows sorted by expert, only the chosen experts' U Sigma) at several tile shapes, and the
scoring GEMM in bf16 against fp8 (routing.project_fp8, quantization included). Shapes are Llama-3-8B's
(N = 4096, 1024, 14336 out; 4096 and 14336 in), 8 x 512 tokens, rank 16, top-1 (the default), random experts
chosen uniformly. GPU time: median of 50 CUDA-graph replays of ten calls (after 5 warm-ups), CUDA events.

    python benchmarks/bench_apply.py [--experts 64] [--tokens 4096] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from spectr.runtime import kernels, routing

R = 16
OUTS = {"q,o,down (N=4096)": 4096, "k,v (N=1024)": 1024, "gate,up (N=14336)": 14336}
PER_LAYER = {4096: 3, 1024: 2, 14336: 2}  # modules of each output width in a Llama layer
TILES = [(64, 128, 4, 2), (32, 256, 4, 2), (32, 256, 8, 2), (32, 512, 8, 2), (16, 256, 4, 2), (64, 256, 4, 3)]


def timed(fn, reps: int = 50, warmup: int = 5) -> float:
    """GPU time of one call: fn captured in a CUDA graph (ten calls) and replayed between CUDA events, so the
    host's launch cost (tens of us for a Triton launch from Python) does not count; a call that cannot be
    captured is timed as launched."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    inner = 10
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        run = graph.replay
    except Exception:  # noqa: BLE001 - not capturable: time it as launched
        torch.cuda.synchronize()
        inner = 1
        run = fn
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times) * 1000  # us


def expand_tile(y, c, idx, US, order, BT, BN, warps, stages):
    kernels.launch_expand(y, c, idx, US, order, BT, BN, num_warps=warps, num_stages=stages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="64")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = ap.parse_args()
    dev, bf = "cuda", torch.bfloat16
    t, rows = a.tokens, []
    default_block = kernels.ROUTE_BLOCK, kernels.ROUTE_WARPS
    torch.manual_seed(0)
    for E in [int(e) for e in a.experts.split(",")]:
        idx = torch.randint(0, E, (t, 1), device=dev)
        c = torch.randn(t, 1, R, device=dev, dtype=bf)
        C = torch.zeros(t, E, R, device=dev, dtype=bf).scatter_(1, idx[:, :, None].expand(t, 1, R), c).view(t, -1)
        perm = kernels.order(idx, E)
        rows.append(dict(E=E, what="order in torch (argsort of the choices)", us=timed(lambda: kernels.order(idx, E))))
        for name, N in OUTS.items():
            y = torch.randn(t, N, device=dev, dtype=bf)
            US = torch.randn(N, E * R, device=dev, dtype=bf) / 8
            USt = US.t().contiguous().t()  # the same (N, E*R) values, each expert's rank rows contiguous in memory
            ref = y.float() + C.float() @ US.float().T
            cells = {"pass over y (y *= 1)": lambda: y.mul_(1.0),
                     "dense apply (addmm_)": lambda: y.addmm_(C, US.T),
                     "expand, as shipped": lambda: kernels.expand(y, c, idx, US, perm),
                     "expand, U Sigma stored transposed": lambda: kernels.expand(y, c, idx, USt, perm)}
            for tile in TILES:
                cells[f"expand BT={tile[0]} BN={tile[1]} warps={tile[2]} stages={tile[3]}"] = \
                    (lambda tile=tile: expand_tile(y, c, idx, US, perm, *tile))
                cells[f"expand BT={tile[0]} BN={tile[1]} warps={tile[2]} stages={tile[3]}, transposed"] = \
                    (lambda tile=tile: expand_tile(y, c, idx, USt, perm, *tile))
            for what, fn in cells.items():
                y0 = y.clone()
                fn()
                err = None
                if what != "pass over y (y *= 1)":
                    err = float(((y.float() - ref).abs().max() / ref.abs().max()))
                y.copy_(y0)
                rows.append(dict(E=E, N=N, what=what, us=timed(fn), rel_err=err))
                y.copy_(y0)
        for outs in ([4096, 1024, 1024], [14336, 14336]):  # one launch for the group's joint output, or one a member
            M, N = len(outs), sum(outs)
            starts = [sum(outs[:m]) for m in range(M)]
            Y = torch.randn(t, N, device=dev, dtype=bf)
            US = torch.randn(N, E * R, device=dev, dtype=bf) / 8
            cg = torch.randn(t, M, 1, R, device=dev, dtype=bf)
            views = [Y[:, o:o + n] for o, n in zip(starts, outs)]
            Ym = [torch.randn(t, n, device=dev, dtype=bf) for n in outs]
            name = "+".join(map(str, outs))
            rows.append(dict(E=E, N=name, what="expand_group, rows sorted, one launch",
                             us=timed(lambda: kernels.expand_group(Y, cg, idx, US, starts, 256, perm))))
            rows.append(dict(E=E, N=name, what="expand per member, own outputs",
                             us=timed(lambda: [kernels.expand(y, cg[:, m], idx, US[o:o + y.shape[1]], perm)
                                               for m, (y, o) in enumerate(zip(Ym, starts))])))
            rows.append(dict(E=E, N=name, what="dense apply per member (addmm_ into column slices)",
                             us=timed(lambda: [v.addmm_(C, US[o:o + v.shape[1]].T) for v, o in zip(views, starts)])))
        for d_in, M in ((4096, 3), (4096, 2), (4096, 1), (14336, 1)):
            x = torch.randn(t, d_in, device=dev, dtype=bf)
            Vt = torch.randn(M * E * R, d_in, device=dev, dtype=bf) / 64
            Vt8, vs = routing.quantize_rows(Vt)
            vs = vs.T.contiguous()
            x8, xs = routing.quantize_rows(x)
            rows.append(dict(E=E, d_in=d_in, M=M, what="scoring bf16 (x @ V^T)", us=timed(lambda: x @ Vt.T)))
            rows.append(dict(E=E, d_in=d_in, M=M, what="scoring fp8 (quantize + _scaled_mm)",
                             us=timed(lambda: routing.project_fp8(x, Vt8, vs))))
            rows.append(dict(E=E, d_in=d_in, M=M, what="scoring fp8 GEMM alone",
                             us=timed(lambda: torch._scaled_mm(x8, Vt8.T, scale_a=xs, scale_b=vs,
                                                               out_dtype=torch.bfloat16))))
            rows.append(dict(E=E, d_in=d_in, M=M, what="quantize x alone", us=timed(lambda: routing.quantize_rows(x))))
            rows.append(dict(E=E, d_in=d_in, M=M, what="quantize x, Triton kernel",
                             us=timed(lambda: kernels.quantize_rows(x))))
            rows.append(dict(E=E, d_in=d_in, M=M, what="scoring fp8 (Triton quantize + _scaled_mm)",
                             us=timed(lambda: routing.project_fp8(x, Vt8, vs, quantize=kernels.quantize_rows))))
    for E in sorted({8, *[int(e) for e in a.experts.split(",")]}):
        for M in (3, 1):
            P = torch.randn(t, M * E * R, device=dev, dtype=bf)
            S = torch.rand(M, E, R, device=dev) + 0.5
            rank = torch.full((M, E), R, device=dev, dtype=torch.int32)
            s = torch.ones(M, E, device=dev)
            kw = dict(M=M, E=E, k=1, router="spectr", score="norm", rank_normalize=False, weighting="softmax",
                      temperature=1.0, combine="mix")
            for block, warps in ((1024, 4), (4096, 4), (4096, 8)):
                kernels.ROUTE_BLOCK, kernels.ROUTE_WARPS = block, warps
                for compact in (False, True):
                    rows.append(dict(E=E, M=M, block=block, warps=warps,
                                     what=f"route kernel ({'compact' if compact else 'dense'} C)",
                                     us=timed(lambda: kernels.route(P, S, rank, s, None, compact=compact, **kw))))
                rows.append(dict(E=E, M=M, block=block, warps=warps, what="route kernel (compact C, rows filed)",
                                 us=timed(lambda: kernels.route(P, S, rank, s, None, compact=True,
                                                                order=kernels.new_order(t, E, P.device), **kw))))
    kernels.ROUTE_BLOCK, kernels.ROUTE_WARPS = default_block
    for r in rows:
        print(json.dumps(r))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "apply_h200.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), tokens=t,
                                                          torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
