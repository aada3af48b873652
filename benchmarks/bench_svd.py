"""Benchmark: exact spectra from LoRA factors (this project) vs the reference implementation's
torch.svd_lowrank(B @ A, q=r, niter=50) per module, on a rank-16 all-linear adapter with
Llama-3-8B shapes (32 layers x 7 modules = 224), random factors.

    python benchmarks/bench_svd.py --device cpu --reference-modules 7 --out-json benchmarks/results/svd_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


from spectr.registry.spectra_format import blob_sha256, spectra_to_bytes  # noqa: E402
from spectr.pipeline.spectra import adapter_spectra  # noqa: E402
from spectr.pipeline.types import (  # noqa: E402
    AdapterSource, BaseModelInfo, LoadedAdapter, ModuleFactors, ModuleShape,
)

# (module, out_features, in_features) of one Llama-3-8B layer
LLAMA3_8B = [
    ("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 1024, 4096), ("self_attn.v_proj", 1024, 4096),
    ("self_attn.o_proj", 4096, 4096), ("mlp.gate_proj", 14336, 4096), ("mlp.up_proj", 14336, 4096),
    ("mlp.down_proj", 4096, 14336),
]


def build_adapter(layers: int, rank: int, seed: int = 0) -> LoadedAdapter:
    g = torch.Generator().manual_seed(seed)
    modules: dict[str, ModuleFactors] = {}
    shapes: dict[str, ModuleShape] = {}
    for layer in range(layers):
        for short, out_f, in_f in LLAMA3_8B:
            name = f"model.layers.{layer}.{short}"
            A = torch.randn(rank, in_f, generator=g) / in_f**0.5
            B = torch.randn(out_f, rank, generator=g) * 0.01
            modules[name] = ModuleFactors(name=name, A=A, B=B, scaling=2.0)
            shapes[name] = ModuleShape(in_features=in_f, out_features=out_f)
    base = BaseModelInfo(name="llama-3-8b-shapes", architecture="LlamaForCausalLM", model_type="llama",
                         config={}, config_sha256="0" * 64, modules=shapes)
    src = AdapterSource(name="bench", path=Path("."), source="synthetic")
    return LoadedAdapter(source=src, config={"r": rank}, base=base, modules=modules, content_sha256="0" * 64,
                         rank=rank, alpha=2.0 * rank, target_modules=sorted({s.split(".")[1] for s, _, _ in LLAMA3_8B}))


def load_peft_experts(root: Path) -> dict[str, LoadedAdapter]:
    """Plain PEFT LoRA folders under root (no rank/alpha patterns): enough for the CPU/GPU blob check."""
    from safetensors.torch import load_file

    out = {}
    for folder in sorted(d for d in root.iterdir() if (d / "adapter_config.json").is_file()):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        w = load_file(str(folder / "adapter_model.safetensors"))
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        mods = {}
        for key, A in w.items():
            if ".lora_A." in key:
                name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                B = w[key.replace(".lora_A.", ".lora_B.")]
                mods[name] = ModuleFactors(name=name, A=A.float(), B=B.float(), scaling=alpha / r)
        base = BaseModelInfo(name=str(cfg.get("base_model_name_or_path")), architecture="", model_type="",
                             config={}, config_sha256="0" * 64, modules={})
        out[folder.name] = LoadedAdapter(source=AdapterSource(name=folder.name, path=folder, source=str(folder)),
                                         config=cfg, base=base, modules=mods, content_sha256="0" * 64, rank=r,
                                         alpha=alpha, target_modules=[])
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def factor_rel_error(U, S, V, B, A) -> float:
    """||U S V^T - B A||_F / ||B A||_F from r x r products only (float64)."""
    U, S, V, B, A = (t.double() for t in (U, S, V, B, A))
    x2 = ((S[:, None] * (U.T @ U) * S[None, :]) * (V.T @ V)).sum()
    y2 = ((B.T @ B) * (A @ A.T)).sum()
    xy = (S * torch.diagonal((U.T @ B) @ (A @ V))).sum()
    return float((x2 + y2 - 2 * xy).clamp_min(0).sqrt() / y2.sqrt())


def dense_rel_error(U, S, V, M) -> float:
    M = M.double()
    return float(torch.linalg.norm((U.double() * S.double()) @ V.double().T - M) / torch.linalg.norm(M))


def pick_reference(names: list[str], n: int) -> list[str]:
    """Round-robin over the 7 shape classes so the extrapolation covers every shape."""
    by_class: dict[str, list[str]] = {}
    for name in names:
        by_class.setdefault(name.split(".", 3)[3], []).append(name)
    picked, i = [], 0
    while len(picked) < n:
        for members in by_class.values():
            if i < len(members) and len(picked) < n:
                picked.append(members[i])
        i += 1
    return picked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--exact-device", default="cpu",
                   help="where adapter_spectra's exact path runs (cpu keeps blob bytes device-independent)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="compute dtype of the exact SVD")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of this project's exact spectra")
    p.add_argument("--reference-modules", type=int, default=0, help="time the reference on N modules and extrapolate (0: all)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--niter", type=int, default=50, help="reference power iterations")
    p.add_argument("--check-cpu", action="store_true", help="also compute on CPU and compare blob bytes")
    p.add_argument("--check-experts", default=None, help="folder of PEFT experts: compare cpu and device blobs")
    p.add_argument("--out-json", default=None)
    args = p.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    res: dict = {"device": str(device), "exact_device": args.exact_device, "dtype": args.dtype, "rank": args.rank, "layers": args.layers,
                 "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                 "threads": torch.get_num_threads()}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)

    t0 = time.perf_counter()
    adapter = build_adapter(args.layers, args.rank)
    names = sorted(adapter.modules)
    res["modules"] = len(names)
    res["build_s"] = time.perf_counter() - t0
    print(f"built {len(names)} modules (rank {args.rank}) in {res['build_s']:.2f}s on host; device {device}")

    # Warm-up (CUDA context, cuSOLVER handles) on one small module group, not timed.
    warm = build_adapter(1, args.rank, seed=1)
    adapter_spectra(warm, device=str(device), dtype=dtype, exact_device=args.exact_device)

    times = []
    for _ in range(args.repeat):
        sync(device)
        t = time.perf_counter()
        spectra = adapter_spectra(adapter, device=str(device), dtype=dtype, exact_device=args.exact_device)
        sync(device)
        times.append(time.perf_counter() - t)
    res["ours_s"] = {"min": min(times), "median": statistics.median(times), "all": times}
    t = time.perf_counter()
    blob = spectra_to_bytes(spectra)
    res["blob_s"] = time.perf_counter() - t
    res["blob_mb"] = len(blob) / 2**20
    res["blob_sha256"] = blob_sha256(blob)
    ours_err = [factor_rel_error(spectra.modules[n].U, spectra.modules[n].S, spectra.modules[n].V,
                                 adapter.modules[n].B, adapter.modules[n].A) for n in names]
    res["ours_err_all_max"] = max(ours_err)
    if device.type == "cuda":  # dense check of every module is cheap on a GPU
        ours_err = []
        for n in names:
            m, f = spectra.modules[n], adapter.modules[n]
            M = f.B.to(device, torch.float64) @ f.A.to(device, torch.float64)
            ours_err.append(dense_rel_error(m.U.to(device), m.S.to(device), m.V.to(device), M))
        res["ours_err_all_max"] = max(ours_err)
    print(f"ours (exact, from factors, {args.dtype}, on {args.exact_device}, incl. host<->device copies): "
          f"min {min(times):.3f}s median {statistics.median(times):.3f}s over {args.repeat} runs")
    print(f"serialize blob: {res['blob_s']:.3f}s, {res['blob_mb']:.1f} MiB, sha256 {res['blob_sha256'][:16]}")
    form = "dense, float64" if device.type == "cuda" else "factor form, float64, floor ~1e-8"
    print(f"ours max relative reconstruction error over all {len(names)} modules ({form}): {max(ours_err):.2e}")

    # At least one module per shape class, so every class has a measured time to extrapolate from.
    n_ref = len(names) if args.reference_modules <= 0 else min(len(names), max(args.reference_modules, len(LLAMA3_8B)))
    ref_names = pick_reference(names, n_ref)
    per_class: dict[str, list[float]] = {}
    form_s = svd_s = copy_s = 0.0
    ref_err, ours_dense_err = [], []
    for name in ref_names:
        f = adapter.modules[name]
        sync(device)
        t = time.perf_counter()
        B, A = f.B.to(device), f.A.to(device)
        sync(device)
        t1 = time.perf_counter()
        M = B @ A
        sync(device)
        t2 = time.perf_counter()
        U, S, V = torch.svd_lowrank(M, q=args.rank, niter=args.niter)
        sync(device)
        t3 = time.perf_counter()
        copy_s, form_s, svd_s = copy_s + t1 - t, form_s + t2 - t1, svd_s + t3 - t2
        per_class.setdefault(name.split(".", 3)[3], []).append(t3 - t)
        ref_err.append(dense_rel_error(U, S, V, M))
        m = spectra.modules[name]
        ours_dense_err.append(dense_rel_error(m.U.to(device), m.S.to(device), m.V.to(device), M))
        del M, U, S, V
    counts: dict[str, int] = {}
    for name in names:
        counts[name.split(".", 3)[3]] = counts.get(name.split(".", 3)[3], 0) + 1
    ref_total = sum(statistics.mean(per_class[c]) * counts[c] for c in counts)
    extrapolated = len(ref_names) < len(names)
    res["reference"] = {"modules_timed": len(ref_names), "extrapolated": extrapolated, "total_s": ref_total,
                        "copy_s": copy_s, "form_BA_s": form_s, "svd_lowrank_s": svd_s,
                        "per_class_mean_s": {c: statistics.mean(v) for c, v in per_class.items()},
                        "err_max": max(ref_err)}
    res["ours_err_dense_max"] = max(ours_dense_err)
    res["speedup"] = ref_total / res["ours_s"]["min"]
    print(f"reference torch.svd_lowrank(B @ A, q={args.rank}, niter={args.niter}) on {len(ref_names)} modules: "
          f"copy {copy_s:.3f}s, form B@A {form_s:.3f}s, svd_lowrank {svd_s:.3f}s")
    for c, v in per_class.items():
        print(f"  {c:18s} mean {statistics.mean(v):.4f}s x {counts[c]} modules")
    how = f"extrapolated from {len(ref_names)} of {len(names)} modules per shape class" if extrapolated else "measured on all modules"
    print(f"reference total: {ref_total:.3f}s ({how})")
    print(f"max relative reconstruction error on the reference's modules (dense, float64): "
          f"ours {max(ours_dense_err):.2e}, reference {max(ref_err):.2e}")
    print(f"ratio reference / ours: {res['speedup']:.1f}x")

    if args.check_cpu and device.type != "cpu":
        t = time.perf_counter()
        cpu_blob = spectra_to_bytes(adapter_spectra(adapter, device="cpu", dtype=dtype, exact_device="cpu"))
        res["cpu_s"] = time.perf_counter() - t
        same = cpu_blob == blob
        cpu = adapter_spectra(adapter, device="cpu", dtype=dtype, exact_device="cpu") if not same else None
        diff_elems, max_diff = 0, 0.0
        if cpu is not None:
            for n in names:
                for part in ("U", "S", "V"):
                    a, b = getattr(cpu.modules[n], part), getattr(spectra.modules[n], part)
                    diff_elems += int((a != b).sum())
                    max_diff = max(max_diff, float((a - b).abs().max()))
        res["cpu_vs_device"] = {"identical_bytes": same, "cpu_sha256": blob_sha256(cpu_blob),
                                "differing_elements": diff_elems, "max_abs_diff": max_diff}
        print(f"exact on cpu ({res['cpu_s']:.2f}s incl. serialize) vs adapter_spectra(device={device}, "
              f"exact_device={args.exact_device}): blob bytes identical = {same}"
              + ("" if same else f" ({diff_elems} elements differ, max |diff| {max_diff:.2e})"))

    if args.check_experts and device.type != "cpu":
        res["experts_cpu_vs_device"] = {}
        for name, ad in load_peft_experts(Path(args.check_experts)).items():
            a = spectra_to_bytes(adapter_spectra(ad, device="cpu", dtype=dtype))
            b = spectra_to_bytes(adapter_spectra(ad, device=str(device), dtype=dtype, exact_device=args.exact_device))
            res["experts_cpu_vs_device"][name] = {"identical_bytes": a == b, "sha256": blob_sha256(a)}
            print(f"expert {name}: {len(ad.modules)} modules, exact on cpu vs device={device} "
                  f"exact_device={args.exact_device}: blob bytes identical = {a == b}")

    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
