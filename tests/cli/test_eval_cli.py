"""`spectr eval routing | lm | switch` on a saved tiny model whose routing answers are known."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spectr.cli import app
from tests.runtime.test_evaluate import ALPHA, BETA, subspace_bundle, subspace_model, word_tokenizer, words

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalcli")
    model = subspace_model()
    model.save_pretrained(root / "base")
    word_tokenizer().save_pretrained(root / "base")
    subspace_bundle(root / "bundle", model, names=("alpha", "beta"))
    record_base_config(root / "bundle", root / "base")
    files = {}
    for domain, pool, seed in (("alpha", ALPHA, 1), ("beta", BETA, 2)):
        (root / "data" / domain).mkdir(parents=True)
        f = root / "data" / domain / "test.jsonl"
        f.write_text("".join(json.dumps({"text": words(pool, n, seed + n), "domain": domain}) + "\n"
                             for n in (12, 5, 30)))
        files[domain] = f
    return {"root": root, "base": root / "base", "bundle": root / "bundle", **files}


def record_base_config(bundle: Path, base: Path) -> None:
    """The manifest records the saved base's config hash, as a bundle from the registry does (the runtime
    helpers write a placeholder), so the CLI has no other-base warning to give."""
    from spectr.digest import config_sha256

    m = json.loads((bundle / "manifest.json").read_text())
    m["base"]["config_sha256"] = config_sha256(json.loads((base / "config.json").read_text()))
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def _args(setup, verb: str) -> list[str]:
    return ["eval", verb, "--base-model", str(setup["base"]), "--bundle", str(setup["bundle"])]


def test_eval_routing_table_and_json(setup):
    out = setup["root"] / "routing.json"
    result = runner.invoke(app, _args(setup, "routing") + ["--data", f"alpha={setup['alpha']}", "--data",
                                                           f"beta={setup['beta']}", "--json", str(out),
                                                           "--presets", "reference,peft-arrow", "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "top-1 routing accuracy" in result.output and "macro" in result.output
    res = json.loads(out.read_text())
    assert set(res) == {"reference", "peft-arrow"}
    for r in res.values():
        assert r["top1"] == {"alpha": 1.0, "beta": 1.0, "macro": 1.0} and r["topk"]["macro"] == 1.0
        assert r["k"] == 2  # the presets' k (4 and 3) clipped to the bundle's 2 experts
        # --max-tokens 8 truncates the 12- and 30-word documents: (8 + 5 + 8) tokens x 10 modules
        assert r["decisions"] == {"alpha": 210, "beta": 210}
    # --scoring fp8: the same documents and decisions counted, scored in float8 (here as accurate)
    fp8 = runner.invoke(app, _args(setup, "routing") + ["--data", f"alpha={setup['alpha']}", "--data",
                                                        f"beta={setup['beta']}", "--json", str(out), "--max-tokens",
                                                        "8", "--scoring", "fp8"])
    assert fp8.exit_code == 0, fp8.output
    res = json.loads(out.read_text())
    assert res["default"]["decisions"] == {"alpha": 210, "beta": 210} and res["default"]["top1"]["macro"] == 1.0
    assert {r["config"]["scoring"] for r in res.values()} == {"fp8"}  # every preset, the watchers' too


def test_eval_routing_map_and_data_dir(setup):
    out = setup["root"] / "mapped.json"
    base = _args(setup, "routing") + ["--data-dir", str(setup["root"] / "data"), "--presets", "reference",
                                      "--top-k", "1", "--json", str(out)]
    result = runner.invoke(app, base + ["--map", "alpha=beta", "--map", "beta=alpha"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["reference"]["top1"]["macro"] == 0.0
    wrong = runner.invoke(app, _args(setup, "routing") + ["--data", f"gamma={setup['alpha']}"])
    assert wrong.exit_code == 1 and "--map gamma=EXPERT" in wrong.output
    missing = runner.invoke(app, _args(setup, "routing") + ["--data", "alpha=/nonexistent/x.jsonl"])
    assert missing.exit_code == 1 and "/nonexistent/x.jsonl" in missing.output
    unknown = runner.invoke(app, base + ["--presets", "bogus"])
    assert unknown.exit_code == 1 and "unknown preset 'bogus'" in unknown.output


def test_eval_lm_json_rows(setup):
    out = setup["root"] / "lm.json"
    result = runner.invoke(app, _args(setup, "lm") + ["--data-dir", str(setup["root"] / "data"), "--ks", "1,2",
                                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    assert set(res["rows"]) == {"base", "expert:alpha", "expert:beta", "oracle", "uniform", "peft-arrow k=2",
                                "reference k=1", "reference mix k=1", "reference k=2", "reference mix k=2",
                                "default"}
    assert res["tokens"] == {"alpha": 11 + 4 + 29, "beta": 11 + 4 + 29}
    assert res["rows"]["oracle"]["alpha"] == res["rows"]["expert:alpha"]["alpha"]
    assert "mean next-token loss" in result.output


def test_eval_switch(setup):
    out = setup["root"] / "switch.json"
    result = runner.invoke(app, _args(setup, "switch") + ["--data-dir", str(setup["root"] / "data"), "--pairs",
                                                          "alpha:beta", "--prefix-tokens", "4", "--suffix-tokens",
                                                          "3", "--sequences", "2", "--top-k", "1", "--json",
                                                          str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    pair = res["default"]["pairs"]["alpha->beta"]
    assert pair["latency"] == 0 and pair["curve_b"] == [1.0, 1.0, 1.0] and "latency" in res["definition"]
    assert "curve_b[j]" in result.output  # the definition is printed verbatim, not eaten as markup
    bad = runner.invoke(app, _args(setup, "switch") + ["--data-dir", str(setup["root"] / "data"), "--pairs", "alpha"])
    assert bad.exit_code == 1 and "A:B" in bad.output
