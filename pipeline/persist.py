"""The persist stage: spectra -> a content-addressed blob, then an immutable registry version."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spectr.pipeline.types import AdapterError, LoadedAdapter
from spectr.pipeline.files import CONFIG_FILE, WEIGHTS_FILE, content_sha256_of
from spectr.registry.spectra_format import spectra_to_bytes
from spectr.runtime.spectrum import AdapterSpectra

if TYPE_CHECKING:  # the registry's store imports SQLAlchemy; keep it out of plain pipeline imports
    from spectr.registry.blobs import BlobStore
    from spectr.registry.store import Registry, VersionInfo


@dataclass(frozen=True)
class SpectraBlob:
    """What the registry needs to know about a written spectra blob (JSON-serialisable)."""

    blob_sha256: str
    size_bytes: int
    method: str
    params: dict
    energy: float
    n_modules: int

    def to_dict(self) -> dict:
        return asdict(self)


def write_spectra_blob(blobs: BlobStore, adapter: LoadedAdapter, spectra: AdapterSpectra) -> SpectraBlob:
    """Serialise deterministically and put the blob (atomic, content-addressed) before any row exists."""
    data = spectra_to_bytes(
        spectra,
        metadata={"content_sha256": adapter.content_sha256},
    )
    sha = blobs.put(data)
    return SpectraBlob(
        blob_sha256=sha,
        size_bytes=len(data),
        method=spectra.method,
        params=dict(spectra.params),
        energy=float(spectra.energy),
        n_modules=len(spectra.modules),
    )


def write_adapter_blobs(blobs: BlobStore, folder: Path, content_sha256: str) -> dict[str, tuple[str, int]]:
    """Keep the original adapter_config.json and adapter_model.safetensors as blobs: filename -> (sha256, size).

    The bytes are read once and must hash to the content hash that validation computed, so what is kept is
    exactly what was validated."""
    data = {name: (Path(folder) / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    if content_sha256_of(data[CONFIG_FILE], data[WEIGHTS_FILE]) != content_sha256:
        raise AdapterError(f"{folder}: the adapter changed while it was being ingested; ingest it again")
    return {name: (blobs.put(b), len(b)) for name, b in data.items()}


def store_version(
    registry: Registry,
    adapter: LoadedAdapter,
    blob: SpectraBlob,
    run_id: str | None = None,
    files: dict[str, tuple[str, int]] | None = None,
) -> tuple[VersionInfo, bool]:
    """Commit the version row that points at existing blobs; identical content is a no-op (kept files that
    the stored version lacks are attached)."""
    registry.ensure_base_model(adapter.base)
    return registry.add_version(
        adapter,
        blob.blob_sha256,
        method=blob.method,
        params=blob.params,
        energy=blob.energy,
        n_modules=blob.n_modules,
        size_bytes=blob.size_bytes,
        run_id=run_id,
        files=files,
    )


def store_versions(
    registry: Registry,
    items: list[tuple[LoadedAdapter, SpectraBlob, str | None, dict[str, tuple[str, int]] | None]],
) -> list[tuple[VersionInfo, bool]]:
    """store_version for several (adapter, blob, run_id, files), in this order, in one transaction: the
    distributed ingest's single writer commits a returned batch at once, not an adapter at a time."""
    return registry.add_versions([dict(
        adapter=adapter, blob=blob.blob_sha256, method=blob.method, params=blob.params, energy=blob.energy,
        n_modules=blob.n_modules, size_bytes=blob.size_bytes, run_id=run_id, files=files)
        for adapter, blob, run_id, files in items])
