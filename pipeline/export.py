"""Bundles from the registry (the runtime owns the bundle format): create (resolve, render, record, write)
and re-export a recorded bundle byte-identically."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from spectr.pipeline.basemodel import base_model_from_config
from spectr.registry.selectors import select_versions
from spectr.registry.spectra_format import spectra_from_bytes
from spectr.registry.store import BundleInfo, Registry, VersionInfo
from spectr.runtime.bundle import MANIFEST, SPECTRA, bundle_files
from spectr.runtime.layer import RouterConfig
from spectr.runtime.presets import DEFAULT_PRESET, preset_settings


def _render(registry: Registry, versions: list[VersionInfo], router: dict[str, Any], where: str) -> tuple[str, dict[str, bytes]]:
    """(base model name, {filename: bytes}) of the bundle of these versions, in this order."""
    if not versions:
        raise ValueError(f"no experts in the registry {registry.url} to bundle")
    bases = sorted({v.base_model for v in versions})
    if len(bases) != 1:
        raise ValueError(f"{where}: experts have different base models: {bases}")
    stored = registry.base_model_config(bases[0])
    if stored is None:
        raise ValueError(f"{where}: base model {bases[0]!r} is not registered")
    base = base_model_from_config(stored[1], stored[0])
    experts = []
    for v in versions:
        info = {
            "name": v.name, "version": v.version, "content_sha256": v.content_sha256,
            "blob_sha256": v.blob_sha256, "rank": v.rank, "alpha": v.alpha, "method": v.method,
            "source": v.source, "revision": v.revision,
        }
        experts.append((info, spectra_from_bytes(registry.blobs.get(v.blob_sha256))))
    return stored[0], bundle_files(base=base.manifest(), experts=experts, router=router or None, where=where)


def check_router(router: dict[str, Any] | None) -> dict[str, Any]:
    """Router defaults a bundle records: an optional "preset" (runtime/presets.py) plus RouterConfig fields,
    checked by the runtime's own validation."""
    router = dict(router or {})
    overrides = {k: v for k, v in router.items() if k != "preset"}
    settings = preset_settings(router.get("preset", DEFAULT_PRESET), **overrides)
    RouterConfig(**settings).validate()
    return router


def create_bundle(
    registry: Registry,
    selectors: list[str] | None,
    out: Path | None,
    name: str | None = None,
    router: dict[str, Any] | None = None,
) -> Path | None:
    """Resolve the selectors (aliases included), write the bundle folder `out` (when given) and, when `name`
    is given, record the bundle in the registry. All experts must share one base model. Returns out."""
    router = check_router(router)
    versions = select_versions(registry, selectors)
    where = f"bundle {out}" if out is not None else f"bundle {name}"
    base_name, files = _render(registry, versions, router, where)
    if name is not None:
        typed = selectors if selectors is not None else [v.name for v in versions]
        registry.record_bundle(
            name, base_model=base_name, router=router, experts=list(zip(versions, typed)),
            spectra_sha256=_sha(files[SPECTRA]), manifest=files[MANIFEST],
        )
    return _write(out, files) if out is not None else None


def export_bundle(registry: Registry, name: str, version: int | None, out: Path) -> tuple[BundleInfo, Path]:
    """Write a recorded bundle again, byte-identical to when it was created (both files' hashes are checked)."""
    rec = registry.get_bundle(name, version)
    versions = [registry.resolve(f"{e['name']}@{e['version']}") for e in rec.experts]
    _, files = _render(registry, versions, rec.router, f"bundle {rec.name}@{rec.version}")
    got = (_sha(files[SPECTRA]), _sha(files[MANIFEST]))
    if got != (rec.spectra_sha256, rec.manifest_sha256):
        raise ValueError(
            f"bundle {rec.name}@{rec.version}: rebuilt files hash to spectra {got[0][:12]} / manifest {got[1][:12]}, "
            f"recorded {rec.spectra_sha256[:12]} / {rec.manifest_sha256[:12]}: this spectr writes bundles "
            f"differently from the one that recorded it"
        )
    return rec, _write(out, files)


def _write(out: Path, files: dict[str, bytes]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for filename in (SPECTRA, MANIFEST):  # the manifest last: it names the spectra file's hash
        tmp = out / f".{filename}.tmp"
        tmp.write_bytes(files[filename])
        os.replace(tmp, out / filename)
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
