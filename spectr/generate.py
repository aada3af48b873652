"""Routed generation for the CLI and the demo: base model + bundle -> text (+ a routing picture)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Generation:
    text: str
    tokens: list[str]  # prompt + generated tokens, as the trace's columns
    trace_path: Path | None
    new_tokens: int = 0
    seconds: float = 0.0  # the generate() call alone (prefill + decode)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def routed_generate(
    base_model: Path | str,
    bundle: Path | str,
    prompt: str,
    *,
    preset: str = "default",
    top_k: int | None = None,
    max_new_tokens: int = 40,
    chat: bool = True,
    trace: Path | None = None,
    compile: bool = False,
    scoring: str = "exact",
) -> Generation:
    """Greedy generation with the bundle's experts routed per token (the KV cache on, as usual).

    preset: a name in runtime/presets.py or "fixed:NAME"; top_k: None keeps the preset's k.
    compile: on a GPU (bf16), a static cache and each decode step compiled into CUDA graphs
    (load_bundle(compile=True)); the first call pays the compilation. Without a GPU it runs uncompiled.
    scoring: "exact" or "fp8" (RouterConfig.scoring: the scoring GEMM in float8).
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from spectr.runtime import load_bundle, plot_routing, read_bundle, trace_routing
    from spectr.runtime.evaluate import pad_id_of
    from spectr.inputs import bundle_folder, model_folder
    from spectr.runtime.presets import check_scoring, parse_preset

    name, expert = parse_preset(preset)
    check_scoring(scoring)
    base_model, bundle = model_folder(base_model), bundle_folder(bundle)
    hf_logging.disable_progress_bar()  # the CLI prints the generated text, not loading bars
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    on_gpu = compile and torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16 if on_gpu else torch.float32).eval()
    if on_gpu:
        model.cuda()
    loaded = read_bundle(bundle)
    load_bundle(model, loaded, name, top_k=top_k, expert=expert, compile=on_gpu, scoring=scoring)
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    ids = ids.to(model.device)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id_of(tokenizer))
    if on_gpu:  # compile and capture first (a trace would break the graph); time the second run
        with torch.no_grad():
            model.generate(ids, **kw)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad(), trace_routing(model) as recorder:
        recorder.enabled = not on_gpu  # recording copies to the host every step: not inside CUDA graphs
        out = model.generate(ids, **kw)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if on_gpu and trace is not None:  # the same decisions from one forward over the text (no smoothing carry lost)
        with torch.no_grad(), trace_routing(model) as recorder:
            model(out[:, :-1])
    # The last generated token is never fed back through the model, so it has no routing decision.
    routed = out[0, :-1].tolist()
    tokens = [tokenizer.decode([t]) for t in routed]
    path = None
    if trace is not None:
        path = plot_routing(recorder, trace, loaded.expert_names, tokens=tokens)
    return Generation(text=tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), tokens=tokens,
                      trace_path=path, new_tokens=out.shape[1] - ids.shape[1], seconds=seconds)
