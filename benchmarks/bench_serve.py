"""`spectr serve` under load: throughput and time to first token, routed bundle against the base model.

The server (the real FastAPI app and engine on transformers' continuous batching, uvicorn in a thread) runs
in this process; the clients run in a second process (so they do not share the server's GIL): C concurrent
clients, each sending its requests one after another over HTTP with "stream": true, prompt P tokens, exactly
G generated tokens (EOS off). Throughput = generated tokens (from the responses' usage) / wall time of the
level; TTFT = time from sending a request to its first content chunk, median over requests. The base model
is served the same way (same engine, same settings, no bundle) in the same run: at each level the base runs,
then the bundle is loaded into the same model and the level runs again, then it is unloaded.

CPU, SmolLM2-135M-Instruct and the shared library (E = 8):
    python benchmarks/make_bundle.py --base SMOL --experts ../shared/experts -o /tmp/lib-bundle
    python benchmarks/bench_serve.py --base SMOL --bundle /tmp/lib-bundle
GPU, a random model with Llama-3-8B layer shapes (8 layers, bf16) and 8 random rank-16 experts:
    python benchmarks/bench_serve.py --random-8b --device cuda

Writes benchmarks/results/serve_<label>.md and .json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ----------------------------------------------------------------------------- clients (second process)
async def _one(client, url: str, body: dict) -> tuple[float, int, float]:
    """(ttft s, generated tokens, total s) of one streamed request."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if ttft is None and data["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if "usage" in data:
                tokens = data["usage"]["completion_tokens"]
    return (ttft if ttft is not None else float("nan")), tokens, time.perf_counter() - t0


async def _level(url: str, model: str, prompts: list[list[int]], clients: int, per_client: int, gen: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        async def worker(c: int) -> list[tuple[float, int, float]]:
            out = []
            for i in range(per_client):
                prompt = prompts[(c * per_client + i) % len(prompts)]
                body = {"model": model, "prompt": prompt, "max_tokens": gen, "stream": True}
                out.append(await _one(client, url, body))
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_median_ms": 1e3 * statistics.median(r[0] for r in results),
            "latency_median_s": statistics.median(r[2] for r in results)}


def _client_main(url: str, model: str, prompts: list[list[int]], levels: list[tuple[int, int]], gen: int) -> list:
    # warm-up: one request, so first-call costs (allocation, kernel selection) are not in the levels
    asyncio.run(_level(url, model, prompts, 1, 1, gen))
    return [asyncio.run(_level(url, model, prompts, c, n, gen)) for c, n in levels]


# ----------------------------------------------------------------------------- models
def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + [f"w{i}" for i in range(1, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def random_8b(layers: int, experts: int, rank: int, device: str, root: Path, smoke: bool = False):
    """A random Llama with Llama-3-8B layer shapes, bf16, and a bundle of random rank-r experts on all 7 modules."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spectr.pipeline.spectra import exact_spectrum
    from spectr.runtime.spectrum import AdapterSpectra
    from spectr.runtime import write_bundle
    from spectr.runtime.bundle import module_shape

    size = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2) if smoke else \
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    cfg = LlamaConfig(**size, num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096,
                      bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    infos = []
    for e in range(experts):
        g = torch.Generator(device=device).manual_seed(1000 + e)
        mods = {}
        for layer in range(layers):
            for m in MODULES:
                name = f"model.layers.{layer}.{m}"
                d_in, d_out = module_shape(model.get_submodule(name))
                A = torch.randn(rank, d_in, device=device, generator=g) / d_in ** 0.5
                B = torch.randn(d_out, rank, device=device, generator=g) * 0.02
                sp = exact_spectrum(A, B, 2.0, device=device)
                mods[name] = type(sp)(U=sp.U.float().cpu(), S=sp.S.float().cpu(), V=sp.V.float().cpu(),
                                      scaling=sp.scaling, energy=sp.energy)
        infos.append(({"name": f"e{e}", "version": 1, "content_sha256": "", "rank": rank, "alpha": 2 * rank},
                      AdapterSpectra(mods, "exact", {})))
    names = sorted(infos[0][1].modules)
    base = {"name": "bench-8b", "architecture": "LlamaForCausalLM", "model_type": "llama", "config_sha256": "",
            "modules": {m: list(module_shape(model.get_submodule(m))) for m in names}}
    return model, word_tokenizer(32000), write_bundle(root / "bundle", base=base, experts=infos)


def saved(base: Path, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, AutoTokenizer.from_pretrained(base)


# ----------------------------------------------------------------------------- main
def run_levels(engine, prompts, levels, gen) -> list[dict]:
    from spectr.serve import Server

    server = Server(engine).start()
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(_client_main, (server.url, engine.model_id, prompts, levels, gen))
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="saved base model folder (e.g. SmolLM2-135M-Instruct)")
    ap.add_argument("--bundle", type=Path, help="bundle folder for --base")
    ap.add_argument("--random-8b", action="store_true", help="random Llama-3-8B-shaped model and 8 random experts")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="with --random-8b: tiny shapes, to check the script")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--requests", type=int, default=0, help="requests per client (0: 4 at 1 client, else 2)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each level per side, interleaved (base, routed, routed, base, ...); ratio = median")
    ap.add_argument("--compile", action="store_true", help="the engine's --compile (continuous batching's compiled forward)")
    ap.add_argument("--label", default=None, help="results file name part (default: cpu or h200)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    from spectr.runtime import load_bundle, read_bundle, unload_bundle
    from spectr.serve_engine import Engine

    tmp = tempfile.TemporaryDirectory()
    if a.random_8b:
        model, tokenizer, path = random_8b(a.layers, a.experts, 16, a.device, Path(tmp.name), a.smoke)
        bundle = read_bundle(path)
        what = f"random Llama-3-8B-shaped model ({a.layers} layers, bf16), {a.experts} random rank-16 experts"
    else:
        model, tokenizer = saved(a.base, a.device)
        bundle = read_bundle(a.bundle)
        what = f"{a.base.name} ({model.dtype}), bundle {a.bundle.name} ({len(bundle.expert_names)} experts)"
    g = torch.Generator().manual_seed(0)
    vocab = min(len(tokenizer), model.config.vocab_size)
    prompts = [torch.randint(10, vocab, (a.prompt_tokens,), generator=g).tolist() for _ in range(256)]
    levels = [(c, a.requests or (4 if c == 1 else 2)) for c in (int(x) for x in a.clients.split(","))]
    kw = dict(model_id="bench", max_batch_tokens=a.max_batch_tokens, num_blocks=a.num_blocks, stop_on_eos=False,
              compile=a.compile)

    # Each level runs base and routed back to back (the bundle loaded and unloaded in place), so a drift in the
    # machine's load (a shared CPU) hits both sides of a ratio alike; with --repeats the order alternates
    # (base, routed, routed, base, ...) and the level's ratio is the median of the per-pair ratios.
    rows: dict[str, list[dict]] = {"base": [], "routed": []}
    pairs: list[dict] = []
    load_start = os.getloadavg()
    for level in levels:
        for rep in range(a.repeats):
            pair = {}
            for label in (("base", "routed") if rep % 2 == 0 else ("routed", "base")):
                if label == "routed":
                    load_bundle(model, bundle)
                engine = Engine(model, tokenizer, **kw)
                r = run_levels(engine, prompts, [level], a.gen_tokens)[0]
                if label == "routed":
                    unload_bundle(model)
                r["repeat"] = rep
                rows[label].append(r)
                pair[label] = r
                print(f"{label:>6} C={r['clients']:>3} #{rep}: {r['tokens_per_s']:8.1f} tok/s, "
                      f"TTFT {r['ttft_median_ms']:8.1f} ms ({r['requests']} requests, {r['wall_s']:.1f} s)", flush=True)
            pairs.append({"clients": level[0], "repeat": rep,
                          "ratio": pair["routed"]["tokens_per_s"] / pair["base"]["tokens_per_s"]})
    load = f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    label = a.label or ("h200" if a.device.startswith("cuda") else "cpu") + ("_compile" if a.compile else "")
    cmd = "python benchmarks/bench_serve.py " + (
        f"--random-8b --layers {a.layers} --device {a.device}" if a.random_8b else
        f"--base {a.base.name} --bundle {a.bundle.name} --device {a.device}") + (
        f" --prompt-tokens {a.prompt_tokens} --gen-tokens {a.gen_tokens} --clients {a.clients}") + (
        f" --requests {a.requests}" if a.requests else "") + (f" --repeats {a.repeats}" if a.repeats > 1 else "") + (
        " --compile" if a.compile else "")
    lines = [f"# spectr serve under load ({label})", "", f"`{cmd}`", "",
             f"{what}; {device} ({load}); torch {torch.__version__}, transformers {transformers.__version__}, "
             f"{platform.python_version()}. Continuous batching (sync, no CUDA graphs, no prefix sharing"
             f"{', torch.compile of the batched forward' if a.compile else ''}), "
             f"greedy, prompt {a.prompt_tokens} tokens, {a.gen_tokens} generated tokens per request (EOS off), "
             "streamed over HTTP; clients in a second process. Routed = the runtime's defaults (spectr, top-1, "
             "pool=input), no per-request fields. Ratios are routed / base from this run.", "",
             "| clients | requests per run | runs per side | base tok/s (median) | routed tok/s (median) | "
             "routed / base (median of pairs) | pair ratios | base TTFT ms | routed TTFT ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    med = statistics.median
    for c, _ in levels:
        b = [r for r in rows["base"] if r["clients"] == c]
        r = [x for x in rows["routed"] if x["clients"] == c]
        ratios = [p["ratio"] for p in pairs if p["clients"] == c]
        lines.append(f"| {c} | {b[0]['requests']} | {len(b)} | {med(x['tokens_per_s'] for x in b):.1f} | "
                     f"{med(x['tokens_per_s'] for x in r):.1f} | {med(ratios):.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in ratios)} | {med(x['ttft_median_ms'] for x in b):.0f} | "
                     f"{med(x['ttft_median_ms'] for x in r):.0f} |")
    print("\n".join(lines))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"serve_{label}.md").write_text("\n".join(lines) + "\n")
    (a.out / f"serve_{label}.json").write_text(json.dumps({"command": cmd, "setup": what, "device": device,
                                                           "rows": rows, "pairs": pairs}, indent=1) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
