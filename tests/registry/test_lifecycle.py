"""Aliases, tags, selectors, kept files, bundle records and lineage at the Registry level."""
from __future__ import annotations

import multiprocessing as mp
import os
from collections import Counter

import pytest

from spectr.registry import Registry
from spectr.registry.names import check_alias
from spectr.registry.selectors import Selector, parse_selector


@pytest.mark.parametrize("text,want", [
    ("code", Selector("code")),
    ("code@latest", Selector("code")),
    ("code@3", Selector("code", version=3)),
    ("code@v3", Selector("code", version=3)),
    ("code@prod", Selector("code", alias="prod")),
    ("code@champion-2", Selector("code", alias="champion-2")),
])
def test_parse_selector(text, want):
    assert parse_selector(text) == want


@pytest.mark.parametrize("bad", ["", "@3", "code@", "code@Prod!", "code@a b"])
def test_parse_selector_refuses(bad):
    with pytest.raises(ValueError, match="selector"):
        parse_selector(bad)


@pytest.mark.parametrize("alias", ["3", "v3", "V12", "latest"])
def test_alias_must_not_look_like_a_version(alias):
    with pytest.raises(ValueError, match="looks like a version"):
        check_alias(alias)


@pytest.mark.parametrize("alias", ["Prod", "-x", "a" * 65, "pr od"])
def test_alias_charset(alias):
    with pytest.raises(ValueError, match="lowercase"):
        check_alias(alias)


@pytest.fixture()
def three(registry, add):
    for i, c in enumerate("123"):
        add("m", c, seed=i)
    add("other", "9")
    return registry


def test_alias_resolves_like_a_version_and_moves_are_audited(three):
    reg: Registry = three
    assert reg.set_alias("m", "prod", 1, actor="ana") == (None, 1)
    assert reg.resolve("m@prod").version == 1 and reg.get_version("m", 1).aliases == ("prod",)
    assert reg.set_alias("m", "prod", "2", actor="bo") == (1, 2)
    assert reg.set_alias("m", "prod", "2", actor="bo") == (2, 2)  # no move, no audit row
    assert reg.set_alias("m", "staging", "prod", actor="bo") == (None, 2)  # an alias may name another
    assert reg.resolve("m@prod") == reg.resolve("m@2") == reg.resolve("m@staging")
    assert [v.version for v in reg.versions(alias="prod")] == [2]
    history = reg.alias_history("m", "prod")
    assert [(h["from_version"], h["to_version"], h["actor"]) for h in history] == [(None, 1, "ana"), (1, 2, "bo")]
    assert reg.rollback_alias("m", "prod", actor="cy") == (2, 1)
    assert reg.resolve("m@prod").version == 1
    assert reg.remove_alias("m", "prod", actor="cy") == 1
    assert reg.alias_history("m", "prod")[-1]["to_version"] is None
    with pytest.raises(KeyError, match=r"no alias 'prod' \(aliases: staging\)"):
        reg.resolve("m@prod")
    assert [a["alias"] for a in reg.aliases("m")] == ["staging"]


def test_alias_errors_name_what_exists(three):
    reg: Registry = three
    with pytest.raises(KeyError, match=r"no version 7 \(versions: 1, 2, 3\)"):
        reg.set_alias("m", "prod", 7)
    with pytest.raises(KeyError, match="no expert named 'nope'"):
        reg.set_alias("nope", "prod", 1)
    with pytest.raises(ValueError, match="looks like a version"):
        reg.set_alias("m", "v2", 1)
    with pytest.raises(KeyError, match="no alias 'prod'"):
        reg.remove_alias("m", "prod")
    assert reg.aliases() == [] and reg.alias_history("m") == []


def test_tags_on_experts_and_versions(three):
    reg: Registry = three
    reg.set_tag("m", "team", "search")
    reg.set_tag("m@2", "reviewed", "yes")
    reg.set_alias("m", "prod", 3)
    reg.set_tag("m@prod", "team", "infra")  # the version's own tag wins over the expert's
    assert reg.get_version("m", 1).tags == {"team": "search"}
    assert reg.get_version("m", 2).tags == {"team": "search", "reviewed": "yes"}
    assert reg.get_version("m", 3).tags == {"team": "infra"}
    assert [v.version for v in reg.versions(tag="reviewed")] == [2]
    assert [(v.name, v.version) for v in reg.versions(tag="team=search")] == [("m", 1), ("m", 2)]
    assert [v.version for v in reg.versions("m", tag={"team": "infra"})] == [3]
    reg.set_tag("m@2", "reviewed", "no")
    assert reg.get_version("m", 2).tags["reviewed"] == "no"
    reg.remove_tag("m@2", "reviewed")
    assert "reviewed" not in reg.get_version("m", 2).tags
    with pytest.raises(KeyError, match="no tag 'reviewed'"):
        reg.remove_tag("m@2", "reviewed")
    with pytest.raises(ValueError, match="tag key"):
        reg.set_tag("m", "bad key", "x")


def _mover(url: str, blobs: str, versions: list[int], start, out) -> None:
    reg = Registry(url, blobs, migrate=False)
    start.wait()
    moves = [reg.set_alias("m", "prod", v, actor=f"p{os.getpid()}") for v in versions]
    reg.close()
    out.put(moves)


def _race(url: str, blobs: str) -> None:
    """Two processes move one alias 40 times each; the audit log must be one unbroken chain."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    plans = [[1, 2] * 20, [3, 1] * 20]
    procs = [ctx.Process(target=_mover, args=(url, blobs, plan, start, out)) for plan in plans]
    for p in procs:
        p.start()
    start.set()
    moves = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    reg = Registry(url, blobs, migrate=False)
    try:
        history = reg.alias_history("m", "prod")
        chain = [(h["from_version"], h["to_version"]) for h in history]
        assert chain[0][0] is None
        for prev, cur in zip(chain, chain[1:]):
            assert cur[0] == prev[1], f"audit chain broken: {prev} then {cur}"
        reported = Counter(m for ms in moves for m in ms if m[0] != m[1])
        assert Counter(chain) == reported  # every move a writer saw committed is in the log, exactly once
        assert reg.resolve("m@prod").version == chain[-1][1]
    finally:
        reg.close()


def test_alias_moves_are_atomic_under_two_processes_sqlite(three):
    _race(three.url, three.blobs.url)


@pytest.mark.postgres
def test_alias_moves_are_atomic_under_two_processes_postgres(tmp_path):
    from spectr.registry import db
    from tests.registry.conftest import loaded, spectra_bytes

    url = os.environ.get("SPECTR_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("SPECTR_TEST_POSTGRES_URL is not set")
    db.upgrade(url)
    reg = Registry(url, str(tmp_path / "blobs"), migrate=False)
    try:
        data = spectra_bytes(0)
        blob = reg.blobs.put(data)
        for c in "123":
            reg.add_version(loaded("m", c), blob, method="exact", params={}, energy=1.0, n_modules=1,
                            size_bytes=len(data))
        _race(url, reg.blobs.url)
    finally:
        reg.close()
        db.downgrade(url, "base")


def test_kept_files_export_and_spectra_only(registry, add, tmp_path):
    cfg, weights = b'{"r": 4}', b"\x00weights\x01"
    files = {"adapter_config.json": (registry.blobs.put(cfg), len(cfg)),
             "adapter_model.safetensors": (registry.blobs.put(weights), len(weights))}
    add("bare", "1")  # as --spectra-only leaves it
    assert registry.get_version("bare").files == ()
    with pytest.raises(ValueError, match="--spectra-only"):
        registry.export_adapter("bare", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    v, created = add("bare", "1", files=files)  # the same content again, now with its files: attached
    assert not created and v.version == 1
    assert registry.get_version("bare").files == ("adapter_config.json", "adapter_model.safetensors")
    out = registry.export_adapter("bare@1", tmp_path / "x")
    assert (out / "adapter_config.json").read_bytes() == cfg
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    with pytest.raises(ValueError, match="not an empty folder"):
        registry.export_adapter("bare", tmp_path / "x")
    # Two experts with the same weights share one blob.
    add("twin", "2", files=files)
    assert registry.adapter_files("twin") == registry.adapter_files("bare")


def test_bundle_records_version_by_content_and_lineage_lists_them(three):
    reg: Registry = three
    v1, v2 = reg.get_version("m", 1), reg.get_version("m", 2)
    kw = dict(base_model=v1.base_model, router={"top_k": 1}, spectra_sha256="a" * 64)
    b1, new1 = reg.record_bundle("demo", experts=[(v1, "m@prod")], manifest=b"one", **kw)
    again, new_again = reg.record_bundle("demo", experts=[(v1, "m@prod")], manifest=b"one", **kw)
    b2, new2 = reg.record_bundle("demo", experts=[(v2, "m@prod")], manifest=b"two", **kw)
    assert (new1, new_again, new2) == (True, False, True) and again == b1
    assert (b1.version, b2.version) == (1, 2) and reg.get_bundle("demo") == b2 and reg.get_bundle("demo", 1) == b1
    assert b1.experts[0]["selector"] == "m@prod" and b1.experts[0]["version"] == 1
    assert reg.blobs.get(b1.manifest_sha256) == b"one"
    assert [row["bundles"] for row in reg.lineage("m@1")] == [["demo@1"]]
    with pytest.raises(KeyError, match=r"no version 9 \(versions: 1, 2\)"):
        reg.get_bundle("demo", 9)
    with pytest.raises(KeyError, match=r"bundles: demo"):
        reg.get_bundle("nope")
    with pytest.raises(ValueError, match="bundle name"):
        reg.record_bundle("42", experts=[(v1, "m")], manifest=b"x", **kw)
