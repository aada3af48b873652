"""Tables and pictures for docs/RESULTS.md's round two from one or more study.json files (study_routing.py).

    python benchmarks/round_two_report.py --study docs/results/round2/lib8a/study.json \
        --study docs/results/round2/lib8b/study.json --out docs/results/round2/lib8 --title "8-expert library"

Runs that share base and oracle (the same library and sample) are merged row by row (a `--switch-only` run adds
its tokens to switch to the rows of the same names; a study.partial.json of a run cut short counts too); writes summary.md
(top-1, top-1 where the text's expert adapts the module, loss, share of the oracle's gain, tokens to switch),
tradeoff.png (accuracy against switch delay) and layers.png (top-1 per layer).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def macro(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def merge(paths: list[Path]) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    results: dict[str, Any] = {}
    switch: dict[str, Any] = {}
    metas = []
    for p in paths:
        data = json.loads(p.read_text())  # study.json, or study.partial.json of a run cut short (no meta)
        if "meta" in data:
            metas.append(data["meta"])
        for name, r in data["results"].items():
            if name in ("base", "oracle") and name in results:
                if abs(macro(results[name]["loss"]) - macro(r["loss"])) > 1e-6:
                    raise SystemExit(f"{p}: its {name} loss differs from the first study's; not the same sample")
                continue
            results[name] = r
        switch.update({k: v for k, v in data.get("switch", {}).items() if k != "definition"})
    return results, switch, metas


def rows(results: dict[str, Any], switch: dict[str, Any]) -> list[dict[str, Any]]:
    base, oracle = macro(results["base"]["loss"]), macro(results["oracle"]["loss"])
    out = []
    for name, r in results.items():
        loss = macro(r["loss"])
        out.append({
            "name": name, "loss": loss, "share": (base - loss) / (base - oracle),
            "top1": macro(r["top1"]) if r.get("top1") else None,
            "top1_covered": macro(r["top1_covered"]) if r.get("top1_covered") else None,
            "switch": switch[name]["mean_latency"] if name in switch else None,
            "censored": switch[name]["censored"] if name in switch else None,
        })
    return out


def table(rs: list[dict[str, Any]]) -> str:
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = ["| configuration | top-1 | top-1 covered | loss | share of the oracle's gain | tokens to switch |",
             "|---|---|---|---|---|---|"]
    for r in rs:
        lines.append(f"| {r['name']} | {fmt(r['top1'], '.3f')} | {fmt(r['top1_covered'], '.3f')} | {r['loss']:.4f} | "
                     f"{r['share']:.1%} | {fmt(r['switch'], '.1f')} |")
    return "\n".join(lines)


def pictures(out: Path, results: dict[str, Any], rs: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rs if r["top1"] is not None and r["switch"] is not None]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for r in pts:
        ax.scatter(r["switch"], r["top1"], s=20)
        ax.annotate(f"{r['name'].replace('default', 'd')} ({r['share']:.0%})", (r["switch"], r["top1"]), fontsize=6.5,
                    xytext=(3, 2), textcoords="offset points")
    ax.axhline(0.75, color="grey", ls=":")
    ax.axvline(12, color="grey", ls=":")
    ax.set(xlabel="mean tokens to switch at a domain boundary", ylabel="top-1 routing accuracy (macro)",
           title=f"{title}: accuracy vs switch delay (label: share of the oracle's loss gain; goal: above and left of the dotted lines)")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.5, 4))
    for r in pts:
        layers = results[r["name"]].get("per_layer")
        if layers:
            ax.plot([int(k) for k in layers], list(layers.values()), marker=".", lw=1, label=r["name"])
    ax.set(xlabel="layer", ylabel="top-1 accuracy (macro)", title=f"{title}: top-1 per layer")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "layers.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="routing study")
    args = ap.parse_args()
    results, switch, metas = merge(args.study)
    rs = rows(results, switch)
    args.out.mkdir(parents=True, exist_ok=True)
    pictures(args.out, results, rs, args.title)
    text = (f"# {args.title}\n\n" + "\n".join(f"- `{m['command']}`: {m['seconds']:.0f} s on {m['device']}" for m in metas)
            + "\n\n" + table(rs) + "\n")
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(rs, indent=1))
    print(text)


if __name__ == "__main__":
    main()
