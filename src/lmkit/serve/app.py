"""`lmkit serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the batching `Scheduler`.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (models with a chat template only),
`GET /health` (liveness and readiness, no key needed) and the playground page at `/`. Requests and responses follow
OpenAI's schemas; streaming is server-sent events ending in `data: [DONE]`. Every error, including unknown routes and
malformed JSON, uses OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`; a bad request never ends the
server and never shows a traceback. This module owns the HTTP surface; generation itself is `lmkit.serve.scheduler`'s.
"""

import asyncio
import base64
import hmac
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmkit.errors import UserError
from lmkit.serve.scheduler import CANCELLED, QueueFull, SamplingParams, Scheduler

logger = logging.getLogger(__name__)

API_KEY_ENV = "LMKIT_API_KEY"
# Fields of OpenAI's API that lmkit does not implement: named in the 400 rather than silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "presence_penalty",
               "frequency_penalty", "tools", "tool_choice", "functions", "function_call", "response_format",
               "parallel_tool_calls")


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one server; the CLI's flags."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_ceiling: int = 1024
    max_batch_size: int = 32
    max_queue: int = 64
    drain_seconds: float = 30.0
    threads: int | None = None  # torch's intra-op threads on CPU; None: `default_threads()`
    stream_interval: float = 0.02  # seconds between two streamed chunks of one response, after the first


# ---------------------------------------------------------------------------------------------------------------------
# Request schemas (unknown fields are refused, so a typo is a 400 naming it)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0 = off)")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per prompt only")
    ignore_eos: bool = Field(False, description="extension: generate max_tokens tokens even past end-of-text")
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class APIError(Exception):
    """An error answered to the client in OpenAI's envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": 'Basic realm="lmkit"'} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---------------------------------------------------------------------------------------------------------------------
# Middleware: API key and body size, both raw ASGI so that they guard every route, unknown ones included


class GuardMiddleware:
    """Refuse requests without the API key (all paths but /health) and bodies larger than `max_body_bytes`."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.settings.api_key and scope["path"] != "/health" and not self._authorised(headers):
            missing = "authorization" not in headers
            error = APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'" if missing
                             else "invalid API key", code="invalid_api_key", kind="authentication_error")
            return await error.response()(scope, receive, send)
        limit = self.settings.max_body_bytes
        too_large = APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await too_large.response()(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH") and not declared.isdigit():
            # a chunked body: read it here, within the limit, and hand the app what was read
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await too_large.response()(scope, receive, send)
            replayed = False

            async def receive_replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, receive_replay, send)
        return await self.app(scope, receive, send)

    def _authorised(self, headers: dict) -> bool:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":  # the playground in a browser: any user name, the key as password
            try:
                credentials = base64.b64decode(credentials).decode().partition(":")[2]
            except ValueError:
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.encode(), self.settings.api_key.encode())


class RequestLogMiddleware:
    """Log each request's method, path, status and time to the end of its response (a stream's end, for SSE).

    Raw ASGI rather than `@app.middleware("http")`: that one pipes every streamed chunk through an extra task and
    memory stream, a cost paid per generated token.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            logger.info("%s %s -> %d in %.1f ms", scope["method"], scope["path"], status[0],
                        1000 * (time.perf_counter() - start))


# ---------------------------------------------------------------------------------------------------------------------
# The app


def create_app(scheduler: Scheduler, tokenizer, model_name: str, n_positions: int,
               settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app serving `scheduler`'s model as `model_name`; the scheduler thread is started and stopped with it."""
    from contextlib import asynccontextmanager

    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        if not scheduler.alive:
            scheduler.start()
        state["ready"] = True
        yield
        state["ready"] = False
        scheduler.stop()

    app = FastAPI(title="lmkit serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(GuardMiddleware, settings=settings)
    app.add_middleware(RequestLogMiddleware)  # added last, so it runs first and logs refused requests too
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return _validation_response(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()
        if exc.status_code == 405:
            return APIError(405, f"method {request.method} not allowed on {request.url.path}",
                            code="method_not_allowed").response()
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error (see the server log)", kind="server_error").response()

    @app.get("/health")
    async def health():
        ready = state["ready"] and scheduler.alive
        body = {"status": "ok" if ready else "unavailable", "model": model_name, **scheduler.stats()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/")
    async def playground():
        return HTMLResponse(resources.files("lmkit.serve").joinpath("playground.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return _model_card(model_name, created)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompts = _prompt_ids(body.prompt, tokenizer)
        params = _sampling_params(body, body.max_tokens or 16, prompts, n_positions, settings)
        return await _respond(request, scheduler, prompts, params, body, model_name, chat=False, settings=settings)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body.model, model_name)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"{model_name} is a base model: its tokenizer has no chat template, so it cannot "
                                "format chat messages; send the text to continue to /v1/completions instead",
                           param="messages", code="no_chat_template")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as exc:  # a template may raise anything jinja can (e.g. it refuses a role)
            raise APIError(400, f"the model's chat template cannot format these messages: {exc}",
                           param="messages", code="invalid_value") from None
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids) or [tokenizer.eos_token_id]
        requested = body.max_completion_tokens or body.max_tokens
        default = max(1, min(settings.max_tokens_ceiling, n_positions - len(ids)))
        params = _sampling_params(body, requested or default, [ids], n_positions, settings,
                                  field="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        return await _respond(request, scheduler, [ids], params, body, model_name, chat=True, settings=settings)

    return app


def _model_card(model_name: str, created: int) -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "lmkit"}


def _validation_response(exc: RequestValidationError) -> APIError:
    """The first validation problem as a 400 naming its field."""
    error = exc.errors()[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    # pydantic reports a union's failure once per member type (prompt.str, prompt.list[int]...): keep the field path
    location = [part for part in location if not part.startswith(("str", "list[", "int", "function-"))]
    param = ".".join(location) or None
    if error.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({error.get('msg')})", code="invalid_json")
    if error.get("type") == "extra_forbidden":
        field = location[-1] if location else param
        reason = "is not supported by lmkit serve" if field in UNSUPPORTED else "is not a known field"
        return APIError(400, f"{param!r} {reason}", param=param, code="unsupported_field")
    if error.get("type") == "missing":
        return APIError(400, f"missing required field {param!r}", param=param, code="missing_field")
    if param == "prompt":
        return APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such "
                             "lists", param=param, code="invalid_value")
    given = error.get("input")
    given_text = json.dumps(given, ensure_ascii=False)[:80] if not isinstance(given, dict) else "an object"
    return APIError(400, f"invalid {param!r}: {error.get('msg')} (got {given_text})", param=param,
                    code="invalid_value")


def _check_model(requested: str, model_name: str) -> None:
    if requested != model_name:
        raise APIError(404, f"the model {requested!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")


def _prompt_ids(prompt, tokenizer) -> list[list[int]]:
    """Token ids of each prompt: text is tokenized without special tokens; an empty prompt starts a new document."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "'prompt' is an empty list", param="prompt", code="invalid_value")
    prompts = []
    for item in prompt:
        ids = tokenizer(item, add_special_tokens=False, verbose=False).input_ids if isinstance(item, str) else item
        if any(not 0 <= i < len(tokenizer) for i in ids):
            raise APIError(400, f"'prompt' holds token ids outside the vocabulary (0..{len(tokenizer) - 1})",
                           param="prompt", code="invalid_value")
        prompts.append(list(ids) or [tokenizer.eos_token_id])
    return prompts


def _sampling_params(body: SamplingFields, max_tokens: int, prompts: list[list[int]], n_positions: int,
                     settings: ServeSettings, field: str = "max_tokens") -> SamplingParams:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options",
                       code="invalid_value")
    if max_tokens > settings.max_tokens_ceiling:
        raise APIError(400, f"{field!r} is {max_tokens}; this server allows at most {settings.max_tokens_ceiling}",
                       param=field, code="invalid_value")
    longest = max(len(ids) for ids in prompts)
    if longest >= n_positions:
        raise APIError(400, f"the prompt is {longest} tokens; the model's window is {n_positions} tokens, which "
                            "must also hold at least one generated token", param="prompt", code="context_length_exceeded")
    if longest + max_tokens > n_positions:
        raise APIError(400, f"the prompt ({longest} tokens) plus {field!r} ({max_tokens}) is {longest + max_tokens} "
                            f"tokens; the model's window is {n_positions}: ask for at most {n_positions - longest}",
                       param=field, code="context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or not all(stops):
        raise APIError(400, f"'stop' takes up to 4 non-empty strings, got {stops!r}", param="stop",
                       code="invalid_value")
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          seed=body.seed, stop=tuple(stops), ignore_eos=body.ignore_eos)


class _Events:
    """Carry one request's events from the scheduler thread to the event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, delta: str, finish_reason: str | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (delta, finish_reason))


async def _respond(request: Request, scheduler: Scheduler, prompts, params, body, model_name: str, chat: bool,
                   settings: ServeSettings):
    submitted = []
    try:
        for index, ids in enumerate(prompts):
            events = _Events()
            submitted.append((index, ids, events, scheduler.submit(ids, params, events)))
    except QueueFull as exc:
        for *_, generation in submitted:
            generation.cancel()
        raise APIError(503, f"the server is busy: {exc}; retry shortly", code="queue_full",
                       kind="server_overloaded") from None
    kind = "chat.completion" if chat else "text_completion"
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(submitted, response_id, kind, model_name, chat, include_usage, settings.stream_interval)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    choices = []
    try:
        for index, _, events, generation in submitted:
            text = []
            while True:
                try:
                    delta, finish_reason = await asyncio.wait_for(events.queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():  # nobody will read the answer: stop generating it
                        logger.info("client went away: cancelling its generation")
                        return JSONResponse({}, status_code=499)  # nginx's "client closed request", for the log
                    continue
                text.append(delta)
                if finish_reason is not None:
                    break
            if finish_reason == CANCELLED:
                raise APIError(503, "the request was cancelled: the server is shutting down", code="cancelled",
                               kind="server_overloaded")
            content = "".join(text)
            choice = {"index": index, "finish_reason": finish_reason, "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": content}} if chat else {"text": content})
            choices.append(choice)
            _log_generation(generation)
    finally:
        for *_, generation in submitted:
            generation.cancel()  # no-op for finished ones; frees the slot of a client that went away
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": _usage([g for *_, g in submitted])}


def _usage(generations) -> dict:
    prompt = sum(len(g.prompt_ids) for g in generations)
    completion = sum(len(g.token_ids) for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _log_generation(generation) -> None:
    ttft = (generation.first_token_at or generation.finished_at) - generation.submitted_at
    latency = generation.finished_at - generation.submitted_at
    logger.info("generation: %d prompt + %d completion tokens, first token %.1f ms, total %.1f ms, finish %s",
                len(generation.prompt_ids), len(generation.token_ids), 1000 * ttft, 1000 * latency,
                generation.finish_reason)


async def _stream(submitted, response_id: str, kind: str, model_name: str, chat: bool, include_usage: bool,
                  interval: float):
    """Server-sent events: text chunks, a last chunk with the finish reason, usage, then [DONE].

    The first text goes out at once; after it, text is sent at most every `interval` seconds, in one chunk holding
    whatever was generated meanwhile (vLLM's `--stream-interval` idea, in time rather than tokens). Each chunk costs
    the server and the client JSON, HTTP framing and a socket write; with many concurrent streams on a CPU that is
    a large share of each decoding step, while 50 updates a second read as smoothly as one per token.
    """
    loop = asyncio.get_running_loop()
    created = int(time.time())
    chunk_kind = "chat.completion.chunk" if chat else kind

    def chunk(index: int, text: str | None, finish_reason: str | None, role: bool = False) -> str:
        if chat:
            delta = {} if text is None else ({"role": "assistant", "content": text} if role else {"content": text})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        payload = {"id": response_id, "object": chunk_kind, "created": created, "model": model_name,
                   "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        for index, _, events, generation in submitted:
            if chat:
                yield chunk(index, "", None, role=True)
            sent_at = None
            while True:
                delta, finish_reason = await events.queue.get()
                if sent_at is not None and finish_reason is None and loop.time() < sent_at + interval:
                    await asyncio.sleep(sent_at + interval - loop.time())
                # send what has piled up (meanwhile, or because the client reads slower than the model writes)
                while finish_reason is None and not events.queue.empty():
                    more, finish_reason = events.queue.get_nowait()
                    delta += more
                if finish_reason == CANCELLED:
                    error = {"message": "the request was cancelled: the server is shutting down",
                             "type": "server_overloaded", "param": None, "code": "cancelled"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                if delta:
                    yield chunk(index, delta, None)
                    sent_at = loop.time()
                if finish_reason is not None:
                    yield chunk(index, None if chat else "", finish_reason)
                    _log_generation(generation)
                    break
        if include_usage:
            usage = {"id": response_id, "object": chunk_kind, "created": created, "model": model_name,
                     "choices": [], "usage": _usage([g for *_, g in submitted])}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for *_, generation in submitted:
            if generation.finish_reason is None:
                logger.info("client went away after %d tokens: cancelling its generation", len(generation.token_ids))
            generation.cancel()


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def default_threads() -> int:
    """One core fewer than the machine has, at most 8: the HTTP side (event loop, JSON, SSE) needs a core of its own.

    When torch's threads take every core they spin at the end of each small decoding op while the event loop waits
    for the CPU; see benchmarks/bench_serve.py for what that costs on a 2-core machine.
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, hub=None,
          settings: ServeSettings = ServeSettings()) -> None:
    """Load `model` (run dir, checkpoint, export dir or hub name, revision-verified) and serve it until SIGTERM/SIGINT.

    On SIGTERM the server stops accepting connections, lets in-flight requests finish for up to
    `settings.drain_seconds`, cancels what is left, and returns (the process exits 0).
    """
    import torch
    import uvicorn

    from lmkit import hub as lmkit_hub
    from lmkit.loading import load_model, load_tokenizer

    for name, value in (("--port", port), ("--max-batch-size", settings.max_batch_size),
                        ("--max-queue", settings.max_queue), ("--max-tokens", settings.max_tokens_ceiling),
                        ("--max-body-bytes", settings.max_body_bytes),
                        ("--threads", 1 if settings.threads is None else settings.threads)):
        if value < (0 if name == "--port" else 1):
            raise UserError(f"serve: {name} must be {'>= 0' if name == '--port' else '>= 1'}, got {value}")
    if not settings.stream_interval >= 0:
        raise UserError(f"serve: --stream-interval-ms must be >= 0, got {1000 * settings.stream_interval}")
    if not settings.drain_seconds >= 0:
        raise UserError(f"serve: --drain-seconds must be >= 0, got {settings.drain_seconds}")
    path = str(lmkit_hub.resolve(model, hub))  # resolve (and verify) a hub revision once
    loaded, tokenizer = load_model(path), load_tokenizer(path)
    torch.set_num_threads(settings.threads or default_threads())
    scheduler = Scheduler(loaded, tokenizer, settings.max_batch_size, settings.max_queue)
    app = create_app(scheduler, tokenizer, model, loaded.config.n_positions, settings)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.drain_seconds)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler that ignores it lets the process
    # end normally (exit 0) after the drain instead of dying of SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: None)
    logger.info("serving %s (%s) on http://%s:%d%s", model, path, host, port,
                " (API key required)" if settings.api_key else "")
    server.run()
