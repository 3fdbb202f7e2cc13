"""The OpenAI-compatible HTTP API over the batched engine, as a FastAPI app.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events, or whole), GET
/v1/models, /health and /metrics (Prometheus text). Requests become engine requests; the engine's
background thread runs every model step, so many clients share each step. A client that disconnects
mid-stream cancels its request.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from ..errors import MinitorchError
from ..generation.chat import render_chat_prompt
from .metrics import ServerMetrics
from .protocol import APIError, CompletionRequest, read_chat, read_completion

# The engine's finish reasons, as OpenAI names them: running out of context is running out of length.
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length", "interrupted": "stop"}


def build_app(model, engine, model_name: str, api_key: str | None = None, max_queue: int | None = None) -> FastAPI:
    """The app for `model` served as `model_name` through `engine` (started by the caller)."""
    app = FastAPI(title="minitorch-infer", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(engine)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/") \
                and request.headers.get("authorization") != f"Bearer {api_key}":
            error = APIError(401, "a valid API key is required (Authorization: Bearer ...)",
                             kind="authentication_error", code="invalid_api_key")
            return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minitorch-infer"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed = read_chat(await _json(request), model_name)
        return await _respond(parsed, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = read_completion(await _json(request), model_name)
        return await _respond(parsed, chat=False)

    async def _respond(parsed: CompletionRequest, chat: bool):
        if max_queue is not None and len(engine.scheduler.waiting) >= max_queue:
            raise APIError(429, f"the server's queue is full ({max_queue} requests wait); try again shortly",
                           kind="server_busy", code="queue_full", headers={"Retry-After": "1"})
        handles = _submit(parsed, chat)
        reply = _Reply(model, model_name, chat, handles, parsed)
        if parsed.stream:
            return _StreamedReply(reply)
        return JSONResponse(await reply.whole())

    def _submit(parsed: CompletionRequest, chat: bool) -> list:
        if parsed.settings["max_new_tokens"] > model.context:
            raise APIError(400, f"max_tokens is {parsed.settings['max_new_tokens']}, more than this model's context "
                                f"length of {model.context} tokens", "max_tokens")
        handles = []
        try:
            for prompt in parsed.prompts:
                ids = render_chat_prompt(model, prompt) if chat else prompt
                for choice in range(parsed.choices):
                    seed = None if parsed.seed is None else parsed.seed + choice   # n choices that differ
                    handles.append(engine.submit(ids, seed=seed, **parsed.settings))
        except MinitorchError as error:
            for handle in handles:
                handle.cancel()
            raise APIError(400, str(error)) from None
        return handles

    return app


async def _json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None


class _StreamedReply(StreamingResponse):
    """A reply streamed as server-sent events, whose requests end with it. When the client goes away, Starlette
    cancels the task that streams; if that task was sending a chunk, the events generator stays suspended at its
    yield, and a `finally` in it would run only when the generator is collected: the requests ran on to
    max_tokens meanwhile (seen with a token every 2 ms: 400 of 400 made after the hang-up)."""

    def __init__(self, reply: _Reply):
        super().__init__(reply.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.reply = reply

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reply.cancel_unfinished()


class _Reply:
    """One response: the choices' handles, answered whole or as a stream of OpenAI chunks."""

    def __init__(self, model, model_name: str, chat: bool, handles: list, parsed: CompletionRequest):
        self.model, self.model_name, self.chat, self.handles, self.parsed = model, model_name, chat, handles, parsed
        self.with_logprobs = "logprobs" in parsed.settings
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    async def whole(self) -> dict:
        results = [await run_in_threadpool(handle.result) for handle in self.handles]
        choices = []
        for index, result in enumerate(results):
            choice = {"index": index, "finish_reason": FINISH_REASONS[result.finish_reason],
                      "logprobs": self._logprobs(result.logprobs)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = result.text
            choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_name,
                "choices": choices, "usage": self._usage(results)}

    def cancel_unfinished(self) -> None:
        """End the choices still running (the client went away)."""
        for handle in self.handles:
            if not handle.done:
                handle.cancel()

    async def events(self):
        results = []
        for index, handle in enumerate(self.handles):
            if self.chat:
                yield self._chunk(index, {"role": "assistant", "content": ""})
            # A chunk carries the logprobs of the tokens made since the one before; text is held back at
            # times (a partial character, a possible stop string), so the two may not line up exactly.
            recorded = handle._request.decoder.logprobs
            sent = emitted = 0
            async for piece in iterate_in_threadpool(handle.stream()):
                fresh, sent = self._since(recorded, sent, emitted)
                emitted += len(piece)
                yield self._chunk(index, {"content": piece} if self.chat else piece, logprobs=fresh)
            result = await run_in_threadpool(handle.result)
            results.append(result)
            fresh, sent = self._since(recorded, sent, emitted)
            yield self._chunk(index, {} if self.chat else "", FINISH_REASONS[result.finish_reason], fresh)
        if self.parsed.include_usage:
            yield _event({"id": self.id, "object": self._chunk_object, "created": self.created,
                          "model": self.model_name, "choices": [], "usage": self._usage(results)})
        yield "data: [DONE]\n\n"

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _since(self, recorded: list | None, sent: int, offset: int) -> tuple[dict | None, int]:
        """The logprobs entries recorded after the first `sent`, formatted (their text offsets from `offset`),
        and how many are sent then."""
        if recorded is None:
            return None, sent
        fresh = recorded[sent:]
        return (self._logprobs(fresh, offset) if fresh else None), sent + len(fresh)

    def _logprobs(self, entries: list | None, offset: int = 0) -> dict | None:
        """OpenAI's logprobs object: chat's `content` list, or the completions' parallel lists."""
        if entries is None:
            return None
        text = self._token_text
        if self.chat:
            return {"content": [{"token": text(e.token_id), "logprob": e.logprob,
                                 "bytes": list(text(e.token_id).encode("utf-8")),
                                 "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
                                                  for t, lp in e.top]} for e in entries]}
        tokens = [text(e.token_id) for e in entries]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}

    def _token_text(self, token_id: int) -> str:
        return self.model.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chunk(self, index: int, content, finish_reason: str | None = None, logprobs: dict | None = None) -> str:
        choice = {"index": index, "finish_reason": finish_reason, "logprobs": logprobs}
        choice["delta" if self.chat else "text"] = content
        return _event({"id": self.id, "object": self._chunk_object, "created": self.created,
                       "model": self.model_name, "choices": [choice]})

    def _usage(self, results: list) -> dict:
        # A prompt counts once however many choices it has (as OpenAI counts n).
        prompt = sum(len(results[i].prompt_ids) for i in range(0, len(results), self.parsed.choices))
        completion = sum(len(result.token_ids) for result in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@contextlib.contextmanager
def serving_in_thread(model, model_name: str, host: str = "127.0.0.1", port: int = 0, **options) -> Iterator[str]:
    """Serve `model` from a thread of this process (tests, benchmarks, notebooks); yields the base URL. Port 0
    picks a free one. The engine and the server stop when the block ends."""
    import uvicorn

    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    engine = model.engine().start()
    server = uvicorn.Server(uvicorn.Config(build_app(model, engine, model_name, **options), host=host, port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="minitorch-server", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join()
        engine.stop()
