"""The serving engine: a routed (or plain) transformers model behind transformers' continuous batching.

Requests go to a `ContinuousBatchingManager` (model.init_continuous_batching(), the machinery under
`transformers serve`): it packs the tokens of every scheduled request into one row-major batch
(input_ids (1, N), cu_seq_lens_q marks where each request's rows start) and calls the model once per step.
Routing is per token inside that packed batch. What the engine adds is per-request routing state:
a forward pre-hook on the model reads the batch processor's `requests_in_batch` (the same order as the
packed rows, each with its query_length) to know which request each row belongs to, then
- sets the expert mask for the rows of requests that restrict their experts (spectr.runtime.set_expert_mask),
- sets one top_k per row when a request asks for its own k (spectr.runtime.set_token_top_k; the other
  rows keep the server's --top-k),
- and, for requests that asked for a routing summary, adds up which experts the routed modules chose at
  the rows that produce their next token (runtime.trace.DecisionCounter, on device; one copy per step).

Settings that per-request routing needs (both transformers 5.17 and 5.24): synchronous batching (the
pre-hook reads the batch the forward is about to run), no CUDA graphs (hooks do not run on replay) and no
prefix block sharing (a cached prefix computed under one request's experts must not serve another's).
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import torch


class RequestError(ValueError):
    """A client's mistake: the server answers 4xx with this message."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class Routing:
    """One request's routing: allowed expert indices (None = all, the default router), top_k, summary wanted."""

    experts: list[int] | None = None
    top_k: int | None = None
    summary: bool = False

    @property
    def restricted(self) -> bool:
        return self.experts is not None or self.top_k is not None


@dataclass
class Output:
    """What a request has produced so far."""

    tokens: list[int]
    finished: bool
    error: str | None = None
    summary: dict[str, float] | None = None


@dataclass
class _Live:
    routing: Routing
    counts: torch.Tensor | None = None  # (E,) decisions per expert at this request's next-token rows
    lock: threading.Lock = field(default_factory=threading.Lock)


def _cb_config(**wanted: Any):
    """A ContinuousBatchingConfig with the wanted fields this transformers version knows (5.17 lacks some)."""
    from transformers.generation import ContinuousBatchingConfig

    known = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    return ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if k in known and v is not None})


def _expert_mask_api():
    """spectr.runtime.set_expert_mask when this runtime has it (None otherwise)."""
    from spectr import runtime

    return getattr(runtime, "set_expert_mask", None)


class Engine:
    """A model (with a loaded bundle or none) served through continuous batching; thread-safe submission."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        max_batch_tokens: int | None = None,
        num_blocks: int | None = None,
        compile: bool = False,
        stop_on_eos: bool = True,
    ):
        from transformers import GenerationConfig

        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        state = getattr(model, "spectr", None)
        self.expert_names: list[str] = list(state.bundle.expert_names) if state is not None else []
        self.top_k: int | None = state.config.top_k if state is not None else None
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos: list[int] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if not stop_on_eos:  # benchmarks: every request generates exactly max_tokens
            self.eos = []
        gen = GenerationConfig(do_sample=False, max_new_tokens=256, eos_token_id=self.eos[0] if self.eos else -1)
        compile_cfg = None
        if compile:
            from transformers.generation import CompileConfig

            compile_cfg = CompileConfig(fullgraph=False, dynamic=True)
        cb = _cb_config(use_async_batching=False, use_cuda_graph=False, allow_block_sharing=False,
                        max_batch_tokens=max_batch_tokens, num_blocks=num_blocks, auto_switch_to_flash=False,
                        varlen_compile_config=compile_cfg, decode_compile_config=compile_cfg)
        self.manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        self._live: dict[str, _Live] = {}
        self.cancelled = 0  # requests whose client left before the end
        self._rows: list[tuple[_Live, int]] | None = None  # (request, next-token row) of the running forward
        # Plain Python over the batch's request list: kept out of a compiled forward (a graph break, not guards)
        before, after = torch.compiler.disable(self._before_forward), torch.compiler.disable(self._after_forward)
        self._hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
                       model.register_forward_hook(after, always_call=True)]
        self._counter = None
        self._masked = False
        self._own_k = False
        if state is not None:
            from spectr.runtime.trace import DecisionCounter

            self._counter = DecisionCounter(len(self.expert_names))
            state.recorder.counter = self._counter

    @classmethod
    def load(
        cls,
        base_model: Path | str,
        bundle: Path | str | None = None,
        *,
        top_k: int = 1,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_tokens: int | None = None,
        num_blocks: int | None = None,
        compile: bool = False,
        scoring: str = "exact",
    ) -> "Engine":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from spectr.runtime import load_bundle, read_bundle
        from spectr.runtime.presets import check_scoring

        check_scoring(scoring)
        hf_logging.disable_progress_bar()  # the server logs requests, not loading bars
        loaded = read_bundle(bundle) if bundle is not None else None  # a bad bundle fails before the weights load
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype, attn_implementation="sdpa")
        model = model.to(device).eval()
        if loaded is not None:
            load_bundle(model, loaded, top_k=top_k, scoring=scoring)
        return cls(model, tokenizer, model_id=Path(base_model).name, max_batch_tokens=max_batch_tokens,
                   num_blocks=num_blocks, compile=compile)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.manager.start()

    def stop(self) -> None:
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=30)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def healthy(self) -> bool:
        return self.manager.is_running()

    # ------------------------------------------------------------------ requests
    def routing(self, extra: Any) -> Routing:
        """Parse a request's `spectr` field: {"experts": [names], "top_k": k, "summary": bool}."""
        if extra is None:
            return Routing()
        if not isinstance(extra, dict):
            raise RequestError("'spectr' must be an object like {\"experts\": [...], \"top_k\": 1}", param="spectr")
        unknown = sorted(set(extra) - {"experts", "top_k", "summary"})
        if unknown:
            raise RequestError(f"'spectr' has unknown fields {unknown}; expected experts, top_k, summary",
                               param="spectr")
        summary = extra.get("summary", False)
        if not isinstance(summary, bool):
            raise RequestError("spectr.summary must be true or false", param="spectr.summary")
        experts, top_k = extra.get("experts"), extra.get("top_k")
        if (experts is not None or top_k is not None or summary) and not self.expert_names:
            raise RequestError("this server has no expert bundle loaded; drop the 'spectr' routing fields",
                               param="spectr")
        allowed = None
        if experts is not None:
            if not isinstance(experts, list) or not experts or not all(isinstance(e, str) for e in experts):
                raise RequestError("spectr.experts must be a non-empty list of expert names", param="spectr.experts")
            missing = [e for e in experts if e not in self.expert_names]
            if missing:
                raise RequestError(f"unknown expert(s) {missing}; this bundle has {self.expert_names}",
                                   param="spectr.experts")
            if len(set(experts)) != len(experts):
                raise RequestError(f"spectr.experts repeats a name: {experts}", param="spectr.experts")
            allowed = sorted(self.expert_names.index(e) for e in experts)
        if top_k is not None:
            n = len(allowed) if allowed is not None else len(self.expert_names)
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n:
                raise RequestError(f"spectr.top_k must be an integer from 1 to {n} (the experts it may choose "
                                   f"from), got {top_k!r}", param="spectr.top_k")
        routing = Routing(experts=allowed, top_k=top_k, summary=summary)
        if routing.experts is not None and _expert_mask_api() is None:
            raise RequestError("per-request experts need spectr.runtime.set_expert_mask, which this runtime lacks",
                               status=501, param="spectr.experts")
        return routing

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise RequestError("the prompt is empty (0 tokens)", param="prompt")
        if self.max_context is not None and prompt_len + max_new_tokens > self.max_context:
            raise RequestError(f"prompt of {prompt_len} tokens plus max_tokens {max_new_tokens} exceeds the model's "
                               f"context of {self.max_context} tokens", param="max_tokens")

    async def generate(
        self, prompt_ids: list[int], max_new_tokens: int, routing: Routing, stream: bool
    ) -> AsyncIterator[Output]:
        """Submit one request; yield its outputs (every token if stream, else once). Leaving early cancels it."""
        rid = f"spectr-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        live = _Live(routing)
        self._live[rid] = live
        self.manager.register_result_handler(rid, queue.put_nowait)
        finished = False
        try:
            added = self.manager.add_request(list(prompt_ids), request_id=rid, max_new_tokens=max_new_tokens,
                                             streaming=stream, eos_token_id=self.eos or -1)
            if added is None:  # the manager is stopping and takes no new requests
                finished = True
                raise RequestError("the server is shutting down", status=503)
            while not finished:
                out = await queue.get()
                finished = out.is_finished()
                yield Output(tokens=list(out.generated_tokens), finished=finished, error=out.error,
                             summary=self._summary(live) if finished and routing.summary else None)
        finally:
            if not finished:  # the client left (or the task was cancelled): free the slot and the cache
                self.cancelled += 1
                self.manager.cancel_request(rid)
            with self.manager.output_router._lock:
                self.manager.output_router.result_handlers.pop(rid, None)
            self._live.pop(rid, None)

    def _summary(self, live: _Live) -> dict[str, float]:
        with live.lock:
            counts = live.counts
        if counts is None or counts.sum() == 0:
            return {}
        share = counts.double() / counts.sum()
        return {name: round(float(share[e]), 4) for e, name in enumerate(self.expert_names) if share[e] > 0}

    # ------------------------------------------------------------------ hooks on the model's forward
    def _batch(self) -> list:
        processor = self.manager.batch_processor
        return list(processor.inputs_and_outputs.requests_in_batch) if processor is not None else []

    def _before_forward(self, model: Any, args: tuple, kwargs: dict) -> None:
        if self._counter is None:
            return
        ids = kwargs.get("input_ids")
        if ids is None or "cu_seq_lens_q" not in kwargs:  # a forward outside continuous batching
            return
        rows_total = ids.shape[-1]
        spans, row, want_rows, restricted, own_k = [], 0, [], False, False
        for fs in self._batch():
            live = self._live.get(fs.state.request_id)
            n = int(fs.query_length)
            if live is not None:
                spans.append((live, row, n))
                restricted |= live.routing.experts is not None
                own_k |= live.routing.top_k not in (None, self.top_k)
                if live.routing.summary and fs.has_new_token:
                    want_rows.append((live, row + n - 1))
            row += n
        if restricted:
            mask = torch.ones(rows_total, len(self.expert_names), dtype=torch.bool)
            for live, start, n in spans:
                if live.routing.experts is not None:
                    mask[start:start + n] = False
                    mask[start:start + n, live.routing.experts] = True
            _expert_mask_api()(model, mask.to(ids.device))
            self._masked = True
        if own_k:  # a request with its own top_k: one k per packed row, the server's for every other row
            k = torch.full((rows_total,), self.top_k, dtype=torch.int64)
            for live, start, n in spans:
                if live.routing.top_k is not None:
                    k[start:start + n] = live.routing.top_k
            from spectr.runtime import set_token_top_k

            set_token_top_k(model, k.to(ids.device))
            self._own_k = True
        self._rows = want_rows or None
        self._counter.take()
        model.spectr.recorder.enabled = bool(want_rows)

    def _after_forward(self, model: Any, *_: Any) -> None:
        if self._counter is None:
            return
        model.spectr.recorder.enabled = False
        if self._masked:
            _expert_mask_api()(model, None)
            self._masked = False
        if self._own_k:
            from spectr.runtime import set_token_top_k

            set_token_top_k(model, None)
            self._own_k = False
        counts, rows, self._rows = self._counter.take(), self._rows, None
        if counts is None or not rows:
            return
        picked = counts[torch.tensor([r for _, r in rows], device=counts.device)].cpu()
        for (live, _), c in zip(rows, picked):
            with live.lock:
                live.counts = c.clone() if live.counts is None else live.counts + c
