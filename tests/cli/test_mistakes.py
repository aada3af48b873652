"""Every mistake the issue lists: one line on stderr naming what is wrong and what to do, a non-zero exit, no
traceback (unless --debug), nothing recorded."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spectr.cli import app
from tests.cli.test_eval_cli import setup  # noqa: F401  (a saved tiny model, a bundle and data)

runner = CliRunner()


def one_error(result, *needles: str, code: int = 1) -> str:
    """The result is exactly one `error: ...` line on stderr, nothing on stdout, and exit `code`."""
    assert result.exit_code == code, result.output
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_registry(home: Path) -> None:
    assert not (home / "registry.db").exists(), "a mistake must change nothing"


def test_ingest_missing_base_model_folder(spectr_home, make_adapter, tmp_path):
    missing = tmp_path / "no-such-base"
    result = runner.invoke(app, ["ingest", str(make_adapter("m1", seed=70)), "--base-model", str(missing)])
    one_error(result, str(missing), "pass a folder holding config.json")
    no_registry(spectr_home)


def test_ingest_bare_word_base_model_fails_at_once(spectr_home, make_adapter):
    result = runner.invoke(app, ["ingest", str(make_adapter("m2", seed=71)), "--base-model", "smol"])
    one_error(result, "smol: no such base model folder, and not a hub id", "pass a folder holding config.json")
    no_registry(spectr_home)


def test_ingest_uncached_hub_base_model_fails_at_once_offline(spectr_home, make_adapter):
    result = runner.invoke(app, ["ingest", str(make_adapter("m3", seed=72)), "--base-model", "nobody/nothing"])
    one_error(result, "nobody/nothing", "local Hugging Face cache", "pass a folder holding config.json")
    no_registry(spectr_home)


def test_ingest_rejected_adapter_is_one_stdout_line_and_no_log(spectr_home, make_adapter, tiny_base_dir, tmp_path):
    good = make_adapter("m-good", seed=73)
    bad = tmp_path / "m-bad"
    shutil.copytree(make_adapter("m-bad-src", seed=74), bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    result = runner.invoke(app, ["ingest", str(good), str(bad), "--base-model", str(tiny_base_dir)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "accepted m-good v1" and lines[1].startswith(f"rejected {bad}: ") and "DoRA" in lines[1]
    assert len(lines) == 2 + sum(line.startswith("  warning") for line in lines)
    # stderr: the summary only; no Prefect ERROR, no traceback.
    assert result.stderr.splitlines() == ["2 adapters: 1 new versions, 0 unchanged, 1 rejected"]


@pytest.mark.parametrize("verb", [["generate", "--prompt", "w1"], ["eval", "routing"]])
def test_missing_base_model_folder_on_generate_and_eval(setup, verb, tmp_path):  # noqa: F811
    missing = tmp_path / "gone"
    result = runner.invoke(app, verb + ["--base-model", str(missing), "--bundle", str(setup["bundle"]),
                                        "--data-dir", str(setup["root"] / "data")][: 4 if verb[0] == "generate" else 6])
    one_error(result, f"--base-model {missing}: no such folder", "pass a model folder")


@pytest.mark.parametrize("verb", [["generate", "--prompt", "w1"], ["eval", "routing"]])
def test_bare_word_base_model_on_generate_and_eval_fails_at_once(setup, verb):  # noqa: F811
    args = verb + ["--base-model", "smol", "--bundle", str(setup["bundle"])]
    if verb[0] == "eval":
        args += ["--data-dir", str(setup["root"] / "data")]
    one_error(runner.invoke(app, args), "--base-model smol: no such folder", "pass a model folder")


@pytest.mark.parametrize("verb", [["generate", "--prompt", "w1"], ["eval", "routing"]])
def test_missing_bundle_on_generate_and_eval(setup, verb, tmp_path):  # noqa: F811
    missing = tmp_path / "no-bundle"
    args = verb + ["--base-model", str(setup["base"]), "--bundle", str(missing)]
    if verb[0] == "eval":
        args += ["--data-dir", str(setup["root"] / "data")]
    one_error(runner.invoke(app, args), f"--bundle {missing}: no such folder", "spectr bundle create")
    not_bundle = tmp_path / "empty"
    not_bundle.mkdir()
    args[args.index(str(missing))] = str(not_bundle)
    one_error(runner.invoke(app, args), "not a bundle (no manifest.json)")


@pytest.mark.parametrize("verb", [["generate", "--prompt", "w1"], ["eval", "routing"]])
def test_unknown_scoring_on_generate_and_eval(setup, verb):  # noqa: F811
    args = verb + ["--base-model", str(setup["base"]), "--bundle", str(setup["bundle"]), "--scoring", "fp4"]
    if verb[0] == "eval":
        args += ["--data-dir", str(setup["root"] / "data")]
    one_error(runner.invoke(app, args), "unknown scoring 'fp4'; expected one of exact, fp8")


def test_unknown_preset_and_missing_option(setup):  # noqa: F811
    base = ["generate", "--base-model", str(setup["base"]), "--bundle", str(setup["bundle"]), "--prompt", "w1"]
    one_error(runner.invoke(app, base + ["--preset", "spectr"]), "unknown preset 'spectr'", "default, reference")
    one_error(runner.invoke(app, base[:3] + ["--prompt", "w1"]), "Missing option '--bundle'", "--help", code=2)


def test_registry_mistakes(spectr_home, tmp_path):
    one_error(runner.invoke(app, ["bundle", "create", "b", "--experts", "nobody", "-o", str(tmp_path / "b")]),
              "no expert named 'nobody'")
    one_error(runner.invoke(app, ["bundle", "create", "b", "-o", str(tmp_path / "b")]), "--all", code=2)
    one_error(runner.invoke(app, ["base", "add", str(tmp_path / "nothing")]), "pass a folder holding config.json")
    one_error(runner.invoke(app, ["catalog", "--sql", "delete from adapters"]), code=2)


def test_debug_shows_the_traceback(spectr_home, make_adapter):
    result = runner.invoke(app, ["--debug", "ingest", str(make_adapter("m4", seed=75)), "--base-model", "smol"])
    assert result.exit_code == 1 and result.exception is not None  # raised: typer's runner keeps the traceback
    assert "smol" in str(result.exception)


def test_installed_command_answers_the_readme_eval_example_in_one_line(setup, tmp_path):  # noqa: F811
    """The README's `--base-model smol`, through the real console script: one line, no network retries."""
    exe = Path(sys.executable).with_name("spectr")
    done = subprocess.run([str(exe), "eval", "routing", "--base-model", "smol", "--bundle", str(setup["bundle"]),
                           "--data-dir", str(setup["root"] / "data")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: --base-model smol")


def test_read_only_registry_is_one_line(spectr_home, make_adapter, tiny_base_dir, monkeypatch):
    from spectr.registry import Registry

    Registry().close()  # a registry that exists, then opened read-only (root ignores file modes)
    db = spectr_home / "registry.db"
    before = db.read_bytes()
    monkeypatch.setenv("SPECTR_REGISTRY_URL", f"sqlite:///file:{db}?mode=ro&uri=true")
    result = runner.invoke(app, ["ingest", str(make_adapter("ro", seed=80)), "--base-model", str(tiny_base_dir)])
    line = one_error(result, "the registry database refused", "readonly", "SPECTR_REGISTRY_URL")
    assert "internal error" not in line and db.read_bytes() == before
