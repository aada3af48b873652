"""Export a chosen expert set from the registry as a runtime bundle (spectra.safetensors + manifest.json)."""
from __future__ import annotations

from pathlib import Path

from spectr.registry.store import Registry, VersionInfo


def parse_selector(selector: str) -> tuple[str, int | None]:
    """"name" (latest version) or "name@3"."""
    name, _, version = selector.strip().partition("@")
    if not name or (version and not version.isdigit()):
        raise ValueError(f"expert selector {selector!r}: expected NAME or NAME@VERSION")
    return name, int(version) if version else None


def select_versions(registry: Registry, selectors: list[str] | None) -> list[VersionInfo]:
    """The versions named (latest unless pinned); None means the latest version of every expert."""
    if selectors is None:
        latest: dict[str, VersionInfo] = {}
        for v in registry.versions():
            latest[v.name] = v
        return [latest[n] for n in sorted(latest)]
    return [registry.get_version(*parse_selector(s)) for s in selectors]


def create_bundle(registry: Registry, selectors: list[str] | None, out: Path, name: str | None = None) -> Path:
    """Write the bundle folder `out`; all experts must share one base model. Returns out."""
    from spectr.pipeline.basemodel import base_model_from_config
    from spectr.pipeline.blob import spectra_from_bytes
    from spectr.runtime.bundle import write_bundle

    versions = select_versions(registry, selectors)
    if not versions:
        raise ValueError(f"no experts in the registry {registry.url} to bundle")
    bases = sorted({v.base_model for v in versions})
    if len(bases) != 1:
        raise ValueError(f"bundle {out}: experts have different base models: {bases}")
    stored = registry.base_model_config(bases[0])
    if stored is None:
        raise ValueError(f"bundle {out}: base model {bases[0]!r} is not registered")
    base = base_model_from_config(stored[1], stored[0])
    experts = []
    for v in versions:
        info = {
            "name": v.name, "version": v.version, "content_sha256": v.content_sha256,
            "blob_sha256": v.blob_sha256, "rank": v.rank, "alpha": v.alpha, "method": v.method,
            "source": v.source, "revision": v.revision,
        }
        experts.append((info, spectra_from_bytes(registry.blobs.get(v.blob_sha256))))
    return write_bundle(Path(out), base=base.manifest(), experts=experts)
