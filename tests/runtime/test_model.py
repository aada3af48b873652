"""Routed transformers models: plain LoRA equals PEFT, uniform equals the mean, unwrap, generate, dtypes."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from spectr.runtime import load_bundle, read_bundle, unload_bundle, write_bundle
from spectr.runtime.layer import RoutedLinear
from tests.conftest import build_tiny_llama
from tests.layers import forbidden_imports, loaded_after_import
from tests.runtime.helpers import bundle_from_adapters, spectra_from_adapter

NAMES = ("alpha", "beta", "gamma")
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 120, 1, 77]])


@pytest.fixture(scope="module")
def adapters(make_adapter):
    return [make_adapter(n, seed=i + 10) for i, n in enumerate(NAMES)]


@pytest.fixture(scope="module")
def bundle_dir(adapters, tmp_path_factory):
    return bundle_from_adapters(tmp_path_factory.mktemp("bundles") / "three", adapters, build_tiny_llama())


def peft_model(folders, names=None):
    from peft import PeftModel

    model = PeftModel.from_pretrained(build_tiny_llama(), folders[0], adapter_name=(names or NAMES)[0])
    for folder, name in zip(folders[1:], (names or NAMES)[1:]):
        model.load_adapter(folder, adapter_name=name)
    return model.eval()


@torch.no_grad()
def test_fixed_router_equals_peft_lora(adapters, bundle_dir):
    routed = load_bundle(build_tiny_llama(), bundle_dir, router="fixed", expert="beta")
    peft = peft_model(adapters)
    peft.set_adapter("beta")
    want, base = peft(IDS).logits, build_tiny_llama()(IDS).logits
    assert (want - base).abs().max() > 1e-2  # the adapter really changes the logits
    assert (routed(IDS).logits - want).abs().max() <= 1e-5


@torch.no_grad()
def test_uniform_output_mix_equals_mean_of_peft_outputs(adapters, bundle_dir):
    routed = load_bundle(build_tiny_llama(), bundle_dir, router="uniform", combine="mix")
    peft = peft_model(adapters)
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0))
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        if m.endswith("down_proj"):
            x = torch.randn(2, 6, 128, generator=torch.Generator().manual_seed(1))
        layer = peft.base_model.model.get_submodule(m)
        outs = []
        for n in NAMES:
            peft.set_adapter(n)
            outs.append(layer(x))
        mean = torch.stack(outs).mean(0)
        assert (outs[0] - outs[1]).abs().max() > 1e-3
        assert (routed.get_submodule(m)(x) - mean).abs().max() <= 1e-5


@torch.no_grad()
def test_unload_restores_the_model_exactly(bundle_dir):
    model = build_tiny_llama()
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before_mods = dict(model.named_modules())
    before = model(IDS).logits
    load_bundle(model, bundle_dir, router="spectr", top_k=2)
    assert sum(isinstance(m, RoutedLinear) for m in model.modules()) == 14
    assert (model(IDS).logits - before).abs().max() > 1e-3
    unload_bundle(model)
    assert dict(model.named_modules()).keys() == before_mods.keys()
    assert all(model.get_submodule(n) is m for n, m in before_mods.items() if n)
    after_sd = model.state_dict()
    assert after_sd.keys() == before_sd.keys() and all(torch.equal(after_sd[k], before_sd[k]) for k in before_sd)
    assert torch.equal(model(IDS).logits, before)
    assert not hasattr(model, "spectr")


def test_shape_mismatch_is_refused_before_wrapping(bundle_dir):
    model = build_tiny_llama(intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj.*in=.*bundle expects"):
        load_bundle(model, bundle_dir)
    assert not any(isinstance(m, RoutedLinear) for m in model.modules())
    with pytest.raises(ValueError, match="missing from the model"):
        load_bundle(build_tiny_llama(num_hidden_layers=1), bundle_dir)


def test_bundle_round_trip_is_bit_identical(adapters, bundle_dir, tmp_path):
    b = read_bundle(bundle_dir)
    again = bundle_from_adapters(tmp_path / "again", adapters, build_tiny_llama())
    for f in ("manifest.json", "spectra.safetensors"):
        assert (again / f).read_bytes() == (bundle_dir / f).read_bytes()
    sp = spectra_from_adapter(adapters[1])
    m = "model.layers.1.self_attn.v_proj"
    r = b.modules[m]["rank"]
    assert torch.equal(b.tensors[f"{m}.Vt"][r:2 * r], sp.modules[m].V.T)
    assert torch.equal(b.tensors[f"{m}.U"][:, r:2 * r], sp.modules[m].U)
    assert b.expert_names == list(NAMES)
    assert b.manifest["experts"][0]["rank"] == 4
    # a damaged spectra file is refused by its hash
    bad = tmp_path / "again" / "spectra.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        read_bundle(tmp_path / "again")


def test_experts_lacking_a_module_and_unequal_ranks(make_adapter, tmp_path):
    a = make_adapter("attn-r2", seed=3, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    b = make_adapter("all-r6", seed=4, r=6, lora_alpha=6)
    bundle = read_bundle(bundle_from_adapters(tmp_path / "mixed", [a, b], build_tiny_llama()))
    m = "model.layers.0.mlp.up_proj"
    assert bundle.tensors[f"{m}.rank"].tolist() == [0, 6]
    assert bundle.modules["model.layers.0.self_attn.q_proj"]["rank"] == 6
    # fixed on the attention-only expert equals PEFT with that adapter
    from peft import PeftModel

    with torch.no_grad():
        want = PeftModel.from_pretrained(build_tiny_llama(), a).eval()(IDS).logits
        got = load_bundle(build_tiny_llama(), bundle, router="fixed", expert="attn-r2")(IDS).logits
        assert (got - want).abs().max() <= 1e-5
        # top_k=2 where only one expert adapts: it alone gets the weight, so spectr equals fixed all-r6 there
        routed = load_bundle(build_tiny_llama(), bundle, router="spectr", top_k=2)
        x = torch.randn(3, 64)
        full = routed.get_submodule(m)
        dy, vals, idx = full.delta(x)
        assert torch.isinf(vals[:, 1]).all() and (idx[:, 0] == 1).all()
        from spectr.runtime import set_router

        set_router(routed, router="fixed", expert="all-r6")
        torch.testing.assert_close(dy, full.delta(x)[0])
        set_router(routed, router="fixed", expert="attn-r2")
        assert full.delta(x)[0].abs().max() == 0  # attn-r2 does not adapt the MLP


@torch.no_grad()
@pytest.mark.parametrize("router", ["spectr", "arrow"])
def test_generate_with_cache_equals_without(bundle_dir, router):
    model = load_bundle(build_tiny_llama(), bundle_dir, router=router, top_k=2)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    from spectr.runtime import trace_routing

    with trace_routing(model) as trace:
        cached = model.generate(IDS, use_cache=True, **kw)
    steps = [i.shape[1] for i, _ in trace.calls["model.layers.0.self_attn.q_proj"]]
    assert steps == [IDS.shape[1]] + [1] * 7  # prefill, then each new token is routed on its own
    plain = model.generate(IDS, use_cache=False, **kw)
    assert cached.shape[1] == IDS.shape[1] + 8
    assert torch.equal(cached, plain)


@torch.no_grad()
def test_padded_batch_equals_single_rows(bundle_dir):
    model = load_bundle(build_tiny_llama(), bundle_dir, router="spectr", top_k=2, combine="factor")
    rows = [IDS[0, :10], IDS[0, 2:7]]
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    batch = model(ids, attention_mask=mask).logits
    for i, r in enumerate(rows):
        single = model(r[None]).logits[0]
        assert (batch[i, : len(r)] - single).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_smoke(bundle_dir, dtype):
    # fixed routing cannot flip a decision; spectr at its defaults (top-1) may flip a near-tie now and then.
    # (At k > 1 with softmax weights, bf16 flips near-ties of the weights too: see docs/RESULTS.md.)
    for kw in (dict(router="fixed", expert="gamma"), dict(router="spectr")):
        ref = load_bundle(build_tiny_llama(), bundle_dir, **kw)(IDS).logits
        model = load_bundle(build_tiny_llama().to(dtype), bundle_dir, **kw)
        assert model.model.layers[0].self_attn.q_proj.Vt.dtype == dtype
        got = model(IDS).logits
        assert got.dtype == dtype and torch.isfinite(got).all()
        if kw["router"] == "fixed":
            assert (got.float() - ref).abs().max() < 0.1 * ref.abs().max()
        else:
            assert (got.float() - ref).abs().max() < 0.25 * ref.abs().max()


def test_runtime_imports_no_heavy_packages():
    code = (
        "import sys; from spectr import load_bundle, RouterConfig; import spectr.runtime; "
        "bad = [m for m in ('prefect', 'sqlalchemy', 'duckdb', 'spectr.registry', 'spectr.flows', "
        "'spectr.pipeline') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
    # Every runtime module, loaded for real, and every import statement in runtime/ (lazy ones and
    # TYPE_CHECKING ones too): the runtime sits below pipeline, registry and flows.
    upper = ("spectr.pipeline", "spectr.registry", "spectr.flows", "prefect", "sqlalchemy", "duckdb")
    assert loaded_after_import("spectr.runtime", upper) == []
    assert forbidden_imports("runtime", upper) == []


@torch.no_grad()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("apply", ["dense", "grouped"])
def test_cuda_matches_cpu(bundle_dir, apply):
    kw = dict(router="spectr", top_k=2, apply=apply)
    ref = load_bundle(build_tiny_llama(), bundle_dir, **kw)(IDS).logits
    model = load_bundle(build_tiny_llama().cuda(), bundle_dir, **kw)
    assert model.model.layers[0].mlp.up_proj.US.is_cuda
    assert (model(IDS.cuda()).logits.cpu() - ref).abs().max() <= 1e-4
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS.cuda(), use_cache=True, **gen),
                       model.generate(IDS.cuda(), use_cache=False, **gen))
    half = load_bundle(build_tiny_llama().to("cuda", torch.bfloat16), bundle_dir, **kw)
    assert torch.isfinite(half(IDS.cuda()).logits).all()


@pytest.mark.parametrize("name", ["../../etc/passwd", "/dev/zero", "..", "sub/spectra.safetensors"])
def test_bundle_manifest_cannot_name_files_outside_the_bundle(bundle_dir, tmp_path, name):
    import json
    import shutil

    copy = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["spectra"]["file"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is not a plain file name inside the bundle folder"):
        read_bundle(copy)


def test_bundle_spectra_file_that_is_a_device_or_too_large(bundle_dir, tmp_path):
    import shutil

    copy = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    spectra = copy / "spectra.safetensors"
    spectra.unlink()
    spectra.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        read_bundle(copy)
    spectra.unlink()
    with open(spectra, "wb") as f:
        f.truncate(1 << 34)  # sparse, 16 GiB claimed
    with pytest.raises(ValueError, match="than the .* its manifest allows"):
        read_bundle(copy)


def test_loading_on_another_architecture_with_matching_shapes_warns(bundle_dir):
    from transformers import MistralConfig, MistralForCausalLM

    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    other = MistralForCausalLM(MistralConfig(**TINY_LLAMA)).eval()
    with pytest.warns(UserWarning, match="bundle was built for base .*MistralForCausalLM"):
        load_bundle(other, bundle_dir)
    unload_bundle(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unload_bundle(load_bundle(build_tiny_llama(), bundle_dir))  # the right base: silent


def test_loading_on_a_base_with_another_config_warns_once_naming_both(bundle_dir, tiny_base_dir, tmp_path):
    """Same architecture and shapes, another config (say another fine-tune or rope): the library warns too,
    not only the CLI; the hash is the one the bundle records (config.json, volatile keys aside)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from spectr.digest import config_sha256
    from spectr.runtime import OtherBaseWarning

    recorded = config_sha256(json.loads((tiny_base_dir / "config.json").read_text()))
    same = copy_with_manifest(bundle_dir, tmp_path / "same", name="tiny-org/tiny-llama", config_sha256=recorded)
    other = copy_with_manifest(bundle_dir, tmp_path / "other", name="other-org/other-model", config_sha256="f" * 64)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    with pytest.warns(OtherBaseWarning) as caught:
        load_bundle(model, other)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "'other-org/other-model'" in text and "ffffffffffff" in text and recorded[:12] in text, text
    assert str(tiny_base_dir) in text, text
    unload_bundle(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unload_bundle(load_bundle(model, same))  # the recorded config: silent
        unload_bundle(load_bundle(build_tiny_llama(), other))  # built in memory: no config file to compare
    # A saved copy whose config only differs in volatile keys (dtype, transformers version) is the same base.
    noisy = Path(shutil.copytree(tiny_base_dir, tmp_path / "noisy"))
    cfg = json.loads((noisy / "config.json").read_text())
    (noisy / "config.json").write_text(json.dumps({**cfg, "transformers_version": "0.0.1", "dtype": "bfloat16"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unload_bundle(load_bundle(AutoModelForCausalLM.from_pretrained(noisy).eval(), same))


def copy_with_manifest(src: Path, dst: Path, **base: Any) -> Path:
    import shutil

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["base"].update(base)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@torch.no_grad()
def test_a_routed_model_saves_and_loads_its_base_weights_under_the_base_names(bundle_dir, tmp_path):
    """Routing state is never saved (non-persistent buffers), and the base weights keep the plain model's names:
    save_pretrained of a routed model gives back the base model, and a base state_dict loads into a routed one."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 99, 3, 42]])
    base = build_tiny_llama()
    plain = base.state_dict()
    want = base(ids).logits
    routed = load_bundle(build_tiny_llama(), bundle_dir)
    got = routed.state_dict()
    assert list(got) == list(plain) and all(torch.equal(got[k], plain[k]) for k in plain)
    routed.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert torch.allclose(again(ids).logits, want, atol=1e-6)
    # Another base's weights load into the routed model; it then routes exactly as that base with the bundle does.
    other = build_tiny_llama(seed=5)
    routed.load_state_dict(other.state_dict())
    fresh = load_bundle(build_tiny_llama(seed=5), bundle_dir)
    assert torch.allclose(routed(ids).logits, fresh(ids).logits, atol=1e-6)
    unload_bundle(routed)
    assert torch.equal(routed.model.layers[0].self_attn.q_proj.weight, other.model.layers[0].self_attn.q_proj.weight)
