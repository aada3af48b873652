"""Router presets: one set of names for the runtime, the CLI and evaluation (runtime/presets.py)."""
from __future__ import annotations

import pytest

from spectr.runtime import PEFT_ARROW, REFERENCE, RouterConfig, load_bundle, set_router
from spectr.runtime.presets import PRESETS, ROUTING_FIELDS, parse_preset, preset_settings
from tests.conftest import build_tiny_llama
from tests.runtime.helpers import bundle_from_adapters


@pytest.fixture(scope="module")
def bundle_dir(make_adapter, tmp_path_factory):
    folders = [make_adapter(n, seed=60 + i) for i, n in enumerate(("p1", "p2", "p3"))]
    return bundle_from_adapters(tmp_path_factory.mktemp("presets") / "b", folders, build_tiny_llama())


def test_every_preset_fixes_every_routing_setting():
    for name, settings in PRESETS.items():
        assert set(settings) == set(ROUTING_FIELDS), name
    assert PRESETS["default"] == {f: getattr(RouterConfig(), f) for f in ROUTING_FIELDS}
    assert {k: PRESETS["reference"][k] for k in REFERENCE} == REFERENCE
    assert (REFERENCE["top_k"], REFERENCE["combine"], PEFT_ARROW["router"]) == (4, "factor", "arrow")


def test_load_bundle_preset_and_overrides(bundle_dir):
    model = load_bundle(build_tiny_llama(), bundle_dir)
    cfg = model.spectr.config
    assert (cfg.router, cfg.top_k, cfg.pool, cfg.combine) == ("spectr", 1, "input", "mix")  # the default
    ref = load_bundle(build_tiny_llama(), bundle_dir, "reference", weighting="softmax").spectr.config
    assert (ref.top_k, ref.combine, ref.pool, ref.weighting) == (3, "factor", "module", "softmax")  # k=4 clipped to E=3
    # Switching presets never leaks a setting from the previous one.
    set_router(model, preset="reference-sigma")
    set_router(model, preset="peft-arrow", top_k=2)
    assert (cfg.router, cfg.score, cfg.top_k, cfg.pool) == ("arrow", "norm", 2, "module")
    fixed = load_bundle(build_tiny_llama(), bundle_dir, "fixed", expert="p2").spectr.config
    assert (fixed.router, fixed.expert) == ("fixed", 1)


def test_preset_mistakes_name_what_exists():
    with pytest.raises(ValueError, match="unknown preset 'spectr'; expected one of default, reference"):
        preset_settings("spectr")
    with pytest.raises(ValueError, match="unknown router setting 'topk'"):
        preset_settings("default", topk=2)
    with pytest.raises(ValueError, match="top_k must be >= 1, got -3"):  # k above E is clipped, below 1 refused
        preset_settings("reference", 8, top_k=-3)
    assert preset_settings("reference", 2)["top_k"] == 2
    assert parse_preset("fixed:code") == ("fixed", "code") and parse_preset("peft-arrow") == ("peft-arrow", None)
    with pytest.raises(ValueError, match="fixed:NAME"):
        parse_preset("fixed")
