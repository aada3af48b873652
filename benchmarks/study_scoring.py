"""Cheaper scoring for pooled input groups, measured before it is built (issue 7, E = 64 prefill).

The default decides each token of a pooled group (q,k,v; gate,up) on the sum of every member's score
||V_m,e^T x||: at E experts of rank r that scoring GEMM has (members * E * r) columns, at E = 64 half as many
extra columns as the q/k/v projection itself. Candidates that score the group with E * r columns:
  lead      ||V_lead,e^T x||, the first member's directions only (q_proj; gate_proj);
  shared    ||W_e^T x||, W_e the top-r left singular vectors of [V_q,e | V_k,e | V_v,e] (one set of r
            directions per expert for the whole group, computed once at load);
and, at the default's cost but in 8-bit floats: fp8 = x and V^T cast to float8 e4m3 with one scale each.
For each: top-1 agreement with the default's decision, and routing accuracy (the fraction of decisions that
pick the document's own domain expert), on the real SmolLM2 library at the base model's own activations
(hooks on the group's input, no expert applied; the same definition as /work/shared/README.md's sanity figure).

    python benchmarks/study_scoring.py --base-model /tmp/smol --bundle /tmp/lib --data-dir ../shared/datasets \
        --max-docs 4 --max-tokens 128 [--out benchmarks/results/study_scoring.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from spectr.runtime import read_bundle
from spectr.runtime.evaluate import read_jsonl, tokenize
from spectr.runtime.layer import INPUT_GROUPS

GROUPS = [g for g in INPUT_GROUPS if g[0] in ("q_proj", "gate_proj")]


def group_tensors(bundle, layer_prefix: str, members: tuple[str, ...]):
    """Per member: Vt (E, r, d) float32 and rank (E,) from the bundle."""
    out = []
    for m in members:
        name = f"{layer_prefix}.{m}"
        Vt = bundle.tensors[f"{name}.Vt"].float()
        E = bundle.tensors[f"{name}.rank"].numel()
        out.append((Vt.view(E, -1, Vt.shape[1]), bundle.tensors[f"{name}.rank"]))
    return out


def shared_basis(Vts: list[torch.Tensor], r: int) -> torch.Tensor:
    """(E, r, d): per expert the top-r left singular vectors of the members' stacked V's."""
    stacked = torch.cat(Vts, dim=1)  # (E, M*r, d): rows are directions
    _, _, Vh = torch.linalg.svd(stacked, full_matrices=False)  # rows of Vh span the row space, by energy
    return Vh[:, :r]


def fp8(t: torch.Tensor) -> torch.Tensor:
    scale = t.abs().amax().clamp(min=1e-12) / 448.0  # e4m3's largest finite value
    return (t / scale).to(torch.float8_e4m3fn).float() * scale


def norms(x: torch.Tensor, Vt: torch.Tensor) -> torch.Tensor:
    """||V_e^T x|| for x (t, d), Vt (E, r, d) -> (t, E)."""
    return torch.einsum("td,erd->ter", x, Vt).norm(dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--max-docs", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    bundle = read_bundle(a.bundle)
    names = bundle.expert_names
    model = AutoModelForCausalLM.from_pretrained(a.base_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.base_model)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        child = name.rpartition(".")[2]
        if any(child == g[0] for g in GROUPS):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, n=name: captured.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1]))))
    plans = {}  # lead module name -> (members' Vt, ranks, shared W, fp8 Vts)
    for lead in [n for n, m in model.named_modules() if n.rpartition(".")[2] in ("q_proj", "gate_proj")]:
        prefix, _, child = lead.rpartition(".")
        members = next(g for g in GROUPS if g[0] == child)
        if f"{prefix}.{members[0]}.Vt" not in bundle.tensors:
            continue
        parts = group_tensors(bundle, prefix, members)
        Vts = [p[0] for p in parts]
        plans[lead] = (Vts, [p[1] for p in parts], shared_basis(Vts, Vts[0].shape[1]), [fp8(v) for v in Vts])
    counts = defaultdict(lambda: defaultdict(int))  # group kind -> counter
    for d, domain in enumerate(names):
        path = a.data_dir / domain / "test.jsonl"
        docs = tokenize(tok, read_jsonl(path, a.max_docs), a.max_tokens)
        for ids in docs:
            with torch.no_grad():
                model(torch.tensor([ids]))
            for lead, (Vts, ranks, W, Vq) in plans.items():
                x = captured[lead]
                kind = "q,k,v" if lead.endswith("q_proj") else "gate,up"
                present = [r > 0 for r in ranks]
                default = sum(norms(x, V).masked_fill(~p, 0.0) for V, p in zip(Vts, present))
                xq = fp8(x)
                cand = {
                    "default (sum over members)": default,
                    "lead member only": norms(x, Vts[0]),
                    "shared r directions": norms(x, W),
                    "fp8 sum over members": sum(norms(xq, V).masked_fill(~p, 0.0) for V, p in zip(Vq, present)),
                }
                base = default.argmax(1)
                c = counts[kind]
                c["tokens"] += x.shape[0]
                for label, g in cand.items():
                    top = g.argmax(1)
                    c[f"{label}|agree"] += int((top == base).sum())
                    c[f"{label}|own"] += int((top == d).sum())
    for h in hooks:
        h.remove()
    E = len(names)
    lines = ["# Cheaper scoring for pooled groups: agreement and routing accuracy (benchmarks/study_scoring.py)", "",
             f"SmolLM2-135M library, {E} experts, {a.max_docs} test documents per domain x {a.max_tokens} tokens, "
             "top-1 decisions per token and layer at the base model's activations.", "",
             "| group | scoring | scoring columns | agrees with default | routing accuracy |", "|---|---|---:|---:|---:|"]
    for kind, c in counts.items():
        M = 3 if kind == "q,k,v" else 2
        for label in ("default (sum over members)", "lead member only", "shared r directions", "fp8 sum over members"):
            cols = "M*E*r" if label.startswith(("default", "fp8")) else "E*r"
            cols = cols.replace("M", str(M))
            lines.append(f"| {kind} | {label} | {cols} | {c[f'{label}|agree'] / c['tokens']:.3f} | "
                         f"{c[f'{label}|own'] / c['tokens']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps({k: dict(v) for k, v in counts.items()}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
