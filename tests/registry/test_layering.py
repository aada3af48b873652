"""The registry stores; it imports nothing from the pipeline or the flows (arrows point down)."""
from __future__ import annotations

from tests.layers import forbidden_imports, loaded_after_import

UPPER = ("spectr.pipeline", "spectr.flows", "prefect")


def test_registry_source_imports_no_pipeline_or_flows():
    assert forbidden_imports("registry", UPPER) == []


def test_registry_modules_load_no_pipeline_or_flows():
    assert loaded_after_import("spectr.registry", UPPER) == []


def test_the_layer_checks_can_fail():
    # The same checks on the flows package do see its imports of the pipeline.
    assert any("spectr.pipeline" in hit for hit in forbidden_imports("flows", UPPER))
    assert "spectr.pipeline" in loaded_after_import("spectr.flows", UPPER)
