"""`spectr eval`: routing accuracy, LM loss table and mixed-domain switching (runtime/evaluate*.py)."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

eval_app = typer.Typer(help="Measure routing quality and task performance of a bundle on a base model.",
                       no_args_is_help=True)
# markup=False: names, paths and reasons come from users and the registry; '[x]' in them is text, not style.
out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)

BASE = typer.Option(..., "--base-model", help="base model folder (transformers format, with its tokenizer)")
BUNDLE = typer.Option(..., "--bundle", help="bundle folder from `spectr bundle create`")
DATA = typer.Option([], "--data", help="DOMAIN=FILE.jsonl (one {\"text\": ...} a line); repeat per domain")
DATA_DIR = typer.Option(None, "--data-dir", help="folder of <domain>/<split>.jsonl; every domain in it")
SPLIT = typer.Option("test", "--split", help="file name (without .jsonl) read from each --data-dir domain")
MAP = typer.Option([], "--map", help="DOMAIN=EXPERT when a domain's expert has another name; repeatable")
JSON_OUT = typer.Option(None, "--json", help="write the results here as JSON")
MAX_DOCS = typer.Option(16, "--max-docs", help="first N documents per domain")
MAX_TOKENS = typer.Option(128, "--max-tokens", help="truncate each document to T tokens")
DEVICE = typer.Option("cpu", "--device", help="cpu or cuda")


def _pairs_of(specs: list[str], what: str) -> dict[str, str]:
    got = {}
    for s in specs:
        key, sep, value = s.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{what} {s!r}: expected KEY=VALUE")
        got[key] = value
    return got


def _data(specs: list[str], data_dir: Optional[Path], split: str, max_docs: int) -> dict[str, list[str]]:
    from spectr.runtime.evaluate import read_jsonl

    files = {d: Path(f) for d, f in _pairs_of(specs, "--data").items()}
    if data_dir is not None:
        found = sorted(p for p in Path(data_dir).glob(f"*/{split}.jsonl"))
        if not found:
            raise ValueError(f"--data-dir {data_dir}: no <domain>/{split}.jsonl files")
        files = {**{p.parent.name: p for p in found}, **files}
    if not files:
        raise ValueError("no data: give --data DOMAIN=FILE.jsonl (repeat per domain) or --data-dir DIR")
    return {d: read_jsonl(f, max_docs) for d, f in files.items()}


def _load(base_model: Path, device: str, bundle: Path | None = None):
    from spectr.inputs import bundle_folder, model_folder

    base_model = model_folder(base_model)
    if bundle is not None:
        bundle_folder(bundle)  # a wrong --bundle fails before the model loads
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval().to(device)
    return model, tokenizer


def _write(path: Optional[Path], result: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=1) + "\n")
        err.print(f"wrote {path}")


def _grid(title: str, columns: list[str], rows: dict[str, dict[str, float]], fmt: str = "{:.3f}") -> None:
    table = Table("", title=title)
    for c in columns:
        table.add_column(c, overflow="fold")  # long domain names wrap rather than vanish behind "…"
    for name, vals in rows.items():
        table.add_row(name, *[fmt.format(vals[c]) if c in vals else "" for c in columns])
    out.print(table)


def _columns(title: str, rows: list[str], by_router: dict[str, dict[str, float]]) -> None:
    table = Table("", *by_router, title=title)
    for row in rows:
        table.add_row(row, *[f"{v[row]:.3f}" for v in by_router.values()])
    out.print(table)


@contextmanager
def _steps(total: int | None) -> Iterator[Callable[[str], None]]:
    """A transient progress line on stderr; the library calls back after each (configuration, domain)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [BarColumn(), MofNCompleteColumn()] if total else [TextColumn("{task.completed} done")]
    with Progress(*columns, TimeElapsedColumn(), TextColumn("{task.description}"), console=err,
                  transient=True) as bar:
        task = bar.add_task("loading", total=total)
        yield lambda label: bar.update(task, advance=1, description=label)


def _fail(exc: Exception) -> None:
    from spectr.errors import fail

    fail(exc)


@eval_app.command("routing")
def routing(
    base_model: Path = BASE,
    bundle: Path = BUNDLE,
    data: list[str] = DATA,
    data_dir: Optional[Path] = DATA_DIR,
    split: str = SPLIT,
    mapping: list[str] = MAP,
    json_out: Optional[Path] = JSON_OUT,
    max_docs: int = MAX_DOCS,
    max_tokens: int = MAX_TOKENS,
    routers: Optional[str] = typer.Option(None, "--presets", "--routers",
                                          help="comma-separated presets (runtime/presets.py); default: reference "
                                               "(the paper's code), peft-arrow, default (the runtime's)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="k of every preset (default: each preset's own)"),
    batch_size: int = typer.Option(16, "--batch-size",
                                   help="documents per forward at the longest length; shorter documents of any "
                                        "domain share forwards of as many tokens"),
    shared: bool = typer.Option(True, "--shared-forward/--own-forwards",
                                help="one forward routed by the default preset serves every preset (the others "
                                     "decide on its module inputs; exact for the default), or each preset in its "
                                     "own routed forward (exact for all, one forward pass per preset)"),
    scoring: str = typer.Option("exact", "--scoring", help="exact | fp8: every preset scores in float8 "
                                "(benchmarks/results/study_fp8_scoring.md)"),
    device: str = DEVICE,
) -> None:
    """Routing accuracy inside the routed forward: top-1 and top-k per domain, layer, module type; macro."""
    from spectr.runtime import load_bundle
    from spectr.runtime.evaluate import routing_accuracy
    from spectr.runtime.presets import EVAL_PRESETS, check_scoring

    t0 = time.perf_counter()
    try:
        check_scoring(scoring)
        texts = _data(data, data_dir, split, max_docs)
        model, tokenizer = _load(base_model, device, bundle)
        load_bundle(model, bundle, scoring=scoring)
        names = [r for r in routers.split(",") if r] if routers else list(EVAL_PRESETS)
        with _steps(len(names) * len(texts)) as step:
            result = routing_accuracy(model, tokenizer, texts, mapping=_pairs_of(mapping, "--map"), routers=names,
                                      top_k=top_k, max_tokens=max_tokens, batch_size=batch_size, progress=step,
                                      shared_forward=shared)
    except ValueError as exc:
        _fail(exc)
    first = next(iter(result.values()))
    ks = ", ".join(f"{r} {v['k']}" for r, v in result.items())
    rows = list(texts) + ["macro"]
    # Rows are domains, layers or module types and columns routers, so tables stay narrow.
    _columns(f"top-1 routing accuracy (chance {first['chance_top1']:.3f})", rows,
             {r: v["top1"] for r, v in result.items()})
    _columns(f"top-k hit rate (k: {ks})", rows, {r: v["topk"] for r, v in result.items()})
    _columns("top-1 by module type (macro over domains)", list(first["per_module"]),
             {r: {m: a["top1"]["macro"] for m, a in v["per_module"].items()} for r, v in result.items()})
    _columns("top-1 by layer (macro over domains)", list(first["per_layer"]),
             {r: {layer: a["top1"]["macro"] for layer, a in v["per_layer"].items()} for r, v in result.items()})
    name = next(iter(result))
    experts = list(next(iter(first["confusion"].values())))
    table = Table("domain", *[e[:8] for e in experts],
                  title=f"{name}: domain -> top-1 expert (fraction of decisions)")
    for d, row in first["confusion"].items():
        table.add_row(d, *[f"{row[e]:.2f}" for e in experts])
    out.print(table)
    _write(json_out, result)
    lead = {v["forward"] for v in result.values()}
    how = f"one forward routed by {lead.pop()}" if len(result) > 1 and len(lead) == 1 else "each in its own forward"
    err.print(f"{sum(first['decisions'].values())} decisions per preset ({how}), k: {ks}, "
              f"{time.perf_counter() - t0:.1f} s")


@eval_app.command("lm")
def lm(
    base_model: Path = BASE,
    bundle: Path = BUNDLE,
    data: list[str] = DATA,
    data_dir: Optional[Path] = DATA_DIR,
    split: str = SPLIT,
    mapping: list[str] = MAP,
    json_out: Optional[Path] = JSON_OUT,
    max_docs: int = MAX_DOCS,
    max_tokens: int = MAX_TOKENS,
    ks: str = typer.Option("1,2,4", "--ks", help="k values of the SpectR rows"),
    arrow_k: int = typer.Option(4, "--arrow-k"),
    cross: bool = typer.Option(False, "--cross/--no-cross",
                               help="each expert on every domain (default: only on its own, the oracle; "
                                    "--cross costs E times as many forwards)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = DEVICE,
) -> None:
    """Mean next-token loss per domain: base, each expert, oracle, uniform merge, Arrow, SpectR."""
    from spectr.runtime.evaluate_lm import lm_losses

    t0 = time.perf_counter()
    try:
        texts = _data(data, data_dir, split, max_docs)
        model, tokenizer = _load(base_model, device, bundle)
        with _steps(None) as step:
            result = lm_losses(model, tokenizer, texts, str(bundle), mapping=_pairs_of(mapping, "--map"),
                               ks=tuple(int(k) for k in ks.split(",") if k), arrow_k=arrow_k, cross=cross,
                               max_tokens=max_tokens, batch_size=batch_size, progress=step)
    except ValueError as exc:
        _fail(exc)
    _grid("mean next-token loss (lower is better)", result["domains"] + ["macro"], result["rows"])
    _write(json_out, result)
    err.print(f"{sum(result['tokens'].values())} predicted tokens per row, {time.perf_counter() - t0:.1f} s")


@eval_app.command("switch")
def switch(
    base_model: Path = BASE,
    bundle: Path = BUNDLE,
    data: list[str] = DATA,
    data_dir: Optional[Path] = DATA_DIR,
    split: str = SPLIT,
    mapping: list[str] = MAP,
    json_out: Optional[Path] = JSON_OUT,
    max_docs: int = typer.Option(64, "--max-docs", help="documents read per domain to fill the segments"),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="A:B,C:D (default: every ordered pair)"),
    routers: str = typer.Option("default", "--presets", "--routers", help="comma-separated presets (runtime/presets.py)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="k of every preset (default: each preset's own)"),
    prefix_tokens: int = typer.Option(64, "--prefix-tokens", help="tokens of domain a before the boundary"),
    suffix_tokens: int = typer.Option(64, "--suffix-tokens", help="tokens of domain b after it"),
    sequences: int = typer.Option(8, "--sequences", help="sequences per pair"),
    threshold: float = typer.Option(0.9, "--threshold", help="switched once the b-fraction >= threshold x pure-b"),
    device: str = DEVICE,
) -> None:
    """Mixed-domain sequences a|b: tokens after the boundary until routing reaches b's expert."""
    from spectr.runtime import load_bundle
    from spectr.runtime.evaluate import switching

    t0 = time.perf_counter()
    try:
        texts = _data(data, data_dir, split, max_docs)
        pair_list = None
        if pairs:
            pair_list = [tuple(p.split(":", 1)) for p in pairs.split(",") if p]
            if any(len(p) != 2 for p in pair_list):
                raise ValueError(f"--pairs {pairs!r}: expected A:B,C:D")
        model, tokenizer = _load(base_model, device, bundle)
        load_bundle(model, bundle)
        names = [r for r in routers.split(",") if r]
        n_pairs = len(pair_list) if pair_list else len(texts) * (len(texts) - 1)
        with _steps(len(names) * n_pairs) as step:
            result = switching(model, tokenizer, texts, mapping=_pairs_of(mapping, "--map"), routers=names,
                               pairs=pair_list, top_k=top_k, prefix_tokens=prefix_tokens,
                               suffix_tokens=suffix_tokens, sequences=sequences, threshold=threshold,
                               progress=step)
    except ValueError as exc:
        _fail(exc)
    for r, res in ((r, v) for r, v in result.items() if r != "definition"):
        table = Table("pair", "latency", "pure-b level", "b at +0", "b at +1", "b at +4", "a before",
                      title=f"{r}: tokens to switch (threshold {res['threshold']} x pure-b)")
        for name, p in res["pairs"].items():
            cb = p["curve_b"]
            table.add_row(name, f">{len(cb) - 1}" if p["censored"] else str(p["latency"]), f"{p['reference']:.3f}",
                          *[f"{cb[j]:.3f}" if j < len(cb) else "" for j in (0, 1, 4)], f"{p['before_a']:.3f}")
        out.print(table)
        out.print(f"{r}: mean latency {res['mean_latency']:.2f} tokens over {len(res['pairs'])} pairs "
                  f"({res['censored']} censored)")
    err.print(result["definition"], soft_wrap=True, markup=False, highlight=False)
    _write(json_out, result)
    err.print(f"{time.perf_counter() - t0:.1f} s")
