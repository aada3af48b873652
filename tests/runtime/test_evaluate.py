"""Routing accuracy, LM loss and switching measured on tiny models whose right answers are known."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spectr.pipeline.spectra import exact_spectrum
from spectr.runtime.spectrum import AdapterSpectra
from spectr.runtime import load_bundle, trace_routing, write_bundle
from spectr.runtime.evaluate import (
    apply_preset,
    mixed_batches,
    pad_batches,
    pad_id_of,
    read_jsonl,
    resolve_mapping,
    routing_accuracy,
    switch_latency,
    switching,
    tokenize,
)
from spectr.runtime.presets import EVAL_PRESETS
from spectr.runtime.evaluate_lm import lm_losses
from tests.conftest import build_tiny_llama
from tests.runtime.helpers import base_of, bundle_from_adapters

ROUTED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WORDS = ["[UNK]", "[PAD]", "[EOS]"] + [f"w{i}" for i in range(125)]
ALPHA = [f"w{i}" for i in range(0, 20)]  # token ids 3..22: embeddings in coordinates 0..31
BETA = [f"w{i}" for i in range(20, 40)]  # token ids 23..42: embeddings in coordinates 32..63


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def subspace_model():
    """A tiny Llama whose residual stream is its embeddings at every layer (o_proj, down_proj zeroed).

    Alpha words embed in coordinates 0..31, beta words (and [PAD]) in 32..63, so the input of every
    q/k/v/gate/up module of an alpha token lies in expert ea's input subspace and is orthogonal to eb's.
    [PAD] sits in eb's subspace: counting pads would lower alpha's accuracy.
    """
    model = build_tiny_llama(seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        vocab = {w: i for i, w in enumerate(WORDS)}
        for w in ALPHA:
            emb[vocab[w], 32:] = 0
        for w in BETA + ["[PAD]"]:
            emb[vocab[w], :32] = 0
    return model


def subspace_bundle(path: Path, model, names=("ea", "eb")) -> Path:
    """Two rank-2 experts on every q/k/v/gate/up module: ea reads coordinates 0..31, eb 32..63."""
    g = torch.Generator().manual_seed(7)
    modules = [f"model.layers.{i}.{'self_attn' if m.endswith(('q_proj', 'k_proj', 'v_proj')) else 'mlp'}.{m}"
               for i in range(len(model.model.layers)) for m in ROUTED]
    experts = []
    for e, name in enumerate(names):
        spectra = {}
        for m in modules:
            lin = model.get_submodule(m)
            A = torch.randn(2, lin.in_features, generator=g)
            keep = torch.zeros(lin.in_features)
            keep[32 * e : 32 * (e + 1)] = 1
            B = torch.randn(lin.out_features, 2, generator=g) * 0.1
            spectra[m] = exact_spectrum(A * keep, B, 1.0)
        info = {"name": name, "version": 1, "content_sha256": "0" * 64, "rank": 2, "alpha": 2}
        experts.append((info, AdapterSpectra(spectra, "exact", {})))
    return write_bundle(path, base=base_of(model, modules), experts=experts)


def words(pool: list[str], n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(pool[int(i)] for i in torch.randint(len(pool), (n,), generator=g))


# Documents of different lengths, so every batch is padded.
DATA = {"ea": [words(ALPHA, n, s) for s, n in enumerate((5, 9, 3, 12, 7))],
        "eb": [words(BETA, n, 10 + s) for s, n in enumerate((4, 11, 6))]}


@pytest.fixture(scope="module")
def subspace(tmp_path_factory):
    model = subspace_model()
    bundle = subspace_bundle(tmp_path_factory.mktemp("sub") / "bundle", model)
    load_bundle(model, bundle)
    return model, word_tokenizer()


def test_accuracy_is_one_when_each_domain_lies_in_its_experts_subspace(subspace):
    model, tok = subspace
    res = routing_accuracy(model, tok, DATA, routers=["reference", "peft-arrow", "reference-sigma"], top_k=1, batch_size=2)
    assert set(res) == {"reference", "peft-arrow", "reference-sigma"}
    for r in res.values():
        assert r["top1"] == {"ea": 1.0, "eb": 1.0, "macro": 1.0}
        assert r["topk"]["macro"] == 1.0 and r["k"] == 1 and r["chance_top1"] == 0.5
        assert r["confusion"] == {"ea": {"ea": 1.0, "eb": 0.0}, "eb": {"ea": 0.0, "eb": 1.0}}
        assert set(r["per_layer"]) == {"0", "1"} and set(r["per_module"]) == set(ROUTED)
        assert all(v["top1"]["macro"] == 1.0 for v in r["per_module"].values())
        # Only real tokens count: (tokens of the domain) x (2 layers x 5 modules) decisions.
        assert r["decisions"] == {"ea": (5 + 9 + 3 + 12 + 7) * 10, "eb": (4 + 11 + 6) * 10}
    assert res["peft-arrow"]["config"]["combine"] == "mix" and res["reference-sigma"]["config"]["score"] == "sigma"
    json.dumps(res)  # plain, JSON-serialisable


def test_pads_would_count_against_alpha(subspace):
    """Sanity of the construction: the [PAD] token itself is routed to eb, so the test above sees no pads."""
    model, tok = subspace
    ids = torch.full((1, 4), tok.pad_token_id)
    with torch.no_grad(), trace_routing(model) as trace:
        model(ids)
    assert all((trace.choices(m)[0][..., 0] == 1).all() for m in trace.calls)


def test_mapping_by_name_or_explicit(subspace):
    model, tok = subspace
    data = {"left": DATA["ea"], "right": DATA["eb"]}
    with pytest.raises(ValueError, match="--map left=EXPERT"):
        routing_accuracy(model, tok, data, routers=["reference"])
    swapped = routing_accuracy(model, tok, data, mapping={"left": "eb", "right": "ea"}, routers=["reference"], top_k=2)
    assert swapped["reference"]["top1"] == {"left": 0.0, "right": 0.0, "macro": 0.0}
    assert swapped["reference"]["topk"]["macro"] == 1.0  # k = 2 of E = 2: every expert is in the top-k
    with pytest.raises(ValueError, match="no expert 'ec'"):
        resolve_mapping(["left"], ["ea", "eb"], {"left": "ec"})


@pytest.fixture(scope="module")
def random_setup(tmp_path_factory, make_adapter):
    """A random tiny Llama and two random PEFT experts (all linear modules), as a bundle."""
    folders = [make_adapter("eval-red", seed=41), make_adapter("eval-blue", seed=42)]
    model = build_tiny_llama()
    bundle = bundle_from_adapters(tmp_path_factory.mktemp("rand") / "bundle", folders, model)
    data = {"eval-red": [words(WORDS[3:], n, 50 + n) for n in (6, 10, 3, 8)],
            "eval-blue": [words(WORDS[3:], n, 80 + n) for n in (7, 2, 12)]}
    return model, bundle, folders, data


def test_accuracy_matches_a_hand_count_per_document(random_setup):
    model, bundle, _, data = random_setup
    tok = word_tokenizer()
    load_bundle(model, bundle, top_k=2)
    try:
        got = routing_accuracy(model, tok, data, routers=["reference"], top_k=2, batch_size=3)["reference"]
        # By hand: each document alone (no padding), every recorded decision counted.
        for e, (d, texts) in enumerate(data.items()):
            hit1 = hitk = n = 0
            layer0 = [0, 0]
            for t in texts:
                ids = torch.tensor([tok(t)["input_ids"]])
                with torch.no_grad(), trace_routing(model) as trace:
                    model(ids)
                for m in trace.calls:
                    idx = trace.choices(m)[0]
                    hit1 += int((idx[..., 0] == e).sum())
                    hitk += int((idx == e).any(-1).sum())
                    n += idx.shape[1]
                    if ".layers.0." in m:
                        layer0[0] += int((idx[..., 0] == e).sum())
                        layer0[1] += idx.shape[1]
            assert got["top1"][d] == pytest.approx(hit1 / n)
            assert got["topk"][d] == pytest.approx(hitk / n) == 1.0  # k = E
            assert got["per_layer"]["0"]["top1"][d] == pytest.approx(layer0[0] / layer0[1])
            assert got["decisions"][d] == n
        assert 0.0 < got["top1"]["macro"] < 1.0  # random experts: a real mix, not a degenerate answer
        assert got["top1"]["macro"] == pytest.approx((got["top1"]["eval-red"] + got["top1"]["eval-blue"]) / 2)
    finally:
        from spectr.runtime import unload_bundle

        unload_bundle(model)


def _per_domain_counts(model, tok, data: dict[str, list[str]], batch_size: int) -> dict:
    """routing_accuracy's counts as it computed them before domains shared batches: each domain's documents
    in batches of their own (pad_batches), every recorded decision of a real token counted."""
    names = model.spectr.bundle.expert_names
    out = {}
    for d, texts in data.items():
        e = names.index(d)
        per_module: dict[str, list[int]] = {}
        conf = torch.zeros(len(names), dtype=torch.long)
        for ids, mask in pad_batches(tokenize(tok, texts, 128), batch_size, pad_id_of(tok)):
            real = mask.bool()
            with torch.no_grad(), trace_routing(model) as trace:
                model.model(input_ids=ids, attention_mask=mask)
            for m in trace.calls:
                idx = trace.choices(m)[0]
                c = per_module.setdefault(m, [0, 0, 0])
                c[0] += int((idx[..., 0] == e)[real].sum())
                c[1] += int((idx == e).any(-1)[real].sum())
                c[2] += int(real.sum())
                conf += torch.bincount(idx[..., 0][real], minlength=len(names))
        out[d] = (per_module, conf)
    return out


@pytest.fixture(scope="module")
def four_experts(tmp_path_factory, make_adapter):
    """A random tiny Llama with four random experts; domains named after them, documents of mixed lengths."""
    folders = [make_adapter(f"mix-{i}", seed=60 + i) for i in range(4)]
    model = build_tiny_llama()
    bundle = bundle_from_adapters(tmp_path_factory.mktemp("mix") / "bundle", folders, model)
    lengths = {0: (14, 3, 9), 1: (2, 5), 2: (12, 12, 7, 1), 3: (6,)}
    data = {f.name: [words(WORDS[3:], n, 10 * i + j) for j, n in enumerate(lengths[i])] for i, f in enumerate(folders)}
    load_bundle(model, bundle)
    yield model, word_tokenizer(), data
    from spectr.runtime import unload_bundle

    unload_bundle(model)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_mixed_batches_give_the_per_domain_counts(four_experts, batch_size):
    """Domains sharing batches (mixed_batches) change no decision and no count: every preset of `spectr eval
    routing` gives exactly what batches of one domain each gave (E = 4, so k = 1, 3 and 4 all matter)."""
    model, tok, data = four_experts
    names = model.spectr.bundle.expert_names
    got = routing_accuracy(model, tok, data, batch_size=batch_size)
    assert list(got) == list(EVAL_PRESETS)
    mixed = [dom.unique().numel() for _, _, dom in
             mixed_batches({d: tokenize(tok, t, 128) for d, t in data.items()}, batch_size, pad_id_of(tok))]
    assert max(mixed) > 1  # some batch really holds documents of several domains
    for preset, res in got.items():
        apply_preset(model, preset)
        want = _per_domain_counts(model, tok, data, batch_size=2)
        for d, (per_module, conf) in want.items():
            n = sum(c[2] for c in per_module.values())
            assert res["decisions"][d] == n == 14 * sum(len(t.split()) for t in data[d])  # 2 layers x 7 modules
            assert res["top1"][d] == sum(c[0] for c in per_module.values()) / n
            assert res["topk"][d] == sum(c[1] for c in per_module.values()) / n
            assert res["confusion"][d] == {x: int(conf[i]) / int(conf.sum()) for i, x in enumerate(names)}
            layer0 = [c for m, c in per_module.items() if ".layers.0." in m]
            assert res["per_layer"]["0"]["top1"][d] == sum(c[0] for c in layer0) / sum(c[2] for c in layer0)
        assert 0.0 < res["top1"]["macro"] < 1.0
        assert res["k"] == {"reference": 4, "peft-arrow": 3, "default": 1}[preset]
        if res["k"] < 4:
            assert res["topk"]["macro"] < 1.0  # top-k over fewer than E experts: a real count, not trivially 1


def _hand_loss(model, tok, texts) -> float:
    total = count = 0.0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            if ids.shape[1] < 2:
                continue
            total += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


def test_lm_loss_rows_match_transformers_and_peft(random_setup):
    from peft import PeftModel

    model, bundle, folders, data = random_setup
    tok = word_tokenizer()
    res = lm_losses(model, tok, data, bundle, ks=(1, 2, 4), batch_size=3)
    assert not hasattr(model, "spectr")  # unloaded again
    rows = res["rows"]
    assert list(rows) == ["base", "expert:eval-red", "expert:eval-blue", "oracle", "uniform", "peft-arrow k=2",
                          "reference k=1", "reference mix k=1", "reference k=2", "reference mix k=2", "default"]
    for d, texts in data.items():
        assert rows["base"][d] == pytest.approx(_hand_loss(model, tok, texts), rel=1e-5)
        assert res["tokens"][d] == sum(len(t.split()) - 1 for t in texts)
    peft = PeftModel.from_pretrained(build_tiny_llama(), folders[1]).eval()
    for d, texts in data.items():
        assert rows["expert:eval-blue"][d] == pytest.approx(_hand_loss(peft, tok, texts), rel=1e-4)
    assert rows["oracle"]["eval-blue"] == rows["expert:eval-blue"]["eval-blue"]
    assert rows["oracle"]["eval-red"] == rows["expert:eval-red"]["eval-red"]
    # Uniform merge: W + mean_i(s_i B_i A_i) in a plain transformers model.
    merged = build_tiny_llama()
    with torch.no_grad():
        for f in folders:
            sd = load_file(f / "adapter_model.safetensors")
            for key, A in sd.items():
                if ".lora_A." in key:
                    B = sd[key.replace(".lora_A.", ".lora_B.")]
                    lin = merged.get_submodule(key.removeprefix("base_model.model.").split(".lora_A.")[0])
                    lin.weight += (8 / 4) * (B @ A) / len(folders)
    for d, texts in data.items():
        assert rows["uniform"][d] == pytest.approx(_hand_loss(merged, tok, texts), rel=1e-4)
    # With k = E = 2 both SpectR modes apply every expert; factor merge and output mix still differ.
    assert rows["reference mix k=2"]["macro"] != rows["reference k=2"]["macro"]
    assert all(r["macro"] == pytest.approx(sum(r[d] for d in data) / 2) for r in rows.values())


def test_lm_no_cross_runs_experts_only_on_their_domain(random_setup):
    model, bundle, _, data = random_setup
    res = lm_losses(model, word_tokenizer(), data, bundle, ks=(1,), cross=False)
    assert set(res["rows"]["expert:eval-red"]) == {"eval-red"}
    assert set(res["rows"]["oracle"]) == {"eval-red", "eval-blue", "macro"}


def test_switch_latency_definition():
    assert switch_latency([0.1, 0.3, 0.8, 0.95, 0.5], 0.9) == 3
    assert switch_latency([0.9, 0.1], 0.9) == 0
    assert switch_latency([0.1, 0.2], 0.9) is None


def test_switching_on_constructed_sequences(subspace):
    model, tok = subspace
    data = {"ea": [words(ALPHA, 40, 1)], "eb": [words(BETA, 40, 2)]}
    res = switching(model, tok, data, routers=["reference"], top_k=1, prefix_tokens=6, suffix_tokens=5, sequences=3)
    ab = res["reference"]["pairs"]["ea->eb"]
    # Routing depends on the current token only here, so the switch is immediate and complete.
    assert ab["latency"] == 0 and not ab["censored"] and ab["sequences"] == 3
    assert ab["curve_b"] == [1.0] * 5 and ab["curve_a"] == [0.0] * 5
    assert ab["before_a"] == 1.0 and ab["reference"] == 1.0
    assert set(res["reference"]["pairs"]) == {"ea->eb", "eb->ea"} and res["reference"]["mean_latency"] == 0.0
    with pytest.raises(ValueError, match="fewer than one segment"):
        switching(model, tok, {"ea": ["w0 w1"], "eb": data["eb"]}, prefix_tokens=6, suffix_tokens=5)


def test_read_jsonl_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "w1 w2", "domain": "x"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: expected an object"):
        read_jsonl(f)
    assert read_jsonl(f, max_docs=1) == ["w1 w2"]
    f.write_text("not json\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: not JSON"):
        read_jsonl(f)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets").is_dir(),
                    reason="../shared is absent")
def test_shared_datasets_read():
    shared = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"
    texts = read_jsonl(shared / "math_dm" / "test.jsonl", max_docs=3)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)



def test_shared_forward_is_exact_for_its_own_preset(four_experts):
    """One routed forward for every router: the forward's own preset (the runtime's default) counts exactly
    what its own forward counts, and the watchers report their own settings and k."""
    model, tok, data = four_experts
    shared = routing_accuracy(model, tok, data, batch_size=2, shared_forward=True)
    alone = routing_accuracy(model, tok, data, batch_size=2, routers=["default"])
    assert list(shared) == list(EVAL_PRESETS) and {r["forward"] for r in shared.values()} == {"default"}
    assert {k: v for k, v in shared["default"].items()} == alone["default"]
    assert [shared[r]["k"] for r in EVAL_PRESETS] == [4, 3, 1]
    assert shared["reference"]["config"]["pool"] == "module" and shared["peft-arrow"]["config"]["router"] == "arrow"


def test_shared_forward_equals_own_forwards_when_the_experts_change_nothing(four_experts):
    """With every expert's scaling zeroed the routed forward is the base forward whatever the router picks, so
    watching one forward must give each preset exactly the counts of its own forward (pooling, k, arrow)."""
    model, tok, data = four_experts
    live = [model.get_submodule(m) for m in model.spectr.modules]
    kept = [m.s.clone() for m in live]
    try:
        for m in live:
            m.s.zero_()
        routers = [*EVAL_PRESETS, "reference-pooled"]
        shared = routing_accuracy(model, tok, data, batch_size=3, routers=routers, shared_forward=True)
        own = routing_accuracy(model, tok, data, batch_size=3, routers=routers)
        for r in routers:
            assert shared[r]["forward"] == "default" and own[r]["forward"] == r
            assert {k: v for k, v in shared[r].items() if k != "forward"} == \
                {k: v for k, v in own[r].items() if k != "forward"}, r
        assert shared["reference"]["top1"] != shared["default"]["top1"]  # the presets really decide differently
    finally:
        for m, s in zip(live, kept):
            m.s.copy_(s)


def test_watchers_leave_the_models_weights_alone(four_experts):
    """Watchers share the model's base layers: building and closing them moves no base weight's storage."""
    from spectr.runtime.evaluate import Watchers

    model, _, _ = four_experts
    live = [model.get_submodule(m).base_layer.weight for m in model.spectr.modules]
    before = [(w.data_ptr(), w.clone()) for w in live]
    watchers = Watchers(model, ["reference", "peft-arrow"])
    watchers.close()
    assert [(w.data_ptr(), torch.equal(w, c)) for w, (_, c) in zip(live, before)] == [(p, True) for p, _ in before]
