"""The README's Python snippet runs as written, on a tiny saved model and bundle (only the two paths change)."""
from __future__ import annotations

import re
from pathlib import Path

from tests.cli.test_eval_cli import setup  # noqa: F401  (a saved tiny model with a tokenizer, and a bundle)

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippet() -> str:
    text = README.read_text()
    section = text[text.index("### Python: `runtime`"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_snippet_runs(setup, tmp_path, monkeypatch):  # noqa: F811
    code = python_snippet()
    assert '"path/to/base"' in code and '"path/to/bundle"' in code
    code = code.replace('"path/to/base"', repr(str(setup["base"]))).replace('"path/to/bundle"', repr(str(setup["bundle"])))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert (tmp_path / "routes.png").read_bytes()[:4] == b"\x89PNG"
    model = scope["model"]
    assert not hasattr(model, "spectr")  # unloaded at the end
    assert scope["out"].shape[1] > scope["input_ids"].shape[1]


def test_readme_registry_snippet_runs(spectr_home, make_adapter, tiny_base_dir, tmp_path, monkeypatch):
    """The registry snippet, as written, against a registry holding code_python v1 and v2."""
    import shutil

    from spectr.pipeline.ingest import ingest_sources

    folder = tmp_path / "code_python"
    for seed in (51, 52):  # the same name retrained: versions 1 and 2
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(make_adapter(f"readme-cp-{seed}", seed=seed), folder)
        assert ingest_sources([str(folder)], base_model=str(tiny_base_dir))[0].status == "new"
    text = README.read_text()
    section = text[text.index("### Python: the registry"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert [(v.name, v.version) for v in scope["reviewed"]] == [("code_python", 1)]
    assert (tmp_path / "out" / "code_python" / "adapter_model.safetensors").read_bytes() == (
        folder / "adapter_model.safetensors").read_bytes()
    assert scope["lineage"][0]["version"] == 2 and scope["bundles"] == []
