"""`lmkit serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the batching `Scheduler`.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (models with a chat template only),
`GET /health` (liveness and readiness, no key needed) and the playground page at `/`. Requests and responses follow
OpenAI's schemas (`lmkit.serve.protocol`); streaming is server-sent events ending in `data: [DONE]`. Every error,
including unknown routes and malformed JSON, is an `APIError` in OpenAI's envelope; a bad request never ends the
server and never shows a traceback. This module owns the routes, the guards in front of them, the server's settings
and `serve`; the shapes on the wire are `lmkit.serve.protocol`'s, generation itself is `lmkit.serve.scheduler`'s.
"""

import asyncio
import base64
import hmac
import logging
import os
import signal
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmkit.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    Health,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from lmkit.serve.scheduler import CANCELLED, GenerationRequest, QueueFull, SamplingParams, Scheduler
from lmkit.settings import check_fields, setting

logger = logging.getLogger(__name__)

API_KEY_ENV = "LMKIT_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    """One server's address and limits; the CLI's flags (field `x_y` is `--x-y`). A bad value raises `SettingError`."""

    host: str = setting("127.0.0.1", "The address to bind (default: 127.0.0.1, this machine only).")
    port: int = setting(8000, "The TCP port to listen on (0: any free port).", minimum=0, maximum=65535)
    api_key: str | None = setting(
        None, "Require 'Authorization: Bearer KEY' on every path but /health; None: no key (`lmkit serve` defaults "
        "to $LMKIT_API_KEY)."
    )
    max_body_bytes: int = setting(1 << 20, "The largest request body; beyond, 413.", minimum=1)
    max_tokens: int = setting(1024, "The most tokens one request may ask for; beyond, 400.", minimum=1)
    max_batch_size: int = setting(32, "Requests decoded together at most.", minimum=1)
    max_queue: int = setting(64, "Requests waiting at most; beyond, 503.", minimum=1)
    drain_seconds: float = setting(
        30.0, "On SIGTERM, how long in-flight requests may finish before they are cancelled.", minimum=0
    )
    threads: int | None = setting(
        None, "Torch threads for the model on CPU (default: the CPU cores less one, at most 8).", minimum=1
    )
    stream_interval_ms: float = setting(
        20.0, "After the first streamed text, send at most one chunk per this many ms (0 = every token).", minimum=0
    )

    def __post_init__(self):
        check_fields(self, "serve")


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
        too_large = APIError.too_large(limit)
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
# The routes: each takes what it serves from `request.app.state.served`


@dataclass
class Served:
    """What one app serves: the scheduler and tokenizer of one model, its name and window, the server's limits."""

    scheduler: Scheduler
    tokenizer: object
    model_name: str
    n_positions: int
    settings: ServeSettings
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False  # between the app's start-up and its shutdown

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created)

    def check_model(self, requested: str) -> None:
        if requested != self.model_name:
            raise APIError.model_not_found(requested, self.model_name)


def _served(request: Request) -> Served:
    return request.app.state.served


ServedHere = Annotated[Served, Depends(_served)]
router = APIRouter()


@router.get("/health")
async def health(served: ServedHere) -> JSONResponse:
    ready = served.ready and served.scheduler.alive
    body = Health(status="ok" if ready else "unavailable", model=served.model_name, **served.scheduler.stats())
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/")
async def playground() -> HTMLResponse:
    return HTMLResponse(resources.files("lmkit.serve").joinpath("playground.html").read_text(encoding="utf-8"))


@router.get("/v1/models")
async def list_models(served: ServedHere) -> ModelList:
    return ModelList(data=[served.model_card()])


@router.get("/v1/models/{name:path}")
async def get_model(name: str, served: ServedHere) -> ModelCard:
    served.check_model(name)
    return served.model_card()


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, served: ServedHere):
    served.check_model(body.model)
    prompts = _prompt_ids(body.prompt, served.tokenizer)
    params = _sampling_params(body, body.max_tokens or 16, prompts, served)
    return await _respond(request, served, prompts, params, body, chat=False)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, served: ServedHere):
    served.check_model(body.model)
    tokenizer = served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"{served.model_name} is a base model: its tokenizer has no chat template, so it cannot "
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
    default = max(1, min(served.settings.max_tokens, served.n_positions - len(ids)))
    params = _sampling_params(body, requested or default, [ids], served,
                              field="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    return await _respond(request, served, [ids], params, body, chat=True)


# ---------------------------------------------------------------------------------------------------------------------
# Errors: every one leaves as an APIError


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return APIError.from_validation(exc).response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()
    if exc.status_code == 405:
        return APIError(405, f"method {request.method} not allowed on {request.url.path}",
                        code="method_not_allowed").response()
    return APIError(exc.status_code, str(exc.detail)).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return APIError(500, "internal server error (see the server log)", kind="server_error").response()


# ---------------------------------------------------------------------------------------------------------------------
# The app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    served: Served = app.state.served
    if not served.scheduler.alive:
        served.scheduler.start()
    served.ready = True
    yield
    served.ready = False
    served.scheduler.stop()


def create_app(scheduler: Scheduler, tokenizer, model_name: str, n_positions: int,
               settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app serving `scheduler`'s model as `model_name`; the scheduler thread starts and stops with it."""
    app = FastAPI(title="lmkit serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.served = Served(scheduler, tokenizer, model_name, n_positions, settings)
    app.include_router(router)
    app.add_middleware(GuardMiddleware, settings=settings)
    app.add_middleware(RequestLogMiddleware)  # added last, so it runs first and logs refused requests too
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


# ---------------------------------------------------------------------------------------------------------------------
# From a request to generations, and from their events to a response


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


def _sampling_params(body: SamplingFields, max_tokens: int, prompts: list[list[int]], served: Served,
                     field: str = "max_tokens") -> SamplingParams:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options",
                       code="invalid_value")
    ceiling, n_positions = served.settings.max_tokens, served.n_positions
    if max_tokens > ceiling:
        raise APIError(400, f"{field!r} is {max_tokens}; this server allows at most {ceiling}", param=field,
                       code="invalid_value")
    longest = max(len(ids) for ids in prompts)
    if longest >= n_positions:
        raise APIError(400, f"the prompt is {longest} tokens; the model's window is {n_positions} tokens, which "
                            "must also hold at least one generated token", param="prompt",
                       code="context_length_exceeded")
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


async def _respond(request: Request, served: Served, prompts: list[list[int]], params: SamplingParams,
                   body: SamplingFields, chat: bool):
    """Submit one generation per prompt; answer with their stream, or with the whole response once all are done."""
    submitted: list[tuple[_Events, GenerationRequest]] = []
    try:
        for ids in prompts:
            events = _Events()
            submitted.append((events, served.scheduler.submit(ids, params, events)))
    except QueueFull as exc:
        for _, generation in submitted:
            generation.cancel()
        raise APIError(503, f"the server is busy: {exc}; retry shortly", code="queue_full",
                       kind="server_overloaded") from None
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(submitted, response_id, served.model_name, chat, include_usage,
                         served.settings.stream_interval_ms / 1000)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts = []
    try:
        for events, generation in submitted:
            parts = []
            while True:
                try:
                    delta, finish_reason = await asyncio.wait_for(events.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    if await request.is_disconnected():  # nobody will read the answer: stop generating it
                        logger.info("client went away: cancelling its generation")
                        return JSONResponse({}, status_code=499)  # nginx's "client closed request", for the log
                    continue
                parts.append(delta)
                if finish_reason is not None:
                    break
            if finish_reason == CANCELLED:
                raise APIError.cancelled()
            texts.append(("".join(parts), finish_reason))
            _log_generation(generation)
    finally:
        for _, generation in submitted:
            generation.cancel()  # no-op for finished ones; frees the slot of a client that went away
    usage = Usage.of([generation for _, generation in submitted])
    if chat:
        return ChatCompletionResponse(
            id=response_id, created=int(time.time()), model=served.model_name, usage=usage,
            choices=[ChatCompletionChoice(index=index, message=AssistantMessage(content=text), finish_reason=reason)
                     for index, (text, reason) in enumerate(texts)],
        )  # fmt: skip
    return CompletionResponse(
        id=response_id, created=int(time.time()), model=served.model_name, usage=usage,
        choices=[CompletionChoice(index=index, text=text, finish_reason=reason)
                 for index, (text, reason) in enumerate(texts)],
    )  # fmt: skip


def _log_generation(generation: GenerationRequest) -> None:
    ttft = (generation.first_token_at or generation.finished_at) - generation.submitted_at
    latency = generation.finished_at - generation.submitted_at
    logger.info("generation: %d prompt + %d completion tokens, first token %.1f ms, total %.1f ms, finish %s",
                len(generation.prompt_ids), len(generation.token_ids), 1000 * ttft, 1000 * latency,
                generation.finish_reason)


async def _stream(submitted: list[tuple[_Events, GenerationRequest]], response_id: str, model_name: str, chat: bool,
                  include_usage: bool, interval: float):
    """Server-sent events: text chunks, a last chunk with the finish reason, usage, then [DONE].

    The first text goes out at once; after it, text is sent at most every `interval` seconds, in one chunk holding
    whatever was generated meanwhile (vLLM's `--stream-interval` idea, in time rather than tokens). Each chunk costs
    the server and the client JSON, HTTP framing and a socket write; with many concurrent streams on a CPU that is
    a large share of each decoding step, while 50 updates a second read as smoothly as one per token.
    """
    loop = asyncio.get_running_loop()
    created = int(time.time())

    def chunk(index: int, text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
        """One choice's chunk; `text` None is the closing chunk that carries only the finish reason."""
        if chat:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            choice = ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish_reason)
            payload = ChatCompletionChunk(id=response_id, created=created, model=model_name, choices=[choice])
        else:
            choice = CompletionStreamChoice(index=index, text=text or "", finish_reason=finish_reason)
            payload = CompletionChunk(id=response_id, created=created, model=model_name, choices=[choice])
        return payload.event(include_usage)

    try:
        for index, (events, generation) in enumerate(submitted):
            if chat:
                yield chunk(index, "", role=True)
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
                    yield APIError.cancelled().event()
                    return
                if delta:
                    yield chunk(index, delta)
                    sent_at = loop.time()
                if finish_reason is not None:
                    yield chunk(index, None, finish_reason)
                    _log_generation(generation)
                    break
        if include_usage:
            kind = ChatCompletionChunk if chat else CompletionChunk
            usage = Usage.of([generation for _, generation in submitted])
            yield kind(id=response_id, created=created, model=model_name, choices=[], usage=usage).event(True)
        yield "data: [DONE]\n\n"
    finally:
        for _, generation in submitted:
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


def serve(model: str, hub=None, settings: ServeSettings = ServeSettings()) -> None:
    """Load `model` (run dir, checkpoint, export dir or hub name, revision-verified) and serve it until SIGTERM/SIGINT.

    `settings` were checked when they were built. On SIGTERM the server stops accepting connections, lets in-flight
    requests finish for up to `settings.drain_seconds`, cancels what is left, and returns (the process exits 0).
    """
    import torch
    import uvicorn

    from lmkit import hub as lmkit_hub
    from lmkit.loading import load_model, load_tokenizer

    path = str(lmkit_hub.resolve(model, hub))  # resolve (and verify) a hub revision once
    loaded, tokenizer = load_model(path), load_tokenizer(path)
    torch.set_num_threads(settings.threads or default_threads())
    scheduler = Scheduler(loaded, tokenizer, settings.max_batch_size, settings.max_queue)
    app = create_app(scheduler, tokenizer, model, loaded.config.n_positions, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.drain_seconds)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler that ignores it lets the process
    # end normally (exit 0) after the drain instead of dying of SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: None)
    logger.info("serving %s (%s) on http://%s:%d%s", model, path, settings.host, settings.port,
                " (API key required)" if settings.api_key else "")
    server.run()
