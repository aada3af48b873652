"""benchmarks/train_experts.py on a tiny Llama with a word-level tokenizer: 5 CPU steps per domain."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.train_experts import main, parse_args, run
from spectr.pipeline.basemodel import resolve_base_model
from spectr.pipeline.fetch import fetch
from spectr.pipeline.validate import load_adapter
from tests.conftest import TINY_BASE_NAME


@pytest.fixture(scope="module")
def tiny_tok_base(tiny_base_dir, tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]"] + [f"w{i}" for i in range(125)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path_factory.mktemp("train") / "tiny-llama"
    shutil.copytree(tiny_base_dir, folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]").save_pretrained(folder)
    return folder


def _write(path: Path, docs: list[str], domain: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d, "domain": domain}) + "\n" for d in docs))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two easy, different domains: counting runs in w3..w40 and a repeated phrase in w60..w120."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("datasets")
    for split, n in (("train", 40), ("test", 10)):
        count = []
        for _ in range(n):
            s = rng.randrange(3, 20)
            count.append(" ".join(f"w{i}" for i in range(s, s + 20)))
        _write(root / "count" / f"{split}.jsonl", count, "count")
        phrase = [" ".join(f"w{60 + (7 * i) % 61}" for i in range(rng.randrange(5, 10), 30)) for _ in range(n)]
        _write(root / "phrase" / f"{split}.jsonl", phrase, "phrase")
    return root


@pytest.fixture(scope="module")
def trained(tiny_tok_base, data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("experts")
    args = parse_args(["--base", str(tiny_tok_base), "--base-name", TINY_BASE_NAME, "--data", str(data),
                       "--out", str(out), "--steps", "5", "--batch", "4", "--seq", "16", "--lr", "1e-2",
                       "--rank", "4", "--alpha", "8", "--device", "cpu", "--eval", "--eval-blocks", "4"])
    return out, run(args)


def test_experts_are_peft_adapters_our_validator_accepts(trained, tiny_base_dir):
    out, result = trained
    from peft import PeftModel

    from tests.conftest import build_tiny_llama

    base = resolve_base_model(tiny_base_dir, name=TINY_BASE_NAME)
    for name in ("count", "phrase"):
        folder = out / name
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.05)
        assert cfg["base_model_name_or_path"] == TINY_BASE_NAME
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        weights = load_file(folder / "adapter_model.safetensors")
        b_keys = [k for k in weights if "lora_B" in k]
        assert len(b_keys) == 2 * 7 and all(weights[k].dtype == torch.bfloat16 for k in weights)
        assert all(weights[k].abs().max() > 0 for k in b_keys)  # PEFT starts B at zero: trained
        assert not any("lm_head" in k for k in weights)
        PeftModel.from_pretrained(build_tiny_llama(), folder)  # loads in PEFT itself
        adapter = load_adapter(fetch(str(folder)), base)
        assert len(adapter.modules) == 14
        log = json.loads((folder / "train_log.json").read_text())
        assert len(log["losses"]) == 5 and log["args"]["steps"] == 5 and log["seconds"] > 0
        assert log["losses"][-1] != log["losses"][0]
        assert log == {**result["logs"][name], "args": log["args"], "versions": log["versions"]}


def test_training_lowers_loss_and_eval_has_the_shared_shape(trained):
    out, result = trained
    losses = json.loads((out / "losses.json").read_text())
    assert set(losses) == {"base", "count", "phrase"}
    assert all(set(row) == {"count", "phrase"} for row in losses.values())
    # Each expert beats the base on its own domain's held-out test split.
    for name in ("count", "phrase"):
        assert losses[name][name] < losses["base"][name]
        assert json.loads((out / name / "losses.json").read_text()) == losses[name]
        curve = result["logs"][name]["losses"]
        assert min(curve[-2:]) < curve[0]


def test_bad_inputs_fail_in_one_line_and_write_nothing(tiny_tok_base, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w3 w4"}\nnot json\n')
    out = tmp_path / "out"
    common = ["--base", str(tiny_tok_base), "--out", str(out), "--device", "cpu", "--steps", "1", "--seq", "4"]
    assert main(common + ["--domain", f"bad={bad}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:2" in err
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "w3"}\n')
    assert main(common + ["--domain", f"short={short}", "--seq", "64"]) == 1
    assert "fewer than one block of 64" in capsys.readouterr().err
    assert main(common + ["--data", str(data), "--domains", "count,nope"]) == 1
    assert "nope" in capsys.readouterr().err
    assert not out.exists()


def test_targets_train_attention_only_and_unknown_names_fail(tiny_tok_base, data, tmp_path, capsys):
    out = tmp_path / "attn"
    common = ["--base", str(tiny_tok_base), "--base-name", TINY_BASE_NAME, "--data", str(data), "--domains", "count",
              "--out", str(out), "--steps", "1", "--batch", "2", "--seq", "16", "--rank", "2", "--device", "cpu"]
    assert main(common + ["--targets", "q_proj,k_proj,v_proj,o_proj"]) == 0
    cfg = json.loads((out / "count" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    keys = load_file(out / "count" / "adapter_model.safetensors")
    assert keys and all(".self_attn." in k for k in keys)
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "bad"), "--targets", "q_proj,mlp"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--targets" in err and "mlp" in err
    assert not (tmp_path / "bad").exists()
