"""`spectr doctor`: the registry's rows checked against its blobs, and the debris of crashes found (and, with
fix=True, repaired where that is safe: temp files and orphan blobs past a grace period, runs of dead processes).
A missing or corrupt blob that a row needs is only reported: nothing can rebuild it here (re-ingest the source)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from sqlalchemy import select

from spectr.registry.blobs import BlobError
from spectr.registry.models import AdapterFile, BundleRecord, Spectra
from spectr.registry.store import Registry

GRACE_S = 3600.0  # a blob or temp file younger than this may belong to a write in progress


@dataclass(frozen=True)
class Finding:
    kind: str  # missing-blob | corrupt-blob | orphan-blob | temp-file | crashed-run
    what: str
    fixed: bool = False

    def line(self) -> str:
        return f"{'fixed' if self.fixed else 'problem'}: {self.kind}: {self.what}"


def _referenced(reg: Registry) -> dict[str, str]:
    """blob sha256 -> the first row that needs it."""
    need: dict[str, str] = {}
    with reg.engine.connect() as c:
        for sha, vid in c.execute(select(Spectra.blob_sha256, Spectra.version_id)):
            need.setdefault(sha, f"spectra of version id {vid}")
        for sha, name in c.execute(select(AdapterFile.blob_sha256, AdapterFile.filename)):
            need.setdefault(sha, f"kept adapter file {name}")
        for sha, name, ver in c.execute(select(BundleRecord.manifest_sha256, BundleRecord.name,
                                               BundleRecord.version)):
            need.setdefault(sha, f"manifest of bundle {name}@{ver}")
    return need


def _age_s(reg: Registry, sha: str) -> float:
    try:
        return time.time() - os.path.getmtime(reg.blobs.path(sha))
    except OSError:  # a remote store: age unknown, treated as old
        return float("inf")


def examine(reg: Registry, fix: bool = False, grace_s: float = GRACE_S) -> list[Finding]:
    findings: list[Finding] = []
    need = _referenced(reg)
    for sha, row in sorted(need.items()):
        try:
            reg.blobs.get(sha)  # reads and verifies the hash
        except BlobError as e:
            kind = "missing-blob" if "missing" in str(e) else "corrupt-blob"
            findings.append(Finding(kind, f"{sha[:12]} ({row}): {e}; re-ingest its source"))
    for sha in reg.blobs.shas():
        if sha not in need and _age_s(reg, sha) > grace_s:
            if fix:
                reg.blobs.delete(sha)
            findings.append(Finding("orphan-blob", f"{reg.blobs.path(sha)} is referenced by no row", fix))
    if fix:
        findings += [Finding("temp-file", f"{p} (a write that died)", True) for p in reg.blobs.sweep_temp(grace_s)]
        findings += [Finding("crashed-run", f"ingestion run {r} (its process is gone) marked crashed", True)
                     for r in reg.mark_crashed_runs()]
    else:
        findings += [Finding("temp-file", f"{p} (a write that died)") for p in reg.blobs.stale_temp_files(grace_s)]
        findings += [Finding("crashed-run", f"ingestion run {r} is 'running' but its process is gone")
                     for r in reg.crashed_runs()]
    return findings
