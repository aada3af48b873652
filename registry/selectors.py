"""Expert selectors: "name" (the latest version), "name@3" / "name@v3" (a version), "name@prod" (an alias)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the store imports this module; select_versions only needs the Registry's methods
    from spectr.registry.store import Registry, VersionInfo

# The alias grammar lives here because a selector must tell an alias from a version ("3", "v3").
ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
VERSIONISH = re.compile(r"^v?\d+$", re.IGNORECASE)
LATEST = "latest"


@dataclass(frozen=True)
class Selector:
    """What NAME[@VERSION|@ALIAS] asks for: a pinned version, an alias, or (neither) the latest."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


def parse_selector(text: str) -> Selector:
    """"name" (latest), "name@3" or "name@v3" (a version), "name@prod" (an alias), "name@latest"."""
    name, at, ref = text.strip().partition("@")
    if not name or (at and not ref):
        raise ValueError(f"expert selector {text!r}: expected NAME, NAME@VERSION or NAME@ALIAS")
    if not ref or ref == LATEST:
        return Selector(name)
    if VERSIONISH.match(ref):
        return Selector(name, version=int(ref.lstrip("vV")))
    if not ALIAS.match(ref):
        raise ValueError(f"expert selector {text!r}: {ref!r} is neither a version number nor an alias name")
    return Selector(name, alias=ref)


def select_versions(registry: Registry, selectors: list[str] | None) -> list[VersionInfo]:
    """The versions named (NAME, NAME@3, NAME@ALIAS); None means the latest version of every expert."""
    if selectors is None:
        latest: dict[str, VersionInfo] = {}
        for v in registry.versions():
            latest[v.name] = v
        return [latest[n] for n in sorted(latest)]
    return [registry.resolve(s) for s in selectors]
