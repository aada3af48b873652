"""load_adapter on real PEFT adapters: what PEFT writes is accepted, every bad input is one clear error."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from spectr.pipeline.basemodel import base_model_from_config
from spectr.pipeline.fetch import fetch
from spectr.pipeline.types import AdapterError, AdapterSource
from spectr.pipeline.validate import adapter_content_sha256, load_adapter, read_adapter_config
from tests.conftest import TINY_LLAMA, build_tiny_llama
from tests.pipeline.conftest import SHARED, SMOLLM2_CONFIG, clone, edit_config, edit_weights

Q0 = "model.layers.0.self_attn.q_proj"
KEY_A = f"base_model.model.{Q0}.lora_A.weight"
KEY_B = f"base_model.model.{Q0}.lora_B.weight"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _src(folder) -> AdapterSource:
    return fetch(str(folder))


def _reject(folder, base, *needles: str) -> str:
    with pytest.raises(AdapterError) as e:
        load_adapter(_src(folder), base)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def _peft_layers(folder, model=None):
    """PEFT's own view of the adapter: module name -> LoraLayer."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = PeftModel.from_pretrained(model if model is not None else build_tiny_llama(), folder)
    inner = peft_model.base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture()
def bad(make_adapter, tmp_path):
    """A private copy of a plain tiny-Llama adapter, to corrupt."""
    return clone(make_adapter("plain"), tmp_path / "bad")


# ---- acceptance -----------------------------------------------------------------------------------


def test_plain_adapter_matches_peft(make_adapter, tiny_base):
    folder = make_adapter("plain")
    ad = load_adapter(_src(folder), tiny_base)
    layers = _peft_layers(folder)
    assert set(ad.modules) == set(layers) and len(ad.modules) == 14
    for name, f in ad.modules.items():
        layer = layers[name]
        assert f.A.dtype == torch.float32 and f.B.dtype == torch.float32
        assert torch.equal(f.A, layer.lora_A["default"].weight)
        assert torch.equal(f.B, layer.lora_B["default"].weight)
        assert f.scaling == pytest.approx(layer.scaling["default"]) == 2.0
    assert (ad.rank, ad.alpha) == (4, 8.0)
    assert ad.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert ad.warnings == [] and ad.modules_to_save == []
    assert list(ad.modules)[0] == Q0  # base-model order
    assert ad.content_sha256 == adapter_content_sha256(folder)


def test_rslora_scaling(make_adapter, tiny_base):
    folder = make_adapter("rslora", use_rslora=True, r=4, lora_alpha=8)
    ad = load_adapter(_src(folder), tiny_base)
    layers = _peft_layers(folder)
    for name, f in ad.modules.items():
        assert f.scaling == pytest.approx(layers[name].scaling["default"]) == pytest.approx(8 / 2)


def test_rank_and_alpha_patterns_follow_peft(make_adapter, tiny_base):
    folder = make_adapter(
        "patterns",
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 32, r"model\.layers\.0\.mlp\.up_proj": 3},
    )
    ad = load_adapter(_src(folder), tiny_base)
    layers = _peft_layers(folder)
    ranks = {n: f.rank for n, f in ad.modules.items()}
    assert ranks[Q0] == 2 and ranks["model.layers.1.mlp.down_proj"] == 6 and ranks["model.layers.0.mlp.down_proj"] == 4
    for name, f in ad.modules.items():
        assert f.rank == layers[name].r["default"]
        assert f.scaling == pytest.approx(layers[name].scaling["default"]), name
    assert ad.modules["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(32 / 4)
    assert ad.modules["model.layers.0.mlp.up_proj"].scaling == pytest.approx(3 / 4)
    assert ad.modules["model.layers.1.mlp.up_proj"].scaling == pytest.approx(8 / 4)
    assert ad.rank == 4


def test_layers_to_transform(make_adapter, tiny_base):
    ad = load_adapter(_src(make_adapter("layer1", layers_to_transform=[1], target_modules=ALL)), tiny_base)
    assert len(ad.modules) == 7 and all(n.startswith("model.layers.1.") for n in ad.modules)


def test_layers_to_transform_disagreeing_with_weights_is_rejected(make_adapter, tiny_base, tmp_path):
    folder = clone(make_adapter("plain"), tmp_path / "lt")
    edit_config(folder, layers_to_transform=[1])
    _reject(folder, tiny_base, "adapter_model.safetensors", "model.layers.0.", "layers_to_transform [1]")


def test_gpt2_fan_in_fan_out(make_adapter):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gcfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    model = GPT2LMHeadModel(gcfg)
    folder = make_adapter("gpt2", model=model, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)
    base = base_model_from_config(json.loads(gcfg.to_json_string()), "tiny-org/tiny-llama")
    ad = load_adapter(_src(folder), base)
    assert len(ad.modules) == 8
    layers = _peft_layers(folder, model=GPT2LMHeadModel(gcfg))
    for name, f in ad.modules.items():
        shape = base.modules[name]
        assert tuple(f.A.shape) == (4, shape.in_features) and tuple(f.B.shape) == (shape.out_features, 4)
        # PEFT's delta is Conv1D-oriented (in x out); ours is y = W x (out x in)
        peft_delta = layers[name].get_delta_weight("default")
        assert torch.allclose((f.scaling * f.B @ f.A).T, peft_delta, atol=1e-6)
    x = torch.randn(3, 32)
    f = ad.modules["transformer.h.0.attn.c_attn"]
    # the delta applied as y = W x equals PEFT's LoRA path on a real input
    lora_out = layers["transformer.h.0.attn.c_attn"]
    expected = lora_out(x) - lora_out.base_layer(x)
    assert torch.allclose(x @ (f.scaling * f.B @ f.A).T, expected, atol=1e-5)


def test_modules_to_save_kept_and_warned(make_adapter, tiny_base):
    ad = load_adapter(_src(make_adapter("mts", target_modules=["q_proj"], modules_to_save=["lm_head"])), tiny_base)
    assert ad.modules_to_save == ["lm_head"]
    assert len(ad.modules) == 2
    assert any("lm_head" in w and "kept in the record, not routed" in w for w in ad.warnings)


def test_lora_bias_is_refused_not_dropped(make_adapter, tiny_base):
    folder = make_adapter("lbias", lora_bias=True)
    with pytest.raises(AdapterError, match=r"lora_bias: module model.layers.0.* trains a bias on lora_B.*"
                                           r"retrain with lora_bias=False"):
        load_adapter(_src(folder), tiny_base)


def test_trained_base_biases_are_refused_not_dropped(make_adapter):
    from transformers import GPT2Config, GPT2LMHeadModel

    gcfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64)
    base = base_model_from_config(json.loads(gcfg.to_json_string()), "tiny-org/tiny-llama")
    for mode in ("all", "lora_only"):
        folder = make_adapter(f"gpt2bias-{mode}", model=GPT2LMHeadModel(gcfg), target_modules=["c_attn"], bias=mode)
        with pytest.raises(AdapterError, match=rf"bias='{mode}': the adapter trains base-module biases.*"
                                               r"retrain with bias='none'"):
            load_adapter(_src(folder), base)


def test_name_mismatch_is_a_warning_when_shapes_match(make_adapter, tiny_base_dir):
    from spectr.pipeline.basemodel import resolve_base_model

    other = resolve_base_model(tiny_base_dir, name="other-org/other-model")
    ad = load_adapter(_src(make_adapter("plain")), other)
    assert len(ad.modules) == 14
    assert len(ad.warnings) == 1
    assert "tiny-org/tiny-llama" in ad.warnings[0] and "other-org/other-model" in ad.warnings[0]


def test_content_hash_tracks_config_and_weights(make_adapter, tmp_path):
    folder = make_adapter("plain")
    h = adapter_content_sha256(folder)
    assert adapter_content_sha256(clone(folder, tmp_path / "copy")) == h  # independent of location
    c = clone(folder, tmp_path / "c")
    edit_config(c, lora_alpha=16)
    assert adapter_content_sha256(c) != h
    w = clone(folder, tmp_path / "w")
    edit_weights(w, lambda t: {**t, KEY_A: t[KEY_A] * 2})
    assert adapter_content_sha256(w) != h


def test_shared_experts_load_against_smollm2():
    experts = SHARED / "experts"
    if not experts.is_dir():
        pytest.skip("../shared/experts is absent")
    base = base_model_from_config(SMOLLM2_CONFIG, "HuggingFaceTB/SmolLM2-135M-Instruct")
    folders = sorted(p for p in experts.iterdir() if (p / "adapter_config.json").is_file())
    assert len(folders) == 8
    hashes = set()
    for folder in folders:
        ad = load_adapter(_src(folder), base)
        assert len(ad.modules) == 210 and ad.rank == 8 and ad.alpha == 16 and ad.warnings == []
        f = ad.modules["model.layers.29.mlp.down_proj"]
        assert f.A.dtype == torch.float32 and tuple(f.A.shape) == (8, 1536) and tuple(f.B.shape) == (576, 8)
        assert f.scaling == 2.0 and float(f.B.abs().sum()) > 0
        hashes.add(ad.content_sha256)
    assert len(hashes) == 8


# ---- rejections, in load_adapter's order ----------------------------------------------------------


def test_missing_config(bad, tiny_base):
    (bad / "adapter_config.json").unlink()
    _reject(bad, tiny_base, "bad/adapter_config.json", "missing")


def test_invalid_config_json(bad, tiny_base):
    (bad / "adapter_config.json").write_text('{"r": 4,')
    _reject(bad, tiny_base, "bad/adapter_config.json", "invalid JSON")
    with pytest.raises(AdapterError, match="invalid JSON"):
        read_adapter_config(bad)


def test_not_lora(bad, tiny_base):
    edit_config(bad, peft_type="IA3")
    _reject(bad, tiny_base, "adapter_config.json", "'IA3'", "only LORA")


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("use_dora", True, "DoRA"),
        ("use_qalora", True, "QALoRA"),
        ("layer_replication", [[0, 2]], "layer_replication"),
        ("target_parameters", ["mlp.experts.down_proj"], "target_parameters"),
        ("use_bdlora", {"target_modules_bd_a": ["q_proj"]}, "BD-LoRA"),
        ("alora_invocation_tokens", [5, 6], "aLoRA"),
        ("trainable_token_indices", [1, 2], "trainable_token_indices"),
    ],
)
def test_unsupported_variants_by_name(bad, tiny_base, key, value, needle):
    edit_config(bad, **{key: value})
    _reject(bad, tiny_base, "adapter_config.json", needle, key)


@pytest.mark.parametrize(
    "suffix,needle",
    [
        ("lora_magnitude_vector", "DoRA magnitude vector"),
        ("lora_embedding_A", "embedding LoRA"),
        ("something_else.weight", "unknown weight key"),
    ],
)
def test_unsupported_weight_keys(bad, tiny_base, suffix, needle):
    key = f"base_model.model.{Q0}.{suffix}"
    edit_weights(bad, lambda t: {**t, key: torch.ones(64)})
    _reject(bad, tiny_base, "adapter_model.safetensors", needle, key)


def test_pickle_weights_refused_unread(bad, tiny_base):
    (bad / "adapter_model.safetensors").unlink()
    # not even a valid pickle: proves the file is never opened by an unpickler
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04 this would explode if unpickled")
    _reject(bad, tiny_base, "adapter_model.bin", "never unpickled", "convert", "safetensors")


def test_missing_weights(bad, tiny_base):
    (bad / "adapter_model.safetensors").unlink()
    _reject(bad, tiny_base, "adapter_model.safetensors", "missing")


def _write_raw(folder, data: bytes) -> None:
    (folder / "adapter_model.safetensors").write_bytes(data)


def _raw_parts(folder):
    raw = (folder / "adapter_model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_header_too_short(bad, tiny_base):
    _write_raw(bad, b"\x01\x02\x03")
    _reject(bad, tiny_base, "adapter_model.safetensors", "truncated", "3 bytes")


def test_header_oversized(bad, tiny_base):
    _write_raw(bad, struct.pack("<Q", 200 * 1024 * 1024) + b"{}")
    _reject(bad, tiny_base, "adapter_model.safetensors", "exceeds", "limit")


def test_header_beyond_file(bad, tiny_base):
    _write_raw(bad, struct.pack("<Q", 5000) + b'{"a": 1}')
    msg = _reject(bad, tiny_base, "adapter_model.safetensors", "truncated", "the file's 16 bytes")
    assert "5000" not in msg  # the claimed length is the file's first 8 bytes: not echoed


def test_header_corrupt_json(bad, tiny_base):
    _write_raw(bad, struct.pack("<Q", 6) + b"{nope!")
    _reject(bad, tiny_base, "adapter_model.safetensors", "corrupt safetensors header")


def test_truncated_data(bad, tiny_base):
    raw = (bad / "adapter_model.safetensors").read_bytes()
    _write_raw(bad, raw[:-100])
    _reject(bad, tiny_base, "adapter_model.safetensors", "outside the", "data section")


def test_unknown_dtype(bad, tiny_base):
    header, data = _raw_parts(bad)
    header[KEY_A]["dtype"] = "F128"
    _write_raw(bad, _pack(header, data))
    _reject(bad, tiny_base, "adapter_model.safetensors", KEY_A, "unknown dtype 'F128'")


def test_shape_disagrees_with_byte_count(bad, tiny_base):
    header, data = _raw_parts(bad)
    header[KEY_A]["shape"] = [4, 65]
    _write_raw(bad, _pack(header, data))
    _reject(bad, tiny_base, "adapter_model.safetensors", KEY_A, "(4, 65)")


@pytest.mark.parametrize("drop,have,miss", [(KEY_B, "lora_A", "lora_B"), (KEY_A, "lora_B", "lora_A")])
def test_unpaired_factor(bad, tiny_base, drop, have, miss):
    edit_weights(bad, lambda t: {k: v for k, v in t.items() if k != drop})
    _reject(bad, tiny_base, "adapter_model.safetensors", Q0, f"{have} without its {miss}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite(bad, tiny_base, value):
    def poison(t):
        b = t[KEY_B].clone()
        b[3, 1] = value
        return {**t, KEY_B: b}

    edit_weights(bad, poison)
    _reject(bad, tiny_base, "adapter_model.safetensors", Q0, "NaN/Inf", "(64, 4)")


def test_rank_disagrees_with_config(bad, tiny_base):
    edit_config(bad, r=6)
    _reject(bad, tiny_base, "adapter_model.safetensors", "lora_A (4, 64)", "lora_B (64, 4)", "r=6")


def test_rank_pattern_disagrees_with_weights(bad, tiny_base):
    edit_config(bad, rank_pattern={"q_proj": 2})
    _reject(bad, tiny_base, "adapter_model.safetensors", Q0, "r=2", "(4, 64)")


def test_target_module_absent_from_base(bad, tiny_base_dir):
    cfg = json.loads((tiny_base_dir / "config.json").read_text())
    one_layer = base_model_from_config(dict(cfg, num_hidden_layers=1), "tiny-org/tiny-llama-1layer")
    _reject(bad, one_layer, "adapter_model.safetensors", "model.layers.1.", "not a linear module", "tiny-llama-1layer")


def test_shapes_do_not_fit_base(bad):
    wide = base_model_from_config(
        dict(model_type="llama", **{**TINY_LLAMA, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3}),
        "other-org/wide-llama",
    )
    _reject(
        bad,
        wide,
        "adapter_model.safetensors",
        "do not fit",
        "other-org/wide-llama",
        "tiny-org/tiny-llama",
        Q0,
        "lora_A (4, 64)",
        "needs A (4, 96) and B (96, 4)",
    )


def test_non_2d_factor(bad, tiny_base):
    edit_weights(bad, lambda t: {**t, KEY_A: t[KEY_A].reshape(4, 64, 1, 1)})
    _reject(bad, tiny_base, "adapter_model.safetensors", Q0, "(4, 64, 1, 1)", "not 2-D")
