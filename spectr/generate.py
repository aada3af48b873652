"""Routed generation for the CLI and the demo: base model + bundle -> text (+ a routing picture)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Generation:
    text: str
    tokens: list[str]  # prompt + generated tokens, as the trace's columns
    trace_path: Path | None


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
) -> Generation:
    """Greedy generation with the bundle's experts routed per token (the KV cache on, as usual).

    preset: a name in runtime/presets.py or "fixed:NAME"; top_k: None keeps the preset's k.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from spectr.runtime import load_bundle, plot_routing, read_bundle, trace_routing
    from spectr.runtime.evaluate import pad_id_of
    from spectr.runtime.presets import parse_preset

    name, expert = parse_preset(preset)
    hf_logging.disable_progress_bar()  # the CLI prints the generated text, not loading bars
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    loaded = read_bundle(bundle)
    load_bundle(model, loaded, name, top_k=top_k, expert=expert)
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), trace_routing(model) as recorder:
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id_of(tokenizer))
    # The last generated token is never fed back through the model, so it has no routing decision.
    routed = out[0, :-1].tolist()
    tokens = [tokenizer.decode([t]) for t in routed]
    path = None
    if trace is not None:
        path = plot_routing(recorder, trace, loaded.expert_names, tokens=tokens)
    return Generation(text=tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), tokens=tokens,
                      trace_path=path)
