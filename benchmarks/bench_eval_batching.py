"""Side by side: `spectr eval routing`'s routed forwards with each domain in its own batches (as before) and
with every domain's documents in shared batches (runtime.evaluate.mixed_batches), alternating, one process.

    python benchmarks/bench_eval_batching.py --base-model SMOL --bundle BUNDLE --data-dir ../shared/datasets

CPU seconds (process_time, all threads) are the figure to compare on a shared box; wall seconds follow the load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--presets", default="default")
    ap.add_argument("--max-docs", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (per-domain, mixed) / (mixed, per-domain)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spectr.runtime import load_bundle
    from spectr.runtime.evaluate import (_traced, apply_preset, mixed_batches, pad_batches, pad_id_of, read_jsonl,
                                         tokenize)

    tok = AutoTokenizer.from_pretrained(args.base_model)
    model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32).eval()
    load_bundle(model, args.bundle)
    docs = {p.parent.name: tokenize(tok, read_jsonl(p, args.max_docs), args.max_tokens)
            for p in sorted(args.data_dir.glob("*/test.jsonl"))}
    pad = pad_id_of(tok)
    layouts = {
        "per-domain": [(i, m) for ds in docs.values() for i, m in pad_batches(ds, args.batch_size, pad)],
        "mixed": [(i, m) for i, m, _ in mixed_batches(docs, args.batch_size, pad)],
    }
    real = sum(len(x) for ds in docs.values() for x in ds)
    for name, batches in layouts.items():
        print(f"{name}: {len(batches)} forwards, {sum(i.numel() for i, _ in batches)} padded tokens "
              f"({real} real) per preset")
    presets = [p for p in args.presets.split(",") if p]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in layouts}
    with torch.inference_mode():
        for r in range(args.repeats):
            for name in (list(layouts) if r % 2 == 0 else list(layouts)[::-1]):
                cpu, wall = time.process_time(), time.perf_counter()
                for p in presets:
                    apply_preset(model, p)
                    for ids, mask in layouts[name]:
                        _traced(model, ids, mask)
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
                print(f"round {r} {name}: cpu {times[name][-1][0]:.1f} s, wall {times[name][-1][1]:.1f} s, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    cpu = {k: statistics.median(c for c, _ in v) for k, v in times.items()}
    print(f"median cpu: per-domain {cpu['per-domain']:.1f} s, mixed {cpu['mixed']:.1f} s, "
          f"ratio {cpu['mixed'] / cpu['per-domain']:.3f}")


if __name__ == "__main__":
    main()
