"""Names users give: alias names, tag keys and values, bundle names and references (checked before storing)."""
from __future__ import annotations

import re

from spectr.registry.selectors import ALIAS, LATEST, VERSIONISH

_EXPERT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TAG_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,254}$")
_BUNDLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
MAX_TAG_VALUE = 5000


def check_expert_name(name: str) -> str:
    """An expert name: 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit (a hub repo name
    fits), so NAME@VERSION and comma-separated lists can always select it and it is never '.' or '..'."""
    if not isinstance(name, str) or not _EXPERT.match(name):
        raise ValueError(f"expert name {str(name)[:80]!r}: use 1-128 letters, digits, '_', '.' or '-', starting "
                         f"with a letter or digit (rename the adapter folder)")
    return name


def check_alias(alias: str) -> str:
    """An alias name: lowercase letters, digits, '_' and '-', starting with a letter; not a version, not 'latest'."""
    if VERSIONISH.match(alias) or alias == LATEST:
        raise ValueError(f"alias {alias!r} looks like a version; pick a name such as 'prod' or 'champion'")
    if not ALIAS.match(alias):
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
    if not _BUNDLE.match(name) or VERSIONISH.match(name):
        raise ValueError(f"bundle name {name!r}: use letters, digits, '_', '.' or '-' (not only a number)")
    return name


def parse_bundle_ref(text: str) -> tuple[str, int | None]:
    """"demo" (the newest version of bundle demo) or "demo@2"."""
    name, at, ref = text.strip().partition("@")
    if not name or (at and not VERSIONISH.match(ref or "")):
        raise ValueError(f"bundle {text!r}: expected NAME or NAME@VERSION")
    return name, int(ref.lstrip("vV")) if ref else None
