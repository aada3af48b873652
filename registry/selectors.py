"""Which versions an expert selector names: "name" (the latest version) or "name@3"."""
from __future__ import annotations

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
