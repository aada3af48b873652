"""The README's Python snippet runs as written, on a tiny saved model and bundle (only the two paths change)."""
from __future__ import annotations

import re
from pathlib import Path

from tests.cli.test_eval_cli import setup  # noqa: F401  (a saved tiny model with a tokenizer, and a bundle)

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippet() -> str:
    text = README.read_text()
    section = text[text.index("### Python"):]
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
