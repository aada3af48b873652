"""Export a chosen expert set from the registry as a runtime bundle (the runtime owns the bundle format)."""
from __future__ import annotations

from pathlib import Path

from spectr.pipeline.basemodel import base_model_from_config
from spectr.registry.selectors import select_versions
from spectr.registry.spectra_format import spectra_from_bytes
from spectr.registry.store import Registry
from spectr.runtime.bundle import write_bundle


def create_bundle(registry: Registry, selectors: list[str] | None, out: Path, name: str | None = None) -> Path:
    """Write the bundle folder `out`; all experts must share one base model. Returns out."""
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
