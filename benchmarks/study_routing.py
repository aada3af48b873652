"""Settle the routing choices with evidence on a real expert library; writes docs/results/.

For every router configuration, one routed forward per batch gives both what the model does (mean
next-token loss) and the decisions it makes (routing accuracy, DESIGN.md's definition: the fraction of
(token, module, layer) top-1 decisions that pick the domain's own expert; top-k hit rate beside it).
Beside them: the base model, each domain's own expert (the oracle), and switching latency at a domain
boundary for the pooling and smoothing variants. Writes study.json, study.md and three pictures.

    python benchmarks/study_routing.py --base-model PATH --bundle PATH --data-dir ../shared/datasets \
        --max-docs 16 --max-tokens 128 --out docs/results
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


from spectr.runtime import load_bundle, read_bundle, set_router, trace_routing  # noqa: E402
from spectr.runtime.evaluate import pad_batches, pad_id_of, read_jsonl, switching, tokenize  # noqa: E402
from spectr.runtime.presets import PRESETS, preset_settings  # noqa: E402
from spectr.runtime.trace import layer_of  # noqa: E402

# name -> RouterConfig fields; "spectr k=4" is the reference code's behaviour.
CONFIGS: dict[str, dict[str, Any]] = {
    "spectr k=4": dict(top_k=4),
    "spectr sigma k=4": dict(top_k=4, score="sigma"),
    "spectr ranknorm k=4": dict(top_k=4, rank_normalize=True),
    "arrow k=4 (PEFT)": dict(router="arrow", weighting="softmax", combine="mix", top_k=4),
    "spectr k=1": dict(top_k=1),
    "spectr k=2": dict(top_k=2),
    "spectr k=8": dict(top_k=8),
    "spectr mix k=1": dict(top_k=1, combine="mix"),
    "spectr mix k=2": dict(top_k=2, combine="mix"),
    "spectr mix k=4": dict(top_k=4, combine="mix"),
    "spectr softmax k=4": dict(top_k=4, weighting="softmax", temperature=1.0),
    "spectr mix softmax k=4": dict(top_k=4, combine="mix", weighting="softmax", temperature=1.0),
    "spectr pool=input k=4": dict(top_k=4, pool="input"),
    "spectr pool=layer k=4": dict(top_k=4, pool="layer"),
    "spectr smooth=0.5 k=4": dict(top_k=4, smooth=0.5),
    "spectr smooth=0.8 k=4": dict(top_k=4, smooth=0.8),
    "spectr pool=layer k=1": dict(top_k=1, pool="layer"),
    "spectr pool=input k=1": dict(top_k=1, pool="input"),
    "spectr smooth=0.5 k=1": dict(top_k=1, smooth=0.5),
    "spectr pool=input smooth=0.5 k=1": dict(top_k=1, pool="input", smooth=0.5),
    "arrow k=1": dict(router="arrow", weighting="softmax", combine="mix", top_k=1),
    "uniform (all experts)": dict(router="uniform", combine="mix", top_k=8),
}
# Round two (issue 11): the runtime's default (top-1, pool="input", output mix) changed by one option at a time,
# then combinations. Every row is the reference preset changed by these fields, like the rows above.
DEFAULT = dict(top_k=1, pool="input", combine="mix", weighting="softmax")
ROUND2: dict[str, dict[str, Any]] = {
    "default": DEFAULT,
    "default smooth=0.5": {**DEFAULT, "smooth": 0.5},
    "default smooth=0.8": {**DEFAULT, "smooth": 0.8},
    "default prompt_mean=0.5": {**DEFAULT, "prompt_mean": 0.5},
    "default prompt_mean=1": {**DEFAULT, "prompt_mean": 1.0},
    "default depth=cumulative": {**DEFAULT, "depth_evidence": "cumulative"},
    "default depth=decayed 0.8": {**DEFAULT, "depth_evidence": "decayed", "depth_decay": 0.8},
    "default attn_follows_mlp": {**DEFAULT, "attn_follows_mlp": True},
    "default calibrate=base_weight": {**DEFAULT, "calibrate": "base_weight"},
    "default calibrate=isotropic": {**DEFAULT, "calibrate": "isotropic"},
    "default ranknorm": {**DEFAULT, "rank_normalize": True},
    "default attn_follows_mlp depth=cumulative": {**DEFAULT, "attn_follows_mlp": True, "depth_evidence": "cumulative"},
    "default attn_follows_mlp smooth=0.5": {**DEFAULT, "attn_follows_mlp": True, "smooth": 0.5},
    "default attn_follows_mlp prompt_mean=0.5": {**DEFAULT, "attn_follows_mlp": True, "prompt_mean": 0.5},
    "default attn_follows_mlp depth=cumulative smooth=0.5": {**DEFAULT, "attn_follows_mlp": True,
                                                             "depth_evidence": "cumulative", "smooth": 0.5},
    "default attn_follows_mlp depth=cumulative prompt_mean=0.5": {**DEFAULT, "attn_follows_mlp": True,
                                                                  "depth_evidence": "cumulative", "prompt_mean": 0.5},
    "default attn_follows_mlp depth=cumulative smooth=0.5 ranknorm": {
        **DEFAULT, "attn_follows_mlp": True, "depth_evidence": "cumulative", "smooth": 0.5, "rank_normalize": True},
    "default attn_follows_mlp prompt_mean=0.5 ranknorm": {**DEFAULT, "attn_follows_mlp": True, "prompt_mean": 0.5,
                                                          "rank_normalize": True},
    "default prompt_mean=0.5 ranknorm": {**DEFAULT, "prompt_mean": 0.5, "rank_normalize": True},
}
CONFIGS.update(ROUND2)
# Named sets for --configs (a comma list may mix set names and configuration names).
# round2a + round2b: what the 8-expert library (all rank 8) needs; ranknorm and isotropic calibration rank
# alike there (equal ranks, equal d_in within an input group), so they run on the mixed library.
SETS = {"round1": [c for c in CONFIGS if c not in ROUND2], "round2": list(ROUND2),
        "round2a": ["default", "default smooth=0.5", "default prompt_mean=0.5", "default prompt_mean=1",
                    "default depth=cumulative", "default depth=decayed 0.8"],
        "round2b": ["default attn_follows_mlp", "default calibrate=base_weight", "default attn_follows_mlp depth=cumulative",
                    "default attn_follows_mlp smooth=0.5", "default attn_follows_mlp prompt_mean=0.5",
                    "default attn_follows_mlp depth=cumulative smooth=0.5",
                    "default attn_follows_mlp depth=cumulative prompt_mean=0.5"],
        "mixed": ["spectr k=4", "spectr ranknorm k=4", "default", "default ranknorm", "default calibrate=isotropic",
                  "default calibrate=base_weight", "default attn_follows_mlp depth=cumulative smooth=0.5",
                  "default attn_follows_mlp depth=cumulative smooth=0.5 ranknorm"],
        # the mixed library against the best option of the 8-expert run (attn_follows_mlp + prompt_mean=0.5)
        "mixed2": ["default", "default ranknorm", "default attn_follows_mlp prompt_mean=0.5",
                   "default attn_follows_mlp prompt_mean=0.5 ranknorm"],
        # tokens to switch of the 8-expert run's rows (with --switch-only)
        "switch8": ["default", "default attn_follows_mlp prompt_mean=0.5", "default prompt_mean=0.5",
                    "default attn_follows_mlp", "default smooth=0.5", "default attn_follows_mlp smooth=0.5"]}
SWITCH = ["spectr k=4", "arrow k=4 (PEFT)", "spectr pool=input k=4", "spectr pool=layer k=4",
          "spectr smooth=0.5 k=4", "spectr smooth=0.8 k=4", "spectr k=1", "spectr pool=input k=1",
          "spectr smooth=0.5 k=1", "spectr pool=input smooth=0.5 k=1", "spectr ranknorm k=4", *ROUND2]


@torch.no_grad()
def measure(model, docs: dict[str, list[list[int]]], names: list[str], pad: int, batch: int, routed: bool) -> dict:
    dev = next(model.parameters()).device
    """Loss per domain and, when routed, top-1/top-k hits per domain, layer, module type, plus confusion."""
    E = len(names)
    out: dict[str, Any] = {"loss": {}, "top1": {}, "topk": {}, "top1_covered": {}, "layer": defaultdict(lambda: [0, 0]),
                           "module": defaultdict(lambda: [0, 0]), "confusion": {}}
    for d, doc_ids in docs.items():
        e = names.index(d)
        loss_sum, n_loss, hit1, hitk, n, conf = 0.0, 0, 0, 0, 0, torch.zeros(E)
        hit_cov, n_cov = 0, 0  # decisions at modules the text's own expert adapts (partial coverage)
        for ids, mask in pad_batches(doc_ids, batch, pad):
            ids, mask = ids.to(dev), mask.to(dev)
            if routed:
                with trace_routing(model) as trace:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                real = mask.bool().cpu()  # trace choices live on the CPU
                for m in trace.calls:
                    idx = trace.choices(m)[0]
                    top1 = idx[..., 0][real]
                    h1, hk, c = int((top1 == e).sum()), int((idx == e).any(-1)[real].sum()), int(real.sum())
                    hit1, hitk, n = hit1 + h1, hitk + hk, n + c
                    if int(model.get_submodule(m).rank[e]) > 0:
                        hit_cov, n_cov = hit_cov + h1, n_cov + c
                    for key in (("layer", layer_of(m)), ("module", m.rsplit(".", 1)[-1])):
                        out[key[0]][(d, key[1])][0] += h1
                        out[key[0]][(d, key[1])][1] += c
                    conf += torch.bincount(top1.cpu(), minlength=E).float()
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            real_t = mask[:, 1:].bool()
            loss_sum += F.cross_entropy(logits[:, :-1].float()[real_t], ids[:, 1:][real_t], reduction="sum").item()
            n_loss += int(real_t.sum())
        out["loss"][d] = loss_sum / n_loss
        if routed:
            out["top1"][d], out["topk"][d] = hit1 / n, hitk / n
            out["top1_covered"][d] = hit_cov / n_cov if n_cov else 0.0
            out["confusion"][d] = (conf / conf.sum()).tolist()
    return out


def expand(spec: str) -> list[str]:
    """--configs: set names (SETS) and configuration names, comma-separated, in order, each once."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        for n in SETS.get(part, [part]):
            if n not in CONFIGS:
                raise SystemExit(f"--configs: unknown configuration {n!r}; sets: {', '.join(SETS)}")
            if n not in names:
                names.append(n)
    return names


def macro(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def per_key(table: dict, domains: list[str]) -> dict[str, float]:
    """Macro over domains of per-(domain, key) accuracies."""
    keys = sorted({k for _, k in table}, key=lambda k: (isinstance(k, str), k))
    return {str(k): sum(table[(d, k)][0] / table[(d, k)][1] for d in domains) / len(domains) for k in keys}


def share(results: dict, name: str) -> float:
    """Share of the oracle's gain: (base - loss) / (base - oracle), macro losses."""
    base, oracle = macro(results["base"]["loss"]), macro(results["oracle"]["loss"])
    return (base - macro(results[name]["loss"])) / (base - oracle)


def tradeoff(out: Path, results: dict, switch: dict) -> None:
    """Top-1 accuracy against tokens to switch, one point per configuration with both; loss share as label."""
    import matplotlib.pyplot as plt

    names = [n for n in switch if n in results and results[n].get("top1")]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for n in names:
        x, y = switch[n]["mean_latency"], macro(results[n]["top1"])
        ax.scatter(x, y, s=18)
        ax.annotate(f"{n} ({share(results, n):.0%})", (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axhline(0.75, color="grey", ls=":")
    ax.axvline(12, color="grey", ls=":")
    ax.set(xlabel="mean tokens to switch at a domain boundary", ylabel="top-1 routing accuracy (macro)",
           title="Accuracy vs switch delay (label: share of the oracle's loss gain); goal: upper left of the dotted lines")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=110)
    plt.close(fig)


def pictures(out: Path, results: dict, domains: list[str], names: list[str], switch: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for label in ("spectr k=4", "spectr sigma k=4", "arrow k=4 (PEFT)", "spectr pool=layer k=4", "default",
                  "default attn_follows_mlp depth=cumulative"):
        if label not in results:
            continue
        layers = results[label]["per_layer"]
        ax.plot([int(k) for k in layers], list(layers.values()), marker=".", label=label)
    ax.axhline(1 / len(names), color="grey", ls=":", label="chance")
    ax.set(xlabel="layer", ylabel="top-1 routing accuracy (macro)", title="Routing accuracy per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_layer.png", dpi=110)
    plt.close(fig)

    if switch:
        tradeoff(out, results, switch)
    if "spectr k=4" not in results:
        return
    conf = torch.tensor([results["spectr k=4"]["confusion"][d] for d in domains])
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(conf, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    for i in range(len(domains)):
        for j in range(len(names)):
            ax.text(j, i, f"{conf[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if conf[i, j] > 0.5 else "black")
    ax.set(xlabel="chosen top-1 expert", ylabel="domain of the text", title="SpectR (k=4): domain -> top-1 expert")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "confusion_spectr.png", dpi=110)
    plt.close(fig)

    rows = [r for r in ("base", "oracle", "uniform (all experts)", "arrow k=4 (PEFT)", "spectr k=4", "spectr mix k=4",
            "spectr k=1", "spectr pool=layer k=1") if r in results]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(domains))], [results[r]["loss"][d] for d in domains], width, label=r)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains, rotation=20)
    ax.set(ylabel="mean next-token loss", title="Loss per domain per router (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_per_domain.png", dpi=110)
    plt.close(fig)


def report(out: Path, results: dict, switch: dict, domains: list[str], meta: dict) -> str:
    lines = [f"# Routing study ({meta['base']}, {meta['experts']} experts, {meta['docs']} docs x {meta['tokens']} tokens per domain)",
             "", f"Command: `{meta['command']}`", f"Time: {meta['seconds']:.0f} s on {meta['device']} ({meta['threads']} CPU threads), fp32.", "",
             "## Routing accuracy (macro over domains) and loss", "",
             "Share = share of the oracle's gain, (base - loss) / (base - oracle). top-1 covered: only decisions at "
             "modules that the text's own expert adapts (differs from top-1 only in a library with partial coverage).",
             "",
             "| configuration | top-1 | top-1 covered | top-k | k | mean loss (macro) | share | tokens to switch |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        loss = macro(r["loss"])
        acc = (f"{macro(r['top1']):.3f}", f"{macro(r['top1_covered']):.3f}", f"{macro(r['topk']):.3f}") \
            if r.get("top1") else ("", "", "")
        lat = f"{switch[name]['mean_latency']:.1f}" if name in switch else ""
        lines.append(f"| {name} | {acc[0]} | {acc[1]} | {acc[2]} | {r.get('k', '')} | {loss:.4f} | "
                     f"{share(results, name):.1%} | {lat} |")
    lines += ["", "## Loss per domain", "", "| configuration | " + " | ".join(domains) + " |",
              "|---|" + "---|" * len(domains)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['loss'][d]:.3f}" for d in domains) + " |")
    lines += ["", "## Top-1 routing accuracy per domain", "", "| configuration | " + " | ".join(domains) + " |",
              "|---|" + "---|" * len(domains)]
    for name, r in results.items():
        if r.get("top1"):
            lines.append(f"| {name} | " + " | ".join(f"{r['top1'][d]:.3f}" for d in domains) + " |")
    with_modules = [n for n, r in results.items() if r.get("per_module")]
    if with_modules:
        kinds = list(results[with_modules[0]]["per_module"])
        lines += ["", "## Top-1 accuracy per module type", "", "| configuration | " + " | ".join(kinds) + " |",
                  "|---|" + "---|" * len(kinds)]
        for n in with_modules:
            lines.append(f"| {n} | " + " | ".join(f"{results[n]['per_module'][k]:.3f}" for k in kinds) + " |")
    if switch:
        lines += ["", "## Switching at a domain boundary", "", switch.get("definition", ""), "",
                  "| configuration | mean tokens to switch | censored pairs | pairs |", "|---|---|---|---|"]
        for name in [n for n in switch if n != "definition"]:
            s = switch.get(name)
            if s:
                lines.append(f"| {name} | {s['mean_latency']:.1f} | {s['censored']} | {len(s['pairs'])} |")
    pics = [("accuracy per layer", "accuracy_per_layer.png"), ("accuracy vs switch delay", "tradeoff.png"),
            ("confusion", "confusion_spectr.png"), ("loss per domain", "loss_per_domain.png")]
    for label, file in pics:
        if (out / file).is_file():
            lines += ["", f"![{label}]({file})"]
    lines.append("")
    text = "\n".join(lines)
    (out / "study.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True, help="folder of <domain>/test.jsonl")
    ap.add_argument("--max-docs", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--switch-pairs", type=int, default=8, help="domain pairs a->b (a ring over the domains)")
    ap.add_argument("--switch-sequences", type=int, default=4)
    ap.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--switch-only", action="store_true",
                    help="only tokens to switch for the chosen configurations (no base, oracle or accuracy rows)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32).eval().to(args.device)
    bundle = read_bundle(args.bundle)
    names = bundle.expert_names
    domains = [d for d in names if (args.data_dir / d / "test.jsonl").is_file()]
    texts = {d: read_jsonl(args.data_dir / d / "test.jsonl", args.max_docs) for d in domains}
    docs = {d: tokenize(tokenizer, t, args.max_tokens) for d, t in texts.items()}
    pad = pad_id_of(tokenizer)
    chosen = CONFIGS if args.configs is None else {c: CONFIGS[c] for c in expand(args.configs)}
    results: dict[str, Any] = {}
    if not args.switch_only:
        results["base"] = measure(model, docs, names, pad, args.batch_size, routed=False)
    load_bundle(model, bundle, "fixed", expert=names[0])
    oracle = {}
    for d in domains if not args.switch_only else []:
        set_router(model, preset="fixed", expert=d)
        oracle[d] = measure(model, {d: docs[d]}, names, pad, args.batch_size, routed=False)["loss"][d]
    if oracle:
        results["oracle"] = {"loss": oracle}
    for name, kw in chosen.items() if not args.switch_only else []:
        set_router(model, preset="reference", **kw)  # each configuration changes the reference
        r = measure(model, docs, names, pad, args.batch_size, routed=kw.get("router") != "uniform")
        r["k"] = kw["top_k"]
        r["config"] = kw
        if r["top1"]:
            r["per_layer"] = per_key(r.pop("layer"), domains)
            r["per_module"] = per_key(r.pop("module"), domains)
        else:
            r.pop("layer"), r.pop("module")
        results[name] = r
        print(f"{name:28} top1 {macro(r['top1']) if r['top1'] else float('nan'):.3f} loss {macro(r['loss']):.4f} "
              f"share {share(results, name):.3f} ({time.time() - t0:.0f} s)", flush=True)
        # rows so far, so that a run cut short (a device call's limit) still leaves its numbers
        (args.out / "study.partial.json").write_text(json.dumps({"results": results}, indent=1))
    switch: dict[str, Any] = {}
    ring = [(domains[i], domains[(i + 1) % len(domains)]) for i in range(min(args.switch_pairs, len(domains)))]
    stream_texts = {d: read_jsonl(args.data_dir / d / "test.jsonl", 64) for d in domains}  # enough for segments
    for name in [s for s in SWITCH if s in chosen]:
        PRESETS[f"study:{name}"] = preset_settings("reference", **{k: v for k, v in chosen[name].items() if k != "top_k"})
        got = switching(model, tokenizer, stream_texts, routers=[f"study:{name}"], pairs=ring, top_k=chosen[name]["top_k"],
                        sequences=args.switch_sequences)
        switch["definition"] = got["definition"]
        switch[name] = got[f"study:{name}"]
        print(f"{name:28} switch {switch[name]['mean_latency']:.1f} tokens ({time.time() - t0:.0f} s)", flush=True)
        (args.out / "study.partial.json").write_text(json.dumps({"results": results, "switch": switch}, indent=1))
    meta = dict(base=args.base_model.name, experts=len(names), docs=args.max_docs, tokens=args.max_tokens,
                threads=torch.get_num_threads(), device=args.device, seconds=time.time() - t0,
                command="python benchmarks/study_routing.py " + " ".join(sys.argv[1:]))
    (args.out / "study.json").write_text(json.dumps({"meta": meta, "results": results, "switch": switch}, indent=1))
    if args.switch_only:
        print(json.dumps({n: s["mean_latency"] for n, s in switch.items() if n != "definition"}, indent=1))
        return
    pictures(args.out, results, domains, names, switch)
    print(report(args.out, results, switch, domains, meta))


if __name__ == "__main__":
    main()
