"""`spectr serve`: the real openai client against the server on a tiny Llama with three experts (CPU).

One server for the whole module (in-process uvicorn on a free loopback port, always stopped).
"""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from typer.testing import CliRunner  # noqa: E402

from spectr.cli import app  # noqa: E402
from tests.conftest import build_tiny_llama  # noqa: E402
from tests.runtime.helpers import bundle_from_adapters  # noqa: E402

EXPERTS = ("red", "blue", "green")
PROMPTS = [" ".join(f"w{(7 * i + 3 * j) % 120 + 3}" for j in range(3 + i % 5)) for i in range(10)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base_dir, make_adapter):
    """(server url, model id, base folder, bundle folder, engine): a word-level tokenizer on the tiny Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from spectr.serve import Server
    from spectr.serve_engine import Engine

    root = tmp_path_factory.mktemp("serve")
    base = root / "tiny-llama"
    shutil.copytree(tiny_base_dir, base)
    words = ["[UNK]", "[PAD]", "[EOS]"] + [f"w{i}" for i in range(125)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(base)
    folders = [make_adapter(name, seed=40 + i) for i, name in enumerate(EXPERTS)]
    bundle = bundle_from_adapters(root / "bundle", folders, build_tiny_llama())
    engine = Engine.load(base, bundle, device="cpu", num_blocks=32, max_batch_tokens=256)
    server = Server(engine).start()
    try:
        yield server.url, engine.model_id, base, bundle, engine
    finally:
        server.stop()


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def complete(url: str, model: str, prompt: str, max_tokens: int = 8, spectr: dict | None = None):
    extra = {"spectr": spectr} if spectr is not None else None
    return client(url).completions.create(model=model, prompt=prompt, max_tokens=max_tokens, extra_body=extra)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_health_and_models(served):
    url, model, *_ = served
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    cards = client(url).models.list().data
    assert [c.id for c in cards] == [model]
    assert cards[0].model_extra["spectr"]["experts"] == list(EXPERTS)


def test_openai_client_chat_and_completions_match_routed_generate(served):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spectr.runtime import load_bundle

    url, model, base, bundle, _ = served
    tokenizer = AutoTokenizer.from_pretrained(base)
    routed = load_bundle(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), bundle)
    want = greedy(routed, tokenizer, PROMPTS[0])
    assert want  # something was generated

    c = client(url)
    done = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8)
    assert done.choices[0].text == want
    assert done.usage.completion_tokens == len(tokenizer(want).input_ids)
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, stream=True))
    assert streamed == want

    messages = [{"role": "user", "content": PROMPTS[0]}]  # no chat template: the content itself is the prompt
    chat = c.chat.completions.create(model=model, messages=messages, max_tokens=8)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == want
    chunks = list(c.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_each_get_their_text_alone(served):
    url, model, *_ = served
    alone = [complete(url, model, p).choices[0].text for p in PROMPTS]
    assert len(set(alone)) > 1  # different prompts, different texts: a mix-up between requests would show
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: complete(url, model, p).choices[0].text, PROMPTS))
    assert together == alone


def test_subset_routes_only_among_its_experts(served):
    url, model, *_ = served
    default = complete(url, model, PROMPTS[1], spectr={"summary": True}).model_extra["spectr"]["experts"]
    assert default and abs(sum(default.values()) - 1) < 1e-3
    subset = ["blue", "green"]
    with ThreadPoolExecutor(4) as pool:  # shares batches with default-routed requests
        futures = [pool.submit(complete, url, model, p, 8, {"experts": subset, "summary": True}) for p in PROMPTS[:2]]
        others = [pool.submit(complete, url, model, p, 8, {"summary": True}) for p in PROMPTS[2:4]]
        shares = [f.result().model_extra["spectr"]["experts"] for f in futures]
        [f.result() for f in others]
    for share in shares:
        assert share and set(share) <= set(subset), share
        assert abs(sum(share.values()) - 1) < 1e-3
    only_red = complete(url, model, PROMPTS[1], spectr={"experts": ["red"], "summary": True})
    assert only_red.model_extra["spectr"]["experts"] == {"red": 1.0}


def test_fixed_expert_equals_plain_peft_lora(served, make_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    url, model, base, *_ = served
    tokenizer = AutoTokenizer.from_pretrained(base)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_texts = [greedy(plain, tokenizer, p) for p in PROMPTS[:3]]
    peft = PeftModel.from_pretrained(plain, make_adapter("blue", seed=41)).eval()
    want = [greedy(peft, tokenizer, p) for p in PROMPTS[:3]]
    assert want != base_texts  # the expert changes the output, so the comparison means something
    with ThreadPoolExecutor(6) as pool:  # the fixed-expert requests share batches with default-routed ones
        fixed = [pool.submit(complete, url, model, p, 8, {"experts": ["blue"]}) for p in PROMPTS[:3]]
        [pool.submit(complete, url, model, p) for p in PROMPTS[3:6]]
        assert [f.result().choices[0].text for f in fixed] == want


def test_per_request_top_k_equals_the_model_loaded_with_that_k(served, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spectr import runtime
    from spectr.runtime import load_bundle

    seen = []  # the per-row k of every forward that had one: shared batches hold both 1 and 2
    real = runtime.set_token_top_k
    monkeypatch.setattr(runtime, "set_token_top_k", lambda m, k: (seen.append(k), real(m, k))[1])

    url, model, base, bundle, engine = served
    assert engine.top_k == 1  # the server routes with k=1; the k=2 requests bring their own
    tokenizer = AutoTokenizer.from_pretrained(base)
    want = {k: [greedy(load_bundle(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), bundle,
                                   top_k=k), tokenizer, p) for p in PROMPTS[:4]] for k in (1, 2)}
    assert want[1] != want[2]  # k changes the text, so the comparison means something
    with ThreadPoolExecutor(8) as pool:  # k=2 and k=1 requests share batches
        k2 = [pool.submit(complete, url, model, p, 8, {"top_k": 2}) for p in PROMPTS[:4]]
        k1 = [pool.submit(complete, url, model, p, 8, {"top_k": 1} if i % 2 else None)
              for i, p in enumerate(PROMPTS[:4])]
        assert [f.result().choices[0].text for f in k2] == want[2]
        assert [f.result().choices[0].text for f in k1] == want[1]
    assert any(k is not None and set(k.tolist()) == {1, 2} for k in seen)


def test_bad_requests_get_4xx_and_leave_others_alone(served):
    url, model, *_ = served
    want = complete(url, model, PROMPTS[2], max_tokens=12).choices[0].text
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, url, model, PROMPTS[2], 12)
        bad = [
            ({"spectr": {"experts": ["pink"]}}, 400, "pink"),
            ({"spectr": {"experts": []}}, 400, "non-empty"),
            ({"spectr": {"top_k": 0}}, 400, "top_k"),
            ({"spectr": {"top_k": "two"}}, 400, "top_k"),
            ({"spectr": {"top_k": 4}}, 400, "from 1 to 3 (the experts it may choose from), got 4"),
            ({"spectr": {"experts": ["red"], "top_k": 2}}, 400, "top_k"),
            ({"spectr": {"colour": 1}}, 400, "unknown fields"),
            ({"prompt": " ".join(["w5"] * 250), "max_tokens": 16}, 400, "context of 256"),
            ({"max_tokens": 0}, 400, "max_tokens"),
            ({"model": "gpt-4"}, 404, "gpt-4"),
        ]
        for extra, status, words in bad:
            body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 4, **extra}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == status and words in r.json()["error"]["message"], (extra, r.text)
        r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "x", "messages": [', timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError, match="unknown expert"):
            complete(url, model, PROMPTS[0], spectr={"experts": ["pink"]})
        assert running.result().choices[0].text == want


def test_client_leaving_mid_stream_frees_its_slot(served):
    url, model, *_, engine = served
    before = engine.cancelled
    body = {"model": model, "prompt": PROMPTS[3], "max_tokens": 240, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        data = 0
        for line in r.iter_lines():
            data += line.startswith("data:")
            if data == 3:
                break
        assert data == 3
    # The request is cancelled: it leaves the server's table and the scheduler long before 240 tokens.
    deadline = time.monotonic() + 60
    while (engine._live or engine.manager.batch_processor.scheduler.active_requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine._live
    assert engine.cancelled == before + 1  # it was cancelled, not run to its end
    assert not engine.manager.batch_processor.scheduler.active_requests
    assert complete(url, model, PROMPTS[3]).choices[0].text  # and the server still answers


runner = CliRunner()


def test_serve_cli_refuses_bad_arguments(tmp_path, served):
    _, _, base, bundle, _ = served
    result = runner.invoke(app, ["serve", "--base-model", str(base)])
    assert result.exit_code == 2 and "exactly one of --bundle" in result.output
    result = runner.invoke(app, ["serve", "--base-model", str(tmp_path / "nope"), "--bundle", str(bundle)])
    assert result.exit_code == 1 and "nope: no such folder" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["serve", "--base-model", str(base), "--bundle", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "nothing" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["serve", "--base-model", str(base), "--bundle", str(bundle), "--scoring", "fp4"])
    assert result.exit_code == 1 and "unknown scoring 'fp4'; expected one of exact, fp8" in result.output
    assert "Traceback" not in result.output


def test_engine_scores_in_fp8_when_asked(served):
    """Engine.load(scoring="fp8") (spectr serve --scoring fp8): the routed model scores with float8 V's."""
    from spectr.runtime import routing
    from spectr.serve_engine import Engine

    _, _, base, bundle, _ = served
    engine = Engine.load(base, bundle, device="cpu", num_blocks=32, max_batch_tokens=256, scoring="fp8")
    assert engine.model.spectr.config.scoring == "fp8"
    assert {m.Vt8.dtype for m in engine.model.modules() if getattr(m, "Vt8", None) is not None} == {routing.FP8}


def test_serve_cli_builds_the_bundle_from_the_registry(served, spectr_home, make_adapter, monkeypatch):
    """--experts NAME@V,...: the registry's versions become the served bundle (the server itself is not started)."""
    from spectr.pipeline.basemodel import resolve_base_model
    from spectr.pipeline.fetch import fetch
    from spectr.pipeline.persist import store_version, write_spectra_blob
    from spectr.pipeline.spectra import adapter_spectra
    from spectr.pipeline.validate import load_adapter
    from spectr.registry.store import Registry

    _, _, base, _, _ = served
    registry = Registry()
    info = resolve_base_model(base, name="tiny-org/tiny-llama")
    for name in ("red", "green"):
        adapter = load_adapter(fetch(str(make_adapter(name, seed=40 + EXPERTS.index(name)))), info)
        store_version(registry, adapter, write_spectra_blob(registry.blobs, adapter, adapter_spectra(adapter)))
    seen = {}

    def fake_serve(engine, host, port):
        seen.update(experts=engine.expert_names, top_k=engine.top_k, host=host, port=port)
        engine.stop()

    monkeypatch.setattr("spectr.serve.serve", fake_serve)
    result = runner.invoke(app, ["serve", "--base-model", str(base), "--experts", "green,red@1", "--port", "8123",
                                 "--top-k", "2", "--device", "cpu", "--num-blocks", "8"])
    assert result.exit_code == 0, result.output
    assert seen == {"experts": ["green", "red"], "top_k": 2, "host": "127.0.0.1", "port": 8123}
    result = runner.invoke(app, ["serve", "--base-model", str(base), "--experts", "red@7"])
    assert result.exit_code == 1 and "no version 7" in result.output and "Traceback" not in result.output
    # An alias works as a version does, and the registry records what the server loaded.
    registry.set_alias("red", "prod", 1)
    result = runner.invoke(app, ["serve", "--base-model", str(base), "--experts", "red@prod,green", "--device", "cpu",
                                 "--num-blocks", "8"])
    assert result.exit_code == 0, result.output
    assert seen["experts"] == ["red", "green"]
    assert [(e["name"], e["version"], e["selector"]) for e in registry.get_bundle("serve").experts] == [
        ("red", 1, "red@prod"), ("green", 1, "green")]
    result = runner.invoke(app, ["serve", "--base-model", str(base), "--experts", "red@staging"])
    assert result.exit_code == 1 and "no alias 'staging'" in result.output and "Traceback" not in result.output
