"""Routing accuracy with the scoring GEMM in float8 (RouterConfig.scoring="fp8") against exact scoring, on the
real 8-expert SmolLM2 library, measured inside the routed forward (runtime.evaluate.routing_accuracy).

    python benchmarks/make_bundle.py --base BASE --experts ../shared/experts -o /tmp/lib8
    python benchmarks/study_fp8_scoring.py --base BASE --bundle /tmp/lib8 [--max-docs 8 --max-tokens 128]

Prints, for each preset, top-1 / top-k macro accuracy with exact and fp8 scoring, and for the default preset
the share of decisions (token x module) that fp8 scoring keeps on the same texts.
Writes benchmarks/results/study_fp8_scoring.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def agreement(model, tok, texts: list[str], max_tokens: int) -> float:
    """Share of the default preset's decisions (token x module) that are the same with fp8 scoring, each
    scoring in its own forward of the same texts (later layers also see the hidden states fp8 shifted)."""
    from spectr.runtime import set_router, trace_routing

    same = total = 0
    for text in texts:
        ids = tok(text, return_tensors="pt", truncation=True, max_length=max_tokens).input_ids
        chosen = {}
        for scoring in ("exact", "fp8"):
            set_router(model, scoring=scoring)
            with torch.no_grad(), trace_routing(model) as trace:
                model(ids)
            chosen[scoring] = {m: trace.choices(m)[0].clone() for m in trace.calls}
        for m, idx in chosen["exact"].items():
            same += int((chosen["fp8"][m] == idx).sum())
            total += idx.numel()
    set_router(model, scoring="exact")
    return same / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="saved SmolLM2-135M-Instruct folder")
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, default=ROOT / ".." / "shared" / "datasets")
    ap.add_argument("--max-docs", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study_fp8_scoring.md")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spectr.runtime import load_bundle, set_router
    from spectr.runtime.evaluate import read_jsonl, routing_accuracy
    from spectr.runtime.presets import EVAL_PRESETS

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.base)
    model = load_bundle(AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32).eval(), a.bundle)
    names = model.spectr.bundle.expert_names
    data = {d: read_jsonl(a.data_dir / d / "test.jsonl", a.max_docs) for d in names}
    results = {}
    for scoring in ("exact", "fp8"):
        set_router(model, scoring=scoring)
        results[scoring] = routing_accuracy(model, tok, data, max_tokens=a.max_tokens, batch_size=8)
    same = agreement(model, tok, [t for texts in data.values() for t in texts[:2]], a.max_tokens)
    lines = [
        "# Scoring in float8: routing accuracy on the real library (benchmarks/study_fp8_scoring.py)",
        "",
        f"SmolLM2-135M-Instruct (fp32, CPU), the {len(names)}-expert library of ../shared/experts; {a.max_docs} test "
        f"documents per domain x {a.max_tokens} tokens; every token, module and layer decision counted "
        "(runtime.evaluate.routing_accuracy), each preset in its own routed forward. fp8: RouterConfig.scoring="
        "'fp8' (x per token and each V direction scaled into float8 e4m3, routing.project_fp8).",
        "",
        "| preset | k | top-1 exact | top-1 fp8 | top-k exact | top-k fp8 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in EVAL_PRESETS:
        e, f = results["exact"][r], results["fp8"][r]
        lines.append(f"| {r} | {e['k']} | {e['top1']['macro']:.3f} | {f['top1']['macro']:.3f} | "
                     f"{e['topk']['macro']:.3f} | {f['topk']['macro']:.3f} |")
    lines += ["", f"Default preset, 2 documents per domain, each scoring in its own forward: {same:.1%} of the "
              "decisions (token x module) are the same with fp8 scoring.", "",
              f"Command: `python benchmarks/study_fp8_scoring.py --base BASE --bundle BUNDLE --max-docs {a.max_docs} "
              f"--max-tokens {a.max_tokens}` ({time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads)."]
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
