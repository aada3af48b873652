"""The expert lifecycle through the `spectr` command: ingest -> export -> alias -> bundle -> move -> rebuild."""
from __future__ import annotations

import json
import shutil

import torch
from typer.testing import CliRunner

from spectr.cli import app
from tests.conftest import build_tiny_llama

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def _refused(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _forward(adapter_dir) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(build_tiny_llama(), str(adapter_dir)).eval()
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_is_the_ingested_adapter(prefect_harness, spectr_home, make_adapter, tiny_base_dir, tmp_path):
    src = make_adapter("lc-export", seed=31)
    _ok(["ingest", str(src), "--base-model", str(tiny_base_dir)])
    out = tmp_path / "exported"
    assert "lc-export v1" in _ok(["export", "lc-export@1", "-o", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for f in out.iterdir():
        assert f.read_bytes() == (src / f.name).read_bytes()
    original, exported = _forward(src), _forward(out)
    assert torch.equal(exported, original)
    assert not torch.equal(exported, build_tiny_llama()(input_ids=torch.arange(3, 19).reshape(2, 8)).logits)
    _refused(["export", "lc-export@nope", "-o", str(tmp_path / "x")], "no alias 'nope'")
    _refused(["export", "lc-export", "-o", str(out)], "not an empty folder")


def test_spectra_only_then_keep(prefect_harness, spectr_home, make_adapter, tiny_base_dir, tmp_path):
    src = make_adapter("lc-bare", seed=32)
    _ok(["ingest", str(src), "--base-model", str(tiny_base_dir), "--spectra-only"])
    blobs = sorted((spectr_home / "blobs").rglob("*.safetensors"))
    assert len(blobs) == 1  # the spectra only
    _refused(["export", "lc-bare", "-o", str(tmp_path / "x")], "--spectra-only")
    assert "accepted (unchanged) lc-bare v1" in _ok(["ingest", str(src), "--base-model", str(tiny_base_dir)])
    _ok(["export", "lc-bare", "-o", str(tmp_path / "x")])
    assert (tmp_path / "x" / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()


def test_alias_bundle_move_rebuild(prefect_harness, spectr_home, make_adapter, tiny_base_dir, tmp_path):
    code = tmp_path / "lc-code"
    shutil.copytree(make_adapter("lc-code-1", seed=33), code)
    other = make_adapter("lc-other", seed=34)
    _ok(["ingest", str(code), str(other), "--base-model", str(tiny_base_dir)])
    shutil.rmtree(code)
    shutil.copytree(make_adapter("lc-code-2", seed=35), code)  # retrained: version 2
    assert "accepted lc-code v2" in _ok(["ingest", str(code), "--base-model", str(tiny_base_dir)])

    assert "lc-code@prod -> v1" in _ok(["alias", "set", "lc-code", "prod", "1"])
    _refused(["alias", "set", "lc-code", "v2", "1"], "looks like a version")
    _refused(["alias", "set", "lc-code", "prod", "9"], "no version 9", "versions: 1, 2")
    _ok(["tag", "set", "lc-code@prod", "reviewed", "yes"])
    listing = json.loads(_ok(["catalog", "--json", "--alias", "prod"]))
    assert [(r["name"], r["version"], r["aliases"], r["tags"]) for r in listing] == [
        ("lc-code", 1, ["prod"], {"reviewed": "yes"})]

    first = tmp_path / "b1"
    said = _ok(["bundle", "create", "lcb", "--experts", "lc-code@prod,lc-other", "-o", str(first), "--top-k", "2"])
    assert "lcb@1" in said and "lc-code@1" in said
    manifest = json.loads((first / "manifest.json").read_text())
    assert [(e["name"], e["version"]) for e in manifest["experts"]] == [("lc-code", 1), ("lc-other", 1)]
    assert manifest["router"] == {"top_k": 2}

    assert "v1 -> v2" in _ok(["alias", "set", "lc-code", "prod", "2"])
    assert "lcb@2" in _ok(["bundle", "create", "lcb", "--experts", "lc-code@prod,lc-other", "-o", str(tmp_path / "b2")])
    rebuilt = tmp_path / "b1-again"
    _ok(["bundle", "export", "lcb@1", "-o", str(rebuilt)])
    for f in ("manifest.json", "spectra.safetensors"):
        assert (rebuilt / f).read_bytes() == (first / f).read_bytes()
    assert (tmp_path / "b2" / "spectra.safetensors").read_bytes() != (first / "spectra.safetensors").read_bytes()

    shown = json.loads(_ok(["bundle", "show", "lcb@1", "--json"]))
    assert [(e["name"], e["version"], e["selector"]) for e in shown["experts"]] == [
        ("lc-code", 1, "lc-code@prod"), ("lc-other", 1, "lc-other")]
    assert shown["router"] == {"top_k": 2} and len(shown["spectra_sha256"]) == 64
    assert [(b["name"], b["version"]) for b in json.loads(_ok(["bundle", "list", "--json"]))] == [("lcb", 1), ("lcb", 2)]
    sql = json.loads(_ok(["catalog", "--json", "--sql",
                          "select b.version, a.name, v.version as v from bundle_experts e join bundles b "
                          "on b.id = e.bundle_id join adapter_versions v on v.id = e.version_id "
                          "join adapters a on a.id = v.adapter_id order by 1, e.position"]))
    assert [(r["version"], r["name"], r["v"]) for r in sql] == [
        (1, "lc-code", 1), (1, "lc-other", 1), (2, "lc-code", 2), (2, "lc-other", 1)]
    lineage = {(r["name"], r["version"]): r for r in json.loads(_ok(["lineage", "--json"]))}
    assert lineage[("lc-other", 1)]["bundles"] == ["lcb@1", "lcb@2"] and lineage[("lc-code", 1)]["bundles"] == ["lcb@1"]
    assert lineage[("lc-code", 2)]["source_kind"] == "folder" and lineage[("lc-code", 2)]["commit"] is None

    history = json.loads(_ok(["alias", "history", "lc-code", "prod", "--json"]))
    assert [(h["from_version"], h["to_version"]) for h in history] == [(None, 1), (1, 2)]
    assert "v2 -> v1" in _ok(["alias", "rollback", "lc-code", "prod"])
    _refused(["bundle", "show", "lcb@7"], "no version 7")
    _refused(["bundle", "create", "lcc", "--experts", "lc-code@staging", "-o", str(tmp_path / "b3")], "no alias 'staging'")
    assert not (tmp_path / "b3").exists()
    _refused(["bundle", "create", "lcd", "--experts", "lc-other", "-o", str(tmp_path / "b4"), "--preset", "nope"],
             "unknown preset 'nope'")
    assert not (tmp_path / "b4").exists() and [b["name"] for b in json.loads(_ok(["bundle", "list", "--json"]))] == ["lcb", "lcb"]
