"""Base-model shapes from config alone, compared against real instantiated models."""
from __future__ import annotations

import json

import pytest
from torch import nn

from spectr.pipeline.basemodel import base_model_from_config, names_match, resolve_base_model
from spectr.pipeline.types import AdapterError, ModuleShape
from tests.conftest import TINY_LLAMA, build_tiny_llama
from tests.pipeline.conftest import SMOLLM2_CONFIG, make_hub_cache

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64))


def test_tiny_llama_shapes_match_the_real_model(tiny_base_dir):
    base = resolve_base_model(tiny_base_dir)
    real = {
        n: ModuleShape(m.in_features, m.out_features)
        for n, m in build_tiny_llama().named_modules()
        if isinstance(m, nn.Linear) and n != "lm_head"
    }
    assert base.modules == real
    assert len(base.modules) == 14
    assert base.modules["model.layers.0.self_attn.k_proj"] == ModuleShape(64, 32)
    assert base.modules["model.layers.1.mlp.down_proj"] == ModuleShape(128, 64)
    assert "lm_head" not in base.modules
    assert (base.architecture, base.model_type) == ("LlamaForCausalLM", "llama")
    assert base.name == "tiny-llama"  # no hub-like _name_or_path: the folder's name
    assert base.path == tiny_base_dir.resolve()


def test_gpt2_conv1d_is_oriented_as_y_equals_w_x():
    model = _tiny_gpt2()
    cfg = json.loads(model.config.to_json_string())
    base = base_model_from_config(cfg, "tiny-gpt2")
    attn = model.transformer.h[0].attn.c_attn  # Conv1D weight is (in, out)
    assert tuple(attn.weight.shape) == (32, 96)
    assert base.modules["transformer.h.0.attn.c_attn"] == ModuleShape(32, 96, conv1d=True)
    assert base.modules["transformer.h.1.mlp.c_proj"] == ModuleShape(128, 32, conv1d=True)
    assert len(base.modules) == 8 and all(s.conv1d for s in base.modules.values())


def test_config_hash_ignores_volatile_keys_only():
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], **TINY_LLAMA)
    h = base_model_from_config(cfg, "a").config_sha256
    noisy = dict(cfg, transformers_version="9.9", _name_or_path="x/y", torch_dtype="bfloat16", use_cache=False)
    assert base_model_from_config(noisy, "b").config_sha256 == h
    assert base_model_from_config(dict(cfg, hidden_size=32), "c").config_sha256 != h


def test_smollm2_meta_build_is_cached(monkeypatch, tmp_path):
    import spectr.pipeline.basemodel as bm

    monkeypatch.setenv("SPECTR_HOME", str(tmp_path))  # an empty disk cache
    monkeypatch.setattr(bm, "_CACHE", {})
    builds = []
    real = bm._instantiate
    monkeypatch.setattr(bm, "_instantiate", lambda config, name: builds.append(name) or real(config, name))
    base = base_model_from_config(SMOLLM2_CONFIG, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert builds == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert len(base.modules) == 210
    assert base.modules["model.layers.29.self_attn.k_proj"] == ModuleShape(576, 192)
    assert base.modules["model.layers.0.mlp.down_proj"] == ModuleShape(1536, 576)
    # the same config (transformers_version aside) is answered from the cache, in memory and then from disk
    again = base_model_from_config(dict(SMOLLM2_CONFIG, transformers_version="x"), "other")
    assert again.modules == base.modules and again.name == "other"
    monkeypatch.setattr(bm, "_CACHE", {})
    from_disk = base_model_from_config(SMOLLM2_CONFIG, "third")
    assert from_disk.modules == base.modules
    assert builds == ["HuggingFaceTB/SmolLM2-135M-Instruct"]


def test_unknown_model_type_is_an_adapter_error():
    with pytest.raises(AdapterError, match="not-a-model"):
        base_model_from_config({"model_type": "not-a-model"}, "weird")
    with pytest.raises(AdapterError, match="no model_type"):
        base_model_from_config({"hidden_size": 8}, "weird")


def test_resolve_folder_names_and_errors(tmp_path, tiny_base_dir):
    d = tmp_path / "local-copy"
    d.mkdir()
    cfg = json.loads((tiny_base_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, _name_or_path="tiny-org/tiny-llama")))
    assert resolve_base_model(d).name == "tiny-org/tiny-llama"
    assert resolve_base_model(d, name="given").name == "given"
    (d / "config.json").write_text("{broken")
    with pytest.raises(AdapterError, match=r"local-copy/config.json: invalid"):
        resolve_base_model(d)
    (d / "config.json").unlink()
    with pytest.raises(AdapterError, match=r"local-copy/config.json: base model config.json not found"):
        resolve_base_model(d)


def test_resolve_hub_id_offline(tmp_path, tiny_base_dir, offline_hub):
    src = tmp_path / "only-config"
    src.mkdir()
    (src / "config.json").write_text((tiny_base_dir / "config.json").read_text())
    make_hub_cache(offline_hub, "tiny-org/tiny-llama", src, COMMIT)
    base = resolve_base_model("tiny-org/tiny-llama")
    assert base.name == "tiny-org/tiny-llama"
    assert base.path.name == COMMIT
    assert base.modules == resolve_base_model(tiny_base_dir).modules
    assert resolve_base_model("tiny-org/tiny-llama@main").name == "tiny-org/tiny-llama"
    with pytest.raises(AdapterError, match=r"nobody/nothing/config.json"):
        resolve_base_model("nobody/nothing")


@pytest.mark.parametrize(
    "a,b,ok",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "/models/smollm2-135m-instruct", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct/", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M", False),
        ("tiny-org/tiny-llama", "tiny-gpt2", False),
        ("", "x", False),
    ],
)
def test_names_match(a, b, ok):
    assert names_match(a, b) is ok
    assert names_match(b, a) is ok


def test_module_table_is_cached_on_disk(tiny_base_dir, spectr_home, monkeypatch):
    from spectr.pipeline import basemodel

    cfg = json.loads((tiny_base_dir / "config.json").read_text())
    cfg["vocab_size"] = cfg["vocab_size"] + 1  # a config no other test built
    first = basemodel.base_model_from_config(cfg, "cached")
    assert basemodel._disk_cache(first.config_sha256).is_file()
    basemodel._CACHE.clear()

    def no_transformers(*args):
        raise AssertionError("a cached table must not need transformers")

    monkeypatch.setattr(basemodel, "_instantiate", no_transformers)
    again = basemodel.base_model_from_config(cfg, "cached")
    assert (again.modules, again.architecture, again.model_type) == (first.modules, first.architecture,
                                                                     first.model_type)
    assert list(again.modules) == list(first.modules)  # the model's order, which validation reports in
