"""Names users type: expert selectors (NAME, NAME@3, NAME@ALIAS), alias names, tag keys, bundle names."""
from __future__ import annotations

import re
from dataclasses import dataclass

# An alias must not look like a version ("3", "v3") and "latest" means the newest version, so neither can be set.
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_VERSIONISH = re.compile(r"^v?\d+$", re.IGNORECASE)
_TAG_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,254}$")
_BUNDLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
LATEST = "latest"
MAX_TAG_VALUE = 5000


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
    if _VERSIONISH.match(ref):
        return Selector(name, version=int(ref.lstrip("vV")))
    if not _ALIAS.match(ref):
        raise ValueError(f"expert selector {text!r}: {ref!r} is neither a version number nor an alias name")
    return Selector(name, alias=ref)


def check_alias(alias: str) -> str:
    """An alias name: lowercase letters, digits, '_' and '-', starting with a letter; not a version, not 'latest'."""
    if _VERSIONISH.match(alias) or alias == LATEST:
        raise ValueError(f"alias {alias!r} looks like a version; pick a name such as 'prod' or 'champion'")
    if not _ALIAS.match(alias):
        raise ValueError(
            f"alias {alias!r}: use 1-64 lowercase letters, digits, '_' or '-', starting with a letter"
        )
    return alias


def check_tag(key: str, value: str | None = None) -> str:
    if not _TAG_KEY.match(key):
        raise ValueError(f"tag key {key!r}: use 1-255 letters, digits and '_ . : / -'")
    if value is not None and len(value) > MAX_TAG_VALUE:
        raise ValueError(f"tag {key!r}: value of {len(value)} characters exceeds {MAX_TAG_VALUE}")
    return key


def check_bundle_name(name: str) -> str:
    if not _BUNDLE.match(name) or _VERSIONISH.match(name):
        raise ValueError(f"bundle name {name!r}: use letters, digits, '_', '.' or '-' (not only a number)")
    return name


def parse_bundle_ref(text: str) -> tuple[str, int | None]:
    """"demo" (the newest version of bundle demo) or "demo@2"."""
    name, at, ref = text.strip().partition("@")
    if not name or (at and not _VERSIONISH.match(ref or "")):
        raise ValueError(f"bundle {text!r}: expected NAME or NAME@VERSION")
    return name, int(ref.lstrip("vV")) if ref else None
