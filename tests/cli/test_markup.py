"""Square brackets in paths and names are text: rich markup once crashed the CLI's printing on them."""
from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from spectr.cli import app

runner = CliRunner()


def test_bracketed_source_that_does_not_exist_is_one_literal_line(spectr_home):
    result = runner.invoke(app, ["ingest", "adapters/nope[/x]"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "adapters/nope[/x]" in result.output


def test_bracketed_adapter_folder_prints_literally_and_the_catalog_still_works(
    spectr_home, make_adapter, tiny_base_dir, tmp_path
):
    odd = tmp_path / "x[" / "red]" / "markup-odd"  # the source path holds "[/red]", a closing tag to rich
    shutil.copytree(make_adapter("markup-src", seed=90), odd)
    good = make_adapter("markup-good", seed=91)
    result = runner.invoke(app, ["ingest", str(odd), str(good), "--base-model", str(tiny_base_dir)])
    assert "Traceback" not in result.output
    lines = result.stdout.splitlines()
    assert len([ln for ln in lines if ln.startswith(("accepted", "rejected"))]) == 2, result.output
    assert any("markup-good" in ln and ln.startswith("accepted") for ln in lines)
    assert any("markup-odd" in ln and ln.startswith("accepted") for ln in lines)
    table = runner.invoke(app, ["catalog"])
    assert table.exit_code == 0 and "Traceback" not in table.output
    listed = runner.invoke(app, ["catalog", "--json"])
    assert any("x[/red]" in row["source"] for row in json.loads(listed.stdout))


def test_a_bracketed_expert_name_is_refused_in_one_literal_line(spectr_home, make_adapter, tiny_base_dir, tmp_path):
    odd = tmp_path / "x[" / "red]"
    shutil.copytree(make_adapter("markup-src2", seed=92), odd)
    result = runner.invoke(app, ["ingest", str(odd), "--base-model", str(tiny_base_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert any(ln.startswith("rejected") and "x[/red]" in ln and "expert name 'red]'" in ln
               for ln in result.stdout.splitlines()), result.output
