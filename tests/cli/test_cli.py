"""The `spectr` command through typer's runner (in-process, under Prefect's harness)."""
from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from spectr.cli import app

runner = CliRunner()


def test_ingest_lines_exit_codes_and_catalog(prefect_harness, spectr_home, make_adapter, tiny_base_dir, tmp_path):
    good = make_adapter("cli-good", seed=21)
    bad = tmp_path / "cli-bad"
    shutil.copytree(make_adapter("cli-bad-src", seed=22), bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")

    result = runner.invoke(app, ["ingest", str(good), str(bad), "--base-model", str(tiny_base_dir)])
    assert result.exit_code == 1, result.output
    assert "accepted cli-good v1" in result.output
    rejected = [line for line in result.output.splitlines() if line.startswith("rejected")]
    assert len(rejected) == 1 and "adapter_model.safetensors" in rejected[0]

    result = runner.invoke(app, ["ingest", str(good), "--base-model", str(tiny_base_dir)])
    assert result.exit_code == 0 and "accepted (unchanged) cli-good v1" in result.output

    listing = json.loads(runner.invoke(app, ["catalog", "--json"]).output)
    assert [(e["name"], e["version"], e["rank"], e["modules"]) for e in listing] == [("cli-good", 1, 4, 14)]
    assert {"base_model", "content_sha256"} <= set(listing[0])

    sql = runner.invoke(app, ["catalog", "--json", "--sql", "select name, modules * rank as m from experts"])
    assert json.loads(sql.output) == [{"name": "cli-good", "m": 56}]
    refused = runner.invoke(app, ["catalog", "--sql", "delete from adapters"])
    assert refused.exit_code == 2


def test_base_add_then_ingest_without_base_model(prefect_harness, spectr_home, make_adapter, tiny_base_dir):
    added = runner.invoke(app, ["base", "add", str(tiny_base_dir), "--name", "tiny-org/tiny-llama"])
    assert added.exit_code == 0 and "LlamaForCausalLM" in added.output
    result = runner.invoke(app, ["ingest", str(make_adapter("cli-nobase", seed=23))])
    assert result.exit_code == 0, result.output
    assert "accepted cli-nobase v1" in result.output


def test_ingest_unknown_source_is_one_line(spectr_home, tmp_path):
    result = runner.invoke(app, ["ingest", str(tmp_path / "nope" / "*")])
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"error: {tmp_path / 'nope' / '*'}: the pattern matches no folder"]


def test_ingest_with_a_server_configured_records_flow_and_task_runs(prefect_harness, spectr_home, make_adapter,
                                                                    tiny_base_dir, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # what a user's configured server looks like
    with get_client(sync_client=True) as client:
        before = {r.id for r in client.read_flow_runs()}
    result = runner.invoke(app, ["ingest", str(make_adapter("cli-served", seed=24)), "--base-model", str(tiny_base_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "accepted cli-served v1"
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if r.id not in before]
        assert len(runs) == 1 and runs[0].state.is_completed()
        tasks = {t.name.split(" ")[0] for t in client.read_task_runs() if t.flow_run_id == runs[0].id}
    assert {"fetch", "validate", "spectra"} <= tasks
