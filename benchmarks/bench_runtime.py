"""Routed forward vs base forward vs PEFT Arrow, on CPU, for E = 2, 8, 32 experts.

A random Llama with SmolLM2-135M's layer shapes (hidden 576, intermediate 1536, 9/3 heads) but few
layers, and E random rank-8 LoRA experts on all seven linear modules, saved by PEFT and turned into a
bundle. Prints times in ms and ratios to the base forward; writes benchmarks/results/runtime.md.

    python benchmarks/bench_runtime.py [--layers 4] [--tokens 256] [--repeats 5]

With --library BASE_DIR (a saved SmolLM2-135M-Instruct folder, see spectr/smollm2.py) it instead
measures, on the real library of 8 experts in ../shared, the routing accuracy inside the routed
forward (top-1 and top-4 over every token, module and layer decision; macro over domains) and
checks plain LoRA (router="fixed") against PEFT on one expert.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

from spectr.runtime.spectrum import AdapterSpectra  # noqa: E402
from spectr.runtime import REFERENCE, load_bundle, write_bundle  # noqa: E402
from spectr.runtime.bundle import module_shape  # noqa: E402


def base_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=4096, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def make_experts(root: Path, E: int, layers: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    out = []
    for i in range(E):
        base = base_model(layers)
        torch.manual_seed(100 + i)
        peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                               init_lora_weights=False))
        peft.save_pretrained(root / f"e{i}")
        out.append(root / f"e{i}")
    return out


def expert(folder: Path) -> tuple[dict, AdapterSpectra]:
    """(manifest entry, exact spectra of every module) of a PEFT adapter folder (pipeline.spectra)."""
    from spectr.pipeline.spectra import exact_spectrum

    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = load_file(folder / "adapter_model.safetensors")
    mods = {
        key.removeprefix("base_model.model.").split(".lora_A.")[0]:
        exact_spectrum(A.float(), sd[key.replace(".lora_A.", ".lora_B.")].float(), cfg["lora_alpha"] / cfg["r"])
        for key, A in sd.items() if ".lora_A." in key
    }
    info = {"name": folder.name, "version": 1, "content_sha256": "", "rank": cfg["r"], "alpha": cfg["lora_alpha"]}
    return info, AdapterSpectra(mods, "exact", {})


def make_bundle(path: Path, folders: list[Path], layers: int) -> Path:
    model = base_model(layers)
    experts = [expert(f) for f in folders]
    mods = sorted(experts[0][1].modules)
    base = {"name": "bench", "architecture": "LlamaForCausalLM", "model_type": "llama", "config_sha256": "",
            "modules": {m: list(module_shape(model.get_submodule(m))) for m in mods}}
    return write_bundle(path, base=base, experts=experts)


@torch.no_grad()
def timed(model, ids: torch.Tensor, repeats: int) -> float:
    model.to(ids.device)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    model(ids)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(ids)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.no_grad()
def apply_sweep(device: str, tokens: int, repeats: int) -> list[str]:
    """One routed up_proj (576 -> 1536, rank 8, k = 4): dense apply vs grouped apply as E grows."""
    from torch import nn

    from spectr.runtime.layer import RoutedLinear, RouterConfig

    lines = ["", f"Apply step alone, one routed up_proj (576 -> 1536, r = 8, k = 4, {tokens} tokens, {device}): "
             "ms for dense / grouped.", "", "| E | E*r | dense | grouped |", "|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for E in (8, 32, 64, 128, 256):
        bank = dict(Vt=torch.randn(E * 8, 576, generator=g), U=torch.randn(1536, E * 8, generator=g),
                    S=torch.rand(E, 8, generator=g), scaling=torch.ones(E), rank=torch.full((E,), 8))
        x = torch.randn(1, tokens, 576, generator=g).to(device)
        t = {}
        for apply in ("dense", "grouped"):
            layer = RoutedLinear(nn.Linear(576, 1536), "m", bank, RouterConfig(top_k=4, apply=apply), None).to(device)
            t[apply] = timed(layer, x, repeats)
        lines.append(f"| {E} | {E * 8} | {t['dense']:.2f} | {t['grouped']:.2f} |")
        print(lines[-1], flush=True)
    return lines


@torch.no_grad()
def library_accuracy(base_dir: Path, shared: Path, docs: int, tokens: int) -> list[str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spectr.runtime import set_router, trace_routing

    domains = sorted(p.name for p in (shared / "experts").iterdir() if p.is_dir())
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    experts = [expert(shared / "experts" / d) for d in domains]
    names = sorted(experts[0][1].modules)
    base = {"name": base_dir.name, "architecture": type(model).__name__, "model_type": model.config.model_type,
            "config_sha256": "", "modules": {m: list(module_shape(model.get_submodule(m))) for m in names}}
    with tempfile.TemporaryDirectory() as tmp:
        load_bundle(model, write_bundle(Path(tmp) / "bundle", base=base, experts=experts),
                    router="fixed", expert=domains[0])
    ids = tok("def main():\n    return 0\n", return_tensors="pt").input_ids
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval(),
                                     shared / "experts" / domains[0]).eval()
    diff = (model(ids).logits - peft(ids).logits).abs().max().item()
    texts = {d: [json.loads(line)["text"] for line in open(shared / "datasets" / d / "test.jsonl")][:docs]
             for d in domains}
    lines = ["", f"Real library: {len(domains)} SmolLM2-135M experts, first {docs} test documents per domain, "
             f"{tokens} tokens each, k = 4, fp32 CPU. Routing accuracy inside the routed forward, macro over domains "
             f"(chance {1 / len(domains):.3f}). Plain LoRA vs PEFT on {domains[0]}: max |logit diff| {diff:.1e}.",
             "", "| router | top-1 | top-4 |", "|---|---|---|"]
    for label, kw in [("spectr ‖Vᵀx‖", dict(router="spectr", score="norm")), ("arrow abs(v₁ᵀx)", dict(router="arrow")),
                      ("spectr ‖ΣVᵀx‖", dict(router="spectr", score="sigma"))]:
        set_router(model, **{**REFERENCE, "top_k": 4, **kw})
        top1, topk = [], []
        for e, d in enumerate(domains):
            c1 = ck = n = 0
            for text in texts[d]:
                ids = tok(text, return_tensors="pt", truncation=True, max_length=tokens).input_ids
                with trace_routing(model) as trace:
                    model(ids)
                for m in trace.calls:
                    idx = trace.choices(m)[0]
                    c1 += int((idx[..., 0] == e).sum())
                    ck += int((idx == e).any(-1).sum())
                    n += idx[..., 0].numel()
            top1.append(c1 / n)
            topk.append(ck / n)
        lines.append(f"| {label} | {sum(top1) / len(top1):.3f} | {sum(topk) / len(topk):.3f} |")
        print(lines[-1], flush=True)
    return lines


@torch.no_grad()
def default_only(a) -> None:
    """Base and default routed forward alternating, one forward each per round: ratio of medians."""
    ids = torch.randint(0, 4096, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        for E in [int(e) for e in a.experts.split(",")]:
            bundle = make_bundle(Path(tmp) / f"bundle{E}", make_experts(Path(tmp), E, a.layers), a.layers)
            models = {"base": base_model(a.layers), "default": load_bundle(base_model(a.layers), bundle)}
            if a.compile == "none":
                models["default, impl=plain"] = load_bundle(base_model(a.layers), bundle, impl="plain")
            else:  # the same recipe for both; each checked against its eager twin
                for k in ("base", "default"):
                    t0 = time.perf_counter()
                    models[f"{k}, compiled"] = compiled(base_model(a.layers) if k == "base"
                                                        else load_bundle(base_model(a.layers), bundle), a.compile)
                    diff = (models[f"{k}, compiled"](ids).logits - models[k](ids).logits).abs().max().item()
                    print(f"{k}, compiled ({a.compile}): compiled in {time.perf_counter() - t0:.0f} s, "
                          f"max |logits - eager| {diff:.1e}", flush=True)
            times: dict[str, list[float]] = {k: [] for k in models}
            for m in models.values():
                m(ids)
            for _ in range(a.repeats):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    m(ids)
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            ref = {k: med["base, compiled" if k.endswith("compiled") else "base"] for k in med}
            print(f"E={E}, {a.layers} layers, {a.tokens} tokens, {torch.get_num_threads()} threads, median of "
                  f"{a.repeats} interleaved rounds (compiled rows to the compiled base): "
                  + ", ".join(f"{k} {v:.1f} ms ({v / ref[k]:.3f}x)" for k, v in med.items()), flush=True)
            if a.parts:
                print(parts(models["default"], ids, med["base"], med["default"]), flush=True)


def compiled(model, recipe: str):
    """torch.compile(model, fullgraph=True) by recipe: "inductor" (default mode) or "freezing" (Inductor's CPU
    inference setting: weights folded as constants, max-autotune picks between ATen and its C++ GEMM template)."""
    if recipe == "freezing":
        torch._inductor.config.freezing = True
        return torch.compile(model, fullgraph=True, mode="max-autotune-no-cudagraphs")
    return torch.compile(model, fullgraph=True)


def _ms(fn, n: int = 30) -> float:
    """Median ms of fn() over 5 rounds of n calls (after a warm-up)."""
    fn()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n)
    return statistics.median(rounds) * 1e3


@torch.no_grad()
def parts(model, ids: torch.Tensor, base_ms: float, routed_ms: float) -> str:
    """Where the default routed forward's extra time goes, each piece timed alone on the inputs the modules saw:
    the scoring GEMMs (each input group's x @ V_group^T), the routing math (pooled scores -> top-k -> weights ->
    coefficients, routing.py), the dense apply (y += C (U Sigma)^T); the rest is the wrappers' Python and memory
    traffic. base + scoring + apply is the floor of this arithmetic (every expert scored, all applied densely)."""
    from spectr.runtime.layer import RoutedLinear

    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.setdefault(mod.name, args[0].detach().clone()))
             for m in model.modules() if isinstance(m, RoutedLinear)]
    model(ids)
    for h in hooks:
        h.remove()
    score = math = apply = 0.0
    for m in model.modules():
        if not isinstance(m, RoutedLinear) or m.slot != 0:
            continue  # one measurement per input group, from its first member
        x = seen[m.name].reshape(-1, seen[m.name].shape[-1])
        members = m._group()
        score += _ms(lambda: m._project_group(members, x))
        P = m._project_group(members, x)
        math += _ms(lambda: m._decide_group(x, (1, x.shape[0]), P))
        for mem, (C, *_rest) in zip(members, m._decide_group(x, (1, x.shape[0]), P)):
            y = torch.zeros(x.shape[0], mem.US.shape[0])
            apply += _ms(lambda: y.addmm_(C, mem.US.T))
    rest = routed_ms - base_ms - score - math - apply
    return (f"  parts, each alone: scoring GEMMs {score:.1f} ms, dense apply {apply:.1f} ms, routing math {math:.1f} ms, "
            f"rest (wrappers, memory) {rest:.1f} ms; the floor of the GEMMs alone, base + scoring + apply = "
            f"{(base_ms + score + apply) / base_ms:.3f}x base")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--experts", default="2,8,32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--library", type=Path, help="saved SmolLM2 base folder: measure routing on the real experts")
    ap.add_argument("--shared", type=Path, default=ROOT / ".." / "shared")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime.md"))
    ap.add_argument("--default-only", action="store_true",
                    help="only base vs the default routed forward (E from --experts), interleaved forward by "
                         "forward so a shared, noisy CPU slows both alike; prints the median ratio")
    ap.add_argument("--parts", action="store_true", help="with --default-only: time the routed forward's pieces alone "
                    "(scoring GEMMs, routing math, dense apply) and print the floor they set")
    ap.add_argument("--compile", choices=("none", "inductor", "freezing"), default="none",
                    help="with --default-only: also time base and default compiled the same way (freezing: "
                         "Inductor's CPU inference recipe, freezing + max-autotune)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.default_only:
        default_only(a)
        return
    if a.library:
        lines = [f"`python benchmarks/bench_runtime.py --library {a.library} --docs {a.docs}`"]
        lines += library_accuracy(a.library, a.shared, a.docs, 128)
        print("\n".join(lines))
        return
    from peft import ArrowConfig, create_arrow_model

    ids = torch.randint(0, 4096, (1, a.tokens), generator=torch.Generator().manual_seed(0)).to(a.device)
    sizes = [int(e) for e in a.experts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        library = make_experts(Path(tmp), max(sizes), a.layers)
        for E in sizes:
            folders = library[:E]
            bundle = make_bundle(Path(tmp) / f"bundle{E}", folders, a.layers)
            k = min(4, E)
            t = {"base": timed(base_model(a.layers), ids, a.repeats)}
            for label, kw in [
                ("fixed (plain LoRA)", dict(router="fixed", expert=0)),
                ("spectr factor dense", dict(router="spectr", combine="factor", apply="dense")),
                ("spectr factor grouped", dict(router="spectr", combine="factor", apply="grouped")),
                ("spectr mix dense", dict(router="spectr", combine="mix", apply="dense")),
                ("spectr mix grouped", dict(router="spectr", combine="mix", apply="grouped")),
                ("arrow mix dense", dict(router="arrow", combine="mix", weighting="softmax", apply="dense")),
                ("arrow mix grouped", dict(router="arrow", combine="mix", weighting="softmax", apply="grouped")),
            ]:
                # the paper's reference settings unless the row says otherwise
                t[label] = timed(load_bundle(base_model(a.layers), bundle, **{**REFERENCE, "top_k": k, **kw}), ids, a.repeats)
            t["spectr default (k=1, pool=input)"] = timed(load_bundle(base_model(a.layers), bundle), ids, a.repeats)
            peft = create_arrow_model(base_model(a.layers), [str(f) for f in folders],
                                      ArrowConfig(top_k=k, router_temperature=1.0, rng_seed=0)).eval()
            t["peft arrow"] = timed(peft, ids, a.repeats)
            rows.append((E, k, t))
            print(f"E={E:>2} k={k}: " + ", ".join(f"{n} {v:.1f} ms ({v / t['base']:.2f}x)" for n, v in t.items()),
                  flush=True)
    labels = list(rows[0][2])
    lines = [
        f"# Runtime benchmark ({a.device})",
        "",
        f"`python benchmarks/bench_runtime.py --layers {a.layers} --tokens {a.tokens} --repeats {a.repeats} "
        f"--device {a.device}` on {torch.get_num_threads()} CPU threads, torch {torch.__version__}, fp32. Random Llama with "
        f"SmolLM2-135M layer shapes ({a.layers} layers), rank-8 experts on all 7 linear modules per layer, "
        f"one sequence of {a.tokens} tokens, median of {a.repeats} forwards. Cells: ms (ratio to base forward; "
        "last column: ratio of our arrow dense to PEFT Arrow).",
        "",
        "| E | k | " + " | ".join(labels) + " | ours arrow / PEFT arrow |",
        "|" + "---|" * (len(labels) + 3),
    ]
    for E, k, t in rows:
        cells = " | ".join(f"{t[n]:.1f} ({t[n] / t['base']:.2f}x)" for n in labels)
        lines.append(f"| {E} | {k} | {cells} | {t['arrow mix dense'] / t['peft arrow']:.2f} |")
    lines += apply_sweep(a.device, a.tokens, a.repeats)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
