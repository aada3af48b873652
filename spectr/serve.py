"""`spectr serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the serving engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with "stream": true for server-sent
events), GET /v1/models, GET /health. Decoding is greedy (sampling fields are accepted and ignored).
Routing per request through the extra field "spectr": {"experts": [...], "top_k": k, "summary": true};
with summary the response carries "spectr": {"experts": {name: share of decisions}}.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from spectr.serve_engine import Engine, Output, RequestError

DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 512}  # OpenAI's default for completions; chat: bounded


def _error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def _chat_prompt(engine: Engine, messages: Any) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    turns = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("each message needs a 'role' and a 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise RequestError("message content must be a string or a list of text parts", param="messages")
        turns.append({"role": m["role"], "content": content})
    tok = engine.tokenizer
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return list(ids)
    # No chat template: the turns' texts, one per line (stated in the README).
    return tok("\n".join(t["content"] for t in turns)).input_ids


def _completion_prompt(engine: Engine, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.tokenizer(prompt).input_ids
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(engine.tokenizer)
        if not all(0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)
    raise RequestError("'prompt' must be a string, a list of one string, or a list of token ids", param="prompt")


def _max_tokens(body: dict, chat: bool, room: int | None) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        default = DEFAULT_MAX_TOKENS["chat" if chat else "completions"]
        return max(1, min(default, room)) if room is not None else default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"max_tokens must be a positive integer, got {value!r}", param="max_tokens")
    return value


class _Text:
    """Incremental detokenisation: the text added since the last call (held back while a character is split)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.sent = ""

    def delta(self, tokens: list[int], final: bool) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


def create_app(engine: Engine):
    """The FastAPI application serving `engine` (started and stopped with the app)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if not engine.healthy():
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="spectr", lifespan=lifespan)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != engine.model_id:
            raise RequestError(f"model {model!r} is not served here; this server serves {engine.model_id!r}",
                               status=404, param="model")
        return body

    @app.exception_handler(RequestError)
    async def _bad(_: Request, exc: RequestError):
        return _error(str(exc), exc.status, exc.param)

    @app.get("/health")
    async def health():
        if not engine.healthy():
            return JSONResponse(status_code=503, content={"status": "generation loop not running"})
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "spectr",
                "spectr": {"experts": engine.expert_names, "top_k": engine.top_k}}
        return {"object": "list", "data": [card]}

    async def run(request: Request, chat: bool):
        body = await body_of(request)
        if chat:
            ids = _chat_prompt(engine, body.get("messages"))
        else:
            ids = _completion_prompt(engine, body.get("prompt"))
        if body.get("n", 1) != 1:
            raise RequestError("only n=1 is supported", param="n")
        room = engine.max_context - len(ids) if engine.max_context else None
        max_new = _max_tokens(body, chat, room)
        engine.check_length(len(ids), max_new)
        routing = engine.routing(body.get("spectr"))
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        kind = "chat.completion" if chat else "text_completion"
        if body.get("stream"):
            return StreamingResponse(_stream(engine, request, ids, max_new, routing, chat, rid, created, kind),
                                     media_type="text/event-stream")
        last: Output | None = None
        async with aclosing(engine.generate(ids, max_new, routing, stream=False)) as outputs:
            async for out in outputs:
                last = out
        if last is None or last.error:
            return _error(f"generation failed: {last.error if last else 'no output'}", 500)
        text = _Text(engine.tokenizer).delta(last.tokens, final=True)
        reason = _finish_reason(engine, last.tokens, max_new)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason} if chat
                  else {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        result = {"id": rid, "object": kind, "created": created, "model": engine.model_id, "choices": [choice],
                  "usage": {"prompt_tokens": len(ids), "completion_tokens": len(last.tokens),
                            "total_tokens": len(ids) + len(last.tokens)}}
        if routing.summary:
            result["spectr"] = {"experts": last.summary or {}}
        return result

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    return app


def _finish_reason(engine: Engine, tokens: list[int], max_new: int) -> str:
    return "stop" if tokens and tokens[-1] in engine.eos else ("length" if len(tokens) >= max_new else "stop")


async def _stream(engine: Engine, request: Any, ids: list[int], max_new: int, routing: Any, chat: bool, rid: str,
                  created: int, kind: str) -> AsyncIterator[str]:
    """Server-sent events, one chunk per generated token; the generator's exit (a client that left) cancels."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, first: bool = False, extra: dict | None = None) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        data = {"id": rid, "object": obj, "created": created, "model": engine.model_id, "choices": [choice]}
        return f"data: {json.dumps(data | (extra or {}))}\n\n"

    if chat:
        yield chunk(None, None, first=True)
    text = _Text(engine.tokenizer)
    async with aclosing(engine.generate(ids, max_new, routing, stream=True)) as outputs:
        async for out in outputs:
            if out.error:
                error = {"error": {"message": f"generation failed: {out.error}", "type": "server_error"}}
                yield f"data: {json.dumps(error)}\n\n"
                return
            delta = text.delta(out.tokens, final=out.finished)
            if out.finished:
                extra = {"usage": {"prompt_tokens": len(ids), "completion_tokens": len(out.tokens),
                                   "total_tokens": len(ids) + len(out.tokens)}}
                if routing.summary:
                    extra["spectr"] = {"experts": out.summary or {}}
                yield chunk(delta, _finish_reason(engine, out.tokens, max_new), extra=extra)
            elif delta:
                yield chunk(delta, None)
    yield "data: [DONE]\n\n"


class Server:
    """uvicorn serving the app in a background thread (tests and benchmarks); stop() always returns."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.config = uvicorn.Config(create_app(engine), host=host, port=port, log_level="warning",
                                     timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 120) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the spectr server did not start")
            time.sleep(0.05)
        return self

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (blocks)."""
    import uvicorn

    uvicorn.run(create_app(engine), host=host, port=port, log_level="info")
