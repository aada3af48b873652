"""The routed forward against the base model on one GPU (issue 7's table), eager and compiled, in one run.

A random Llama with Llama-3-8B layer shapes (hidden 4096, intermediate 14336, 32/8 heads, vocab 32000)
but 8 layers, bf16; E random rank-16 LoRA experts on all 7 linear modules per layer, their spectra by
pipeline.spectra.exact_spectrum, the bundle by runtime.write_bundle; PEFT Arrow from the same factors saved
as PEFT adapter folders. Each cell: median of 20 forwards after 3 warm-ups, timed with CUDA events around
each forward (so an eager forward's launch overhead counts); ratios are to the base model measured in the
same run (eager against eager base, compiled against compiled base). Shapes: prefill 8 x 512 tokens, one
token at batch 1 and at batch 32 (a forward of one position, no cache). "compiled" is
torch.compile(model, mode="reduce-overhead", fullgraph=True): Inductor kernels replayed as CUDA graphs.

    python benchmarks/bench_gpu.py [--experts 8,64,32] [--compiled base,defaults:8,defaults:64] [--skip plain]
                                   [--profile DIR --profile-experts 8,64]

Writes benchmarks/results/gpu_h200.md and gpu_h200.json (or --out DIR).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from spectr.pipeline.spectra import exact_spectrum
from spectr.runtime.spectrum import AdapterSpectra
from spectr.runtime import PEFT_ARROW, REFERENCE, load_bundle, read_bundle, write_bundle
from spectr.runtime.bundle import module_shape

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 16, 32
SHAPES = {"prefill 8x512": (8, 512), "decode b1": (1, 1), "decode b32": (32, 1)}
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


SMOKE = False  # --smoke: tiny shapes, for checking the script itself (on the CPU when there is no GPU)
DEV = "cuda"


def base_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2) if SMOKE else \
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    cfg = LlamaConfig(**size, num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def make_factors(model, E: int, layers: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """E experts: {module: (A (r, in), B (out, r))}, random, on the GPU."""
    experts = []
    for i in range(E):
        g = torch.Generator(device=DEV).manual_seed(1000 + i)
        factors = {}
        for layer in range(layers):
            for m in MODULES:
                name = f"model.layers.{layer}.{m}"
                d_in, d_out = module_shape(model.get_submodule(name))
                A = torch.randn(RANK, d_in, device=DEV, generator=g) / d_in ** 0.5
                B = torch.randn(d_out, RANK, device=DEV, generator=g) * 0.02
                factors[name] = (A, B)
        experts.append(factors)
    return experts


def write_experts(root: Path, model, factors: list[dict]) -> tuple[Path, list[Path]]:
    """The bundle of all experts (exact spectra) and PEFT adapter folders of them."""
    infos, folders = [], []
    for i, f in enumerate(factors):
        mods = {}
        for name, (A, B) in f.items():
            sp = exact_spectrum(A.cpu(), B.cpu(), ALPHA / RANK, device="cpu")  # many tiny QRs: faster on the CPU
            mods[name] = type(sp)(U=sp.U.float().cpu(), S=sp.S.float().cpu(), V=sp.V.float().cpu(),
                                  scaling=sp.scaling, energy=sp.energy)
        infos.append(({"name": f"e{i}", "version": 1, "content_sha256": "", "rank": RANK, "alpha": ALPHA},
                      AdapterSpectra(mods, "exact", {})))
        if i >= 8:  # PEFT Arrow is measured at E = 8
            continue
        folder = root / f"e{i}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, (A, B) in f.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(torch.bfloat16).cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(torch.bfloat16).cpu().contiguous()
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
            "target_modules": [m.split(".")[-1] for m in MODULES], "bias": "none", "base_model_name_or_path": "bench",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True}))
        folders.append(folder)
    names = sorted(factors[0])
    base = {"name": "bench", "architecture": "LlamaForCausalLM", "model_type": "llama", "config_sha256": "",
            "modules": {m: list(module_shape(model.get_submodule(m))) for m in names}}
    return write_bundle(root / "bundle", base=base, experts=infos), folders


def subset_bundle(root: Path, full, E: int) -> Path:
    """The first E experts of the full bundle, rewritten as their own bundle."""
    tensors = {}
    for m, info in full.modules.items():
        r = info["rank"]
        tensors[f"{m}.Vt"] = full.tensors[f"{m}.Vt"][: E * r]
        tensors[f"{m}.U"] = full.tensors[f"{m}.U"][:, : E * r]
        for f in ("S", "scaling", "rank"):
            tensors[f"{m}.{f}"] = full.tensors[f"{m}.{f}"][:E]
    from spectr.runtime.bundle import Bundle

    manifest = {**full.manifest, "experts": full.manifest["experts"][:E]}
    return Bundle(path=root / f"bundle{E}", manifest=manifest, tensors=tensors)


def device_name() -> str:
    return torch.cuda.get_device_name() if DEV == "cuda" else "cpu"


@torch.no_grad()
def timed(fn, ids: torch.Tensor, warmup: int = 3, reps: int = 20, mark: bool = False) -> float:
    if DEV == "cpu":
        fn(ids)
        t0 = time.perf_counter()
        fn(ids)
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        fn(ids)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        start.record()
        fn(ids)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(model, compiled: bool, label: str, prof: Path | None = None) -> dict[str, float]:
    """Median ms per shape; prof: also write a torch.profiler table per shape of the measured forward
    (compiled: the kernels replayed from the CUDA graph, as CUPTI sees them) to this file."""
    fwd = model
    if compiled:
        torch._dynamo.reset()
        fwd = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    out, tables = {}, []
    g = torch.Generator(device=DEV).manual_seed(7)
    for shape, (B, T) in SHAPES.items():
        ids = torch.randint(0, 32000, (B, T), device=DEV, generator=g)
        if SMOKE and DEV == "cpu":
            ids = ids[:, :16]
        t0 = time.perf_counter()
        out[shape] = timed(lambda i: fwd(input_ids=i, use_cache=False).logits, ids, mark=compiled)
        print(f"  {label} {'compiled' if compiled else 'eager'} {shape}: {out[shape]:.3f} ms "
              f"(cell took {time.perf_counter() - t0:.1f} s)", flush=True)
        if prof is not None and DEV == "cuda":
            tables.append(profile_table(fwd, ids, compiled, f"{label} {'compiled' if compiled else 'eager'} {shape}"))
    if prof is not None and tables:
        prof.parent.mkdir(parents=True, exist_ok=True)
        prof.write_text("\n".join(tables))
    return out


def profile_table(fwd, ids: torch.Tensor, compiled: bool, title: str) -> str:
    """torch.profiler over 3 forwards (already warm): kernels by GPU time, with their count."""
    from torch.profiler import ProfilerActivity, profile as prof

    with torch.no_grad(), prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            fwd(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
    events = p.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    n = sum(e.count for e in kernels) / 3
    gpu = sum(e.self_device_time_total for e in kernels) / 3 / 1e3
    return (f"## {title}: {n:.0f} kernels, {gpu:.3f} ms GPU time per forward\n"
            + events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", default="8,64,32", help="in the order measured (a run cut short keeps its rows)")
    # grouped and fp8 + grouped measured slower than the defaults at E=64 (gpu_h200.md, session 11): left out of the
    # default run, so the whole table fits one device call; name them to measure them again.
    ap.add_argument("--compiled", default="base,defaults:8,defaults:64,fp8:64,reference:32,arrow:8",
                    help="variant:E pairs also measured compiled (or 'none')")
    # fp8 + gathered: what "fp8" runs at E*r >= gather_min (apply="auto" gathers there); measured at E=8 in session 12
    ap.add_argument("--skip", default="fp8-grouped,fp8-gathered", help="short variant names not measured (e.g. plain,arrow)")
    ap.add_argument("--peft", action=argparse.BooleanOptionalAction, default=True, help="measure PEFT Arrow at E=8")
    ap.add_argument("--profile", type=Path, help="write torch.profiler tables here (base eager and compiled; defaults eager and compiled at --profile-experts)")
    ap.add_argument("--profile-experts", default="8,64", help="the E's profiled with --profile")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check the script, not the speed")
    a = ap.parse_args()
    global SMOKE, DEV
    SMOKE = a.smoke
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    sizes = [int(e) for e in a.experts.split(",")]
    want_compiled = set() if a.compiled == "none" else set(a.compiled.split(","))
    variants = {
        "defaults": {},  # load_bundle's defaults: spectr, k=1, pool="input", impl="fused", apply="auto" (dense)
        "defaults, apply=gathered": dict(apply="gathered"),  # only the chosen experts' U Sigma (kernels.expand)
        "defaults, scoring=fp8": dict(scoring="fp8"),  # the scoring GEMM in float8 (routing.project_fp8)
        "defaults, apply=grouped": dict(apply="grouped"),  # rows sorted by expert, one grouped GEMM (apply_sorted)
        "defaults, fp8 + grouped": dict(scoring="fp8", apply="grouped"),
        "defaults, fp8 + gathered": dict(scoring="fp8", apply="gathered"),
        "defaults, impl=plain": dict(impl="plain"),  # the readable path (and the code the issue measured)
        "reference": dict(REFERENCE),
        "arrow (our PEFT_ARROW preset)": dict(PEFT_ARROW),
    }
    short = {"defaults": "defaults", "defaults, apply=gathered": "gathered", "defaults, scoring=fp8": "fp8",
             "defaults, apply=grouped": "grouped", "defaults, fp8 + grouped": "fp8-grouped",
             "defaults, fp8 + gathered": "fp8-gathered",
             "defaults, impl=plain": "plain", "reference": "reference", "arrow (our PEFT_ARROW preset)": "arrow"}
    skip = set(filter(None, a.skip.split(",")))
    rows: list[dict] = []
    t_start = time.perf_counter()
    base = base_model(a.layers)
    print(f"{device_name()} torch {torch.__version__}; base built", flush=True)

    def record(label, E, opts_compiled, result):
        rows.append({"variant": label, "E": E, "compiled": opts_compiled, **result})
        write_results(rows, a, time.perf_counter() - t_start, quiet=True)  # a run cut short keeps its rows

    def prof(name: str) -> Path | None:
        return a.profile / f"profile_{name}.txt" if a.profile else None

    record("base", None, False, measure(base, False, "base", prof("base")))
    if "base" in want_compiled:
        record("base", None, True, measure(base, True, "base", prof("base_compiled")))
    with tempfile.TemporaryDirectory() as tmp:
        factors = make_factors(base, max(sizes), a.layers)
        bundle_path, folders = write_experts(Path(tmp), base, factors)
        full = read_bundle(bundle_path)
        print(f"bundle of {max(sizes)} experts written ({time.perf_counter() - t_start:.0f} s)", flush=True)
        for E in sizes:
            bundle = subset_bundle(Path(tmp), full, E)
            for label, opts in variants.items():
                if short[label] in skip or (label == "defaults, impl=plain" and E != sizes[0]):
                    continue
                model = load_bundle(copy.deepcopy(base), bundle, **opts)
                profiled = label == "defaults" and str(E) in a.profile_experts.split(",")
                record(label, E, False, measure(model, False, f"{label} E={E}",
                                                prof(f"{short[label]}_E{E}") if profiled else None))
                if f"{short[label]}:{E}" in want_compiled:
                    try:
                        record(label, E, True, measure(model, True, f"{label} E={E}",
                                                       prof(f"{short[label]}_E{E}_compiled") if profiled else None))
                    except Exception as exc:  # noqa: BLE001 - a benchmark reports, then tries without the kernel
                        print(f"  {label} E={E} compiled failed: {type(exc).__name__}: {str(exc)[:600]}", flush=True)
                        from spectr.runtime import kernels

                        if kernels.route is not None:
                            kernels.route = kernels.expand = None
                            record(label + " (no Triton kernel)", E, True, measure(model, True, f"{label} E={E}"))
                del model
                gc.collect()
                torch.cuda.empty_cache()
                if a.peft and E == 8 and label == "defaults":  # next: the time-added target's other side
                    measure_peft(base, folders, E, record)
    write_results(rows, a, time.perf_counter() - t_start)


def measure_peft(base, folders, E: int, record) -> None:
    """PEFT's own Arrow (create_arrow_model, top-3) on the same factors, eager."""
    from peft import ArrowConfig, create_arrow_model

    peft = create_arrow_model(copy.deepcopy(base), [str(f) for f in folders[:E]],
                              ArrowConfig(top_k=3, router_temperature=1.0, rng_seed=0)).eval()
    record("PEFT create_arrow_model (top-3)", E, False, measure(peft, False, f"peft arrow E={E}"))
    del peft
    gc.collect()
    torch.cuda.empty_cache()


def write_results(rows: list[dict], a, seconds: float, quiet: bool = False) -> None:
    base = {c: next(r for r in rows if r["variant"] == "base" and r["compiled"] == c) for c in (False, True)
            if any(r["variant"] == "base" and r["compiled"] == c for r in rows)}
    lines = [
        "# Routed forward on one GPU (benchmarks/bench_gpu.py)", "",
        f"`python benchmarks/bench_gpu.py --experts {a.experts} --compiled {a.compiled}` on "
        f"{device_name()}, torch {torch.__version__}, bf16; Llama-3-8B layer shapes, {a.layers} layers, "
        f"random weights, rank-{RANK} experts on 7 linear modules; median of 20 forwards after 3 warm-ups (CUDA events). "
        f"Ratios: eager rows to the eager base, compiled rows to the compiled base (mode=reduce-overhead, "
        f"fullgraph=True). Whole run {seconds:.0f} s.", "",
        "| variant | E | mode | " + " | ".join(SHAPES) + " |", "|---|---:|---|" + "---:|" * len(SHAPES)]
    for r in rows:
        ref = base.get(r["compiled"])
        cells = []
        for s in SHAPES:
            if r["variant"] == "base" or ref is None:
                cells.append(f"{r[s]:.2f} ms")
            else:
                cells.append(f"{r[s]:.2f} ms ({r[s] / ref[s]:.2f}x)")
        lines.append(f"| {r['variant']} | {r['E'] or '-'} | {'compiled' if r['compiled'] else 'eager'} | "
                     + " | ".join(cells) + " |")
    eager = base.get(False)
    ours = next((r for r in rows if r["variant"] == "defaults" and r["E"] == 8 and not r["compiled"]), None)
    peft = next((r for r in rows if r["variant"].startswith("PEFT") and r["E"] == 8), None)
    if eager and ours and peft:
        s = "prefill 8x512"
        added_ours, added_peft = ours[s] - eager[s], peft[s] - eager[s]
        lines += ["", f"Time added over the eager base at E=8 prefill: defaults {added_ours:.2f} ms, PEFT Arrow "
                      f"{added_peft:.2f} ms: {added_peft / max(added_ours, 1e-6):.1f}x less."]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_h200.md").write_text("\n".join(lines) + "\n")
    (a.out / "gpu_h200.json").write_text(json.dumps(rows, indent=1) + "\n")
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
