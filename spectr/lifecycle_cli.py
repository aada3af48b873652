"""Registry lifecycle verbs: export, alias, tag, lineage, and bundle list/show/export."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from spectr.errors import fail

alias_app = typer.Typer(help="Movable names for expert versions (NAME@ALIAS works wherever NAME@VERSION does).",
                        no_args_is_help=True)
tag_app = typer.Typer(help="Key/value tags on experts (NAME) or versions (NAME@V, NAME@ALIAS).", no_args_is_help=True)

# Names and values come from users and the registry: printed literally, never as rich markup.
out = Console(markup=False)


@contextmanager
def _user_errors() -> Iterator[None]:
    """A mistake (unknown name, version or alias; a bad name; a blob gone or corrupt) is one line, exit 1
    (a traceback with --debug), through the CLI's one error path."""
    from spectr.registry.blobs import BlobError

    try:
        yield
    except (KeyError, ValueError, BlobError) as exc:
        fail(exc)


def _registry():
    from spectr.registry.store import Registry

    return Registry()


def _print_json(obj) -> None:
    print(json.dumps(obj, default=str, indent=1))


def _table(columns: list[str], rows: list[list], title: str | None = None) -> None:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    out.print(table)


# -- alias ---------------------------------------------------------------------------------------
@alias_app.command("set")
def alias_set(
    name: str = typer.Argument(..., help="expert name"),
    alias: str = typer.Argument(..., help="alias, e.g. prod (not a number, not 'latest')"),
    version: str = typer.Argument(..., help="version number, or another alias of the same expert"),
) -> None:
    """Point ALIAS at VERSION (one transaction, recorded with who/when/from/to)."""
    with _user_errors():
        old, new = _registry().set_alias(name, alias, version)
    moved = "unchanged" if old == new else (f"v{old} -> v{new}" if old else f"-> v{new}")
    out.print(f"{name}@{alias} {moved}")


@alias_app.command("rm")
def alias_rm(name: str = typer.Argument(...), alias: str = typer.Argument(...)) -> None:
    """Remove an alias (recorded, so it can be audited)."""
    with _user_errors():
        old = _registry().remove_alias(name, alias)
    out.print(f"{name}@{alias} removed (was v{old})")


@alias_app.command("list")
def alias_list(
    name: Optional[str] = typer.Argument(None, help="only this expert's aliases"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Current aliases."""
    with _user_errors():
        rows = _registry().aliases(name)
    if as_json:
        return _print_json(rows)
    cols = ["name", "alias", "version", "updated_at", "updated_by"]
    _table(cols, [[r[c] for c in cols] for r in rows], title=f"{len(rows)} aliases")


@alias_app.command("history")
def alias_history(
    name: str = typer.Argument(...),
    alias: Optional[str] = typer.Argument(None),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Every move of an expert's aliases, oldest first (from/to: None when created/removed)."""
    with _user_errors():
        reg = _registry()
        reg.resolve(name)  # unknown expert: one line
        rows = reg.alias_history(name, alias)
    if as_json:
        return _print_json(rows)
    cols = ["alias", "from_version", "to_version", "actor", "at"]
    _table(cols, [[r[c] for c in cols] for r in rows], title=f"{name}: {len(rows)} alias moves")


@alias_app.command("rollback")
def alias_rollback(name: str = typer.Argument(...), alias: str = typer.Argument(...)) -> None:
    """Move ALIAS back to where its latest move took it from."""
    with _user_errors():
        old, new = _registry().rollback_alias(name, alias)
    out.print(f"{name}@{alias} v{old} -> v{new}")


# -- tag -----------------------------------------------------------------------------------------
@tag_app.command("set")
def tag_set(
    target: str = typer.Argument(..., help="NAME (the expert) or NAME@V / NAME@ALIAS (one version)"),
    key: str = typer.Argument(...),
    value: str = typer.Argument(...),
) -> None:
    """Set a tag (replaces the key's value)."""
    with _user_errors():
        _registry().set_tag(target, key, value)
    out.print(f"{target} {key}={value}")


@tag_app.command("rm")
def tag_rm(target: str = typer.Argument(...), key: str = typer.Argument(...)) -> None:
    """Remove a tag."""
    with _user_errors():
        _registry().remove_tag(target, key)
    out.print(f"{target} {key} removed")


@tag_app.command("list")
def tag_list(
    target: str = typer.Argument(..., help="NAME (latest version) or NAME@V / NAME@ALIAS"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A version's tags: its expert's, then its own (which win)."""
    with _user_errors():
        v = _registry().resolve(target)
    if as_json:
        return _print_json(v.tags)
    _table(["key", "value"], [[k, val] for k, val in sorted(v.tags.items())], title=f"{v.name} v{v.version}")


# -- export, lineage, bundles ----------------------------------------------------------------------
def export(
    selector: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME@ALIAS"),
    output: Path = typer.Option(..., "-o", "--output", help="a new (or empty) folder for the PEFT adapter"),
) -> None:
    """Write the ingested PEFT adapter, byte-identical (PeftModel.from_pretrained loads the folder)."""
    with _user_errors():
        reg = _registry()
        v = reg.resolve(selector)
        path = reg.export_adapter(f"{v.name}@{v.version}", output)
    out.print(f"{v.name} v{v.version} -> {path}")


def lineage(
    selector: Optional[str] = typer.Argument(None, help="NAME, NAME@V or NAME@ALIAS (default: every version)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Where each version came from (folder, or hub repo + commit), its ingestion run, SVD, and bundles."""
    with _user_errors():
        rows = _registry().lineage(selector)
    if as_json:
        return _print_json(rows)
    cols = ["name", "version", "source_kind", "source", "commit", "flow_run_id", "svd_method", "bundles"]
    _table(cols, [[", ".join(r[c]) if c == "bundles" else r[c] for c in cols] for r in rows])


def bundle_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Recorded bundles, every version."""
    with _user_errors():
        rows = [_bundle_dict(b) for b in _registry().bundles()]
    if as_json:
        return _print_json(rows)
    cols = ["name", "version", "base_model", "experts", "spectra_sha256", "created_at", "created_by"]
    _table(cols, [[", ".join(r[c]) if c == "experts" else (r[c][:12] if c == "spectra_sha256" else r[c])
                   for c in cols] for r in rows], title=f"{len(rows)} bundle versions")


def bundle_show(
    ref: str = typer.Argument(..., help="NAME (newest version) or NAME@VERSION"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One recorded bundle: its experts' resolved versions and hashes, router defaults, file hashes."""
    from spectr.registry.names import parse_bundle_ref

    with _user_errors():
        b = _registry().get_bundle(*parse_bundle_ref(ref))
    d = _bundle_dict(b, full=True)
    if as_json:
        return _print_json(d)
    out.print(f"bundle {b.name}@{b.version}  base {b.base_model}  router {json.dumps(b.router)}")
    out.print(f"spectra sha256 {b.spectra_sha256}  manifest sha256 {b.manifest_sha256}")
    out.print(f"created {b.created_at.isoformat()} by {b.created_by}")
    cols = ["name", "version", "selector", "content_sha256", "spectra_blob_sha256"]
    _table(cols, [[e[c] for c in cols] for e in b.experts])


def bundle_export(
    ref: str = typer.Argument(..., help="NAME (newest version) or NAME@VERSION"),
    output: Path = typer.Option(..., "-o", "--output", help="bundle folder to write"),
) -> None:
    """Write a recorded bundle again, byte-identical to when it was created."""
    from spectr.pipeline.export import export_bundle
    from spectr.registry.names import parse_bundle_ref

    with _user_errors():
        rec, path = export_bundle(_registry(), *parse_bundle_ref(ref), Path(output))
    out.print(f"bundle {rec.name}@{rec.version} -> {path} (spectra sha256 {rec.spectra_sha256[:12]})")


def _bundle_dict(b, full: bool = False) -> dict:
    d = {"name": b.name, "version": b.version, "base_model": b.base_model, "router": b.router,
         "spectra_sha256": b.spectra_sha256, "manifest_sha256": b.manifest_sha256,
         "created_at": b.created_at.isoformat(), "created_by": b.created_by,
         "experts": [f"{e['name']}@{e['version']}" for e in b.experts]}
    if full:
        d["experts"] = [dict(e) for e in b.experts]
    return d


def register(app: typer.Typer, bundle_app: typer.Typer) -> None:
    """Add these verbs to the `spectr` command."""
    app.add_typer(alias_app, name="alias")
    app.add_typer(tag_app, name="tag")
    app.command()(export)
    app.command()(lineage)
    bundle_app.command("list")(bundle_list)
    bundle_app.command("show")(bundle_show)
    bundle_app.command("export")(bundle_export)
