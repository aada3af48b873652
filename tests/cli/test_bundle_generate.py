"""`spectr bundle create` from the registry and `spectr generate` on a tiny model with a word-level tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spectr.pipeline.basemodel import resolve_base_model
from spectr.registry.spectra_format import spectra_from_bytes
from spectr.pipeline.fetch import fetch
from spectr.pipeline.spectra import adapter_spectra
from spectr.pipeline.persist import store_version, write_spectra_blob
from spectr.pipeline.validate import load_adapter
from spectr.registry.store import Registry
from spectr.runtime import read_bundle
from spectr.cli import app

runner = CliRunner()


def _ingest_plain(registry: Registry, folder: Path, base_dir: Path) -> None:
    adapter = load_adapter(fetch(str(folder)), resolve_base_model(base_dir, name="tiny-org/tiny-llama"))
    store_version(registry, adapter, write_spectra_blob(registry.blobs, adapter, adapter_spectra(adapter)))


@pytest.fixture()
def filled(spectr_home, make_adapter, tiny_base_dir, tmp_path) -> Registry:
    registry = Registry()
    _ingest_plain(registry, make_adapter("red", seed=31), tiny_base_dir)
    _ingest_plain(registry, make_adapter("blue", seed=32), tiny_base_dir)
    second = tmp_path / "red"  # red v2
    shutil.copytree(make_adapter("red-2", seed=33), second)
    _ingest_plain(registry, second, tiny_base_dir)
    return registry


def test_bundle_create_pins_versions_and_matches_the_registry(filled, tmp_path):
    out = tmp_path / "b1"
    result = runner.invoke(app, ["bundle", "create", "b1", "--experts", "red@1,blue", "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["name"], e["version"]) for e in manifest["experts"]] == [("red", 1), ("blue", 1)]
    assert manifest["base"]["name"] == "tiny-org/tiny-llama"
    bundle = read_bundle(out)
    # The bundle's stacked spectra are the registry's spectra of red v1, bit for bit.
    red1 = spectra_from_bytes(filled.load_spectra_bytes("red", 1))
    module = sorted(red1.modules)[0]
    bank = bundle.bank(module)
    r = red1.modules[module].S.numel()
    assert torch.equal(bank["Vt"][:r], red1.modules[module].V.T)  # expert 0 is red, singular values sorted
    assert torch.equal(bank["S"][0, :r], red1.modules[module].S)
    assert bank["scaling"][0].item() == red1.modules[module].scaling

    again = tmp_path / "b2"
    assert runner.invoke(app, ["bundle", "create", "b1", "--experts", "red@1,blue", "-o", str(again)]).exit_code == 0
    assert (again / "spectra.safetensors").read_bytes() == (out / "spectra.safetensors").read_bytes()

    latest = runner.invoke(app, ["bundle", "create", "all", "--all", "-o", str(tmp_path / "all")])
    assert latest.exit_code == 0
    assert [(e["name"], e["version"]) for e in json.loads((tmp_path / "all" / "manifest.json").read_text())["experts"]] == [
        ("blue", 1), ("red", 2)]


def test_bundle_create_errors_write_nothing(filled, tmp_path):
    out = tmp_path / "bad"
    result = runner.invoke(app, ["bundle", "create", "bad", "--experts", "red@7", "-o", str(out)])
    assert result.exit_code == 1 and "no version 7" in result.output
    assert not out.exists()
    result = runner.invoke(app, ["bundle", "create", "bad", "--experts", "green", "-o", str(out)])
    assert result.exit_code == 1 and "green" in result.output and not out.exists()


@pytest.fixture()
def tiny_with_tokenizer(tiny_base_dir, tmp_path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]"] + [f"w{i}" for i in range(125)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "tiny-llama"
    shutil.copytree(tiny_base_dir, folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]").save_pretrained(folder)
    return folder


def test_generate_routes_and_draws(filled, tiny_with_tokenizer, tmp_path):
    bundle = tmp_path / "gen"
    assert runner.invoke(app, ["bundle", "create", "gen", "--experts", "red,blue", "-o", str(bundle)]).exit_code == 0
    picture = tmp_path / "routes.png"
    args = ["generate", "--base-model", str(tiny_with_tokenizer), "--bundle", str(bundle), "--prompt", "w5 w6 w7",
            "--no-chat", "--max-new-tokens", "4"]
    result = runner.invoke(app, args + ["--trace", str(picture), "--top-k", "1"])
    assert result.exit_code == 0, result.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from spectr.generate import routed_generate

    gen = routed_generate(tiny_with_tokenizer, bundle, "w5 w6 w7", chat=False, max_new_tokens=4, top_k=1)
    assert gen.tokens[:3] == ["w5", "w6", "w7"] and 3 <= len(gen.tokens) <= 6
    assert 1 <= gen.new_tokens <= 4 and gen.tokens_per_s > 0  # throughput of the generate() call
    assert "tokens/s" in result.output

    if not torch.cuda.is_available():  # --compile without a GPU: the same greedy text, uncompiled
        compiled = runner.invoke(app, args + ["--top-k", "1", "--compile"])
        assert compiled.exit_code == 0, compiled.output
        def text(out):
            return [line for line in out.splitlines() if "tokens/s" not in line and "routing picture" not in line]
        assert len(text(compiled.output)) == 1 and text(compiled.output)[0] in text(result.output)
    fixed = runner.invoke(app, args + ["--preset", "fixed:blue"])
    assert fixed.exit_code == 0, fixed.output
    unknown = runner.invoke(app, args + ["--preset", "fixed:green"])
    assert unknown.exit_code != 0 and "green" in (unknown.output + str(unknown.exception))
    bare = runner.invoke(app, args + ["--router", "fixed"])  # the old flag name still works
    assert bare.exit_code == 1 and "fixed:NAME" in bare.output
    fp8 = runner.invoke(app, args + ["--scoring", "fp8"])
    assert fp8.exit_code == 0 and "tokens/s" in fp8.output, fp8.output
    wrong = runner.invoke(app, args + ["--scoring", "fp4"])
    assert wrong.exit_code == 1 and "error: unknown scoring 'fp4'; expected one of exact, fp8" in wrong.output
    assert "Traceback" not in wrong.output
