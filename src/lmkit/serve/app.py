"""`lmkit serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the batching `Scheduler`.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (models with a chat template only),
vLLM's `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`, `GET /metrics` (Prometheus), `GET /health`
(liveness and readiness; with `/metrics`, no key needed) and the playground page at `/`. Requests and responses
follow OpenAI's schemas (`lmkit.serve.protocol`); streaming is server-sent events ending in `data: [DONE]`. Every
error, including unknown routes and malformed JSON, is an `APIError` in OpenAI's envelope; a bad request never ends
the server and never shows a traceback. This module owns the routes, the server's settings and `serve`; the guards
in front of the routes are `lmkit.serve.middleware`'s, the shapes on the wire `lmkit.serve.protocol`'s, planning
and writing responses `lmkit.serve.responses`', generation itself `lmkit.serve.scheduler`'s.
"""

import logging
import os
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmkit.errors import UserError
from lmkit.serve import metrics, responses
from lmkit.serve.middleware import GuardMiddleware, RequestContextMiddleware
from lmkit.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    ModelCard,
    ModelList,
    RequestSchema,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from lmkit.serve.scheduler import Scheduler
from lmkit.serve.tokens import PromptTooLong, ServedTokenizer
from lmkit.settings import SettingError, check_fields, setting

logger = logging.getLogger(__name__)

API_KEY_ENV = "LMKIT_API_KEY"
_OPEN_PATHS = ("/health", "/metrics")  # what load balancers and Prometheus read without the key


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
    max_tokens: int = setting(1024, "The most tokens one prompt may generate, over all its choices (n or best_of "
                                    "times max_tokens); beyond, 400.", minimum=1)
    max_n: int = setting(16, "The most choices (n, best_of) one prompt may ask for; beyond, 400.", minimum=1)
    max_batch_size: int = setting(32, "Requests decoded together at most.", minimum=1)
    max_queue: int = setting(64, "Generations waiting at most; beyond, 503 (one request asking for more: 400).",
                             minimum=1)
    drain_seconds: float = setting(
        30.0, "On SIGTERM, how long in-flight requests may finish before they are cancelled.", minimum=0
    )
    threads: int | None = setting(
        None, "Torch threads for the model on CPU (default: the CPU cores less one, at most 8).", minimum=1
    )
    stream_interval_ms: float = setting(
        20.0, "After the first streamed text, send at most one chunk per this many ms (0 = every token).", minimum=0
    )
    chat_template: str | None = setting(
        None, "A Jinja chat template file that replaces the model's own (its tokenizer's) for /v1/chat/completions."
    )

    def __post_init__(self):
        check_fields(self, "serve")
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()
                                             and self.api_key.strip() == self.api_key and self.api_key):
            problem = "is empty, which would leave the server open" if not self.api_key else \
                "must be printable ASCII without surrounding spaces (an HTTP header carries it)"
            raise SettingError("api_key", problem, section="serve")


# ---------------------------------------------------------------------------------------------------------------------
# The routes: each takes what it serves from `request.app.state.served`


@dataclass
class Served:
    """What one app serves: the scheduler and tokenizer of one model, its name and window, the server's limits."""

    scheduler: Scheduler
    tokenizer: ServedTokenizer
    model_name: str
    n_positions: int
    settings: ServeSettings
    metrics: metrics.ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False  # between the app's start-up and its shutdown (or a SIGTERM)
    draining_over: bool = False  # the drain time after a SIGTERM has run out: in-flight requests were cancelled

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created)

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise APIError.model_not_found(requested, self.model_name)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer.tokenizer, "chat_template", None) or None


def _served(request: Request) -> Served:
    return request.app.state.served


ServedHere = Annotated[Served, Depends(_served)]
router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(served: ServedHere) -> JSONResponse:
    ready = served.ready and served.scheduler.alive
    body = Health(status="ok" if ready else "unavailable", model=served.model_name, **served.scheduler.stats())
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/metrics")
async def prometheus_metrics(served: ServedHere) -> Response:
    return Response(served.metrics.text(), media_type=metrics.CONTENT_TYPE)


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
    _check_supported(body)
    served.check_model(body.model)
    prompts, texts = await run_in_threadpool(_prompt_ids, body.prompt, served.tokenizer)
    planned = responses.plan(body, prompts, texts, served, body.max_tokens)
    return await responses.respond(request, served, planned, chat=False)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, served: ServedHere):
    _check_supported(body)
    served.check_model(body.model)
    ids = await run_in_threadpool(_chat_ids, body.messages, served, True)
    field_name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if body.max_tokens == 0 and not body.max_completion_tokens:
        raise APIError(400, "'max_tokens' must be at least 1", param="max_tokens", code="invalid_value")
    planned = responses.plan(body, [ids], [None], served, body.max_completion_tokens or body.max_tokens, field_name)
    return await responses.respond(request, served, planned, chat=True)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, served: ServedHere) -> TokenizeResponse:
    served.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send either 'prompt' or 'messages'", param="prompt", code="invalid_value")

    def work():
        if body.messages is not None:
            ids = _chat_ids(body.messages, served, body.add_generation_prompt)
        else:
            ids = _encode(served.tokenizer, body.prompt, "prompt", body.add_special_tokens)
        strings = [served.tokenizer.token_string(i) for i in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=served.n_positions, tokens=ids, token_strs=strings)

    return await run_in_threadpool(work)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, served: ServedHere) -> DetokenizeResponse:
    served.check_model(body.model)
    _check_ids(body.tokens, served.tokenizer, "tokens")
    return DetokenizeResponse(prompt=await run_in_threadpool(served.tokenizer.decode, body.tokens))


@router.get("/tokenizer_info")
async def tokenizer_info(served: ServedHere) -> TokenizerInfo:
    tokenizer = served.tokenizer.tokenizer
    return TokenizerInfo(
        tokenizer_class=type(tokenizer).__name__, vocab_size=served.tokenizer.vocab_size,
        model_max_length=served.n_positions, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token, chat_template=served.chat_template,
    )  # fmt: skip


def _check_supported(body: RequestSchema) -> None:
    unsupported = body.unsupported()
    if unsupported is not None:
        name, reason = unsupported
        raise APIError(400, f"{name!r}: {reason}", param=name, code="unsupported_value")


# ---------------------------------------------------------------------------------------------------------------------
# Prompts to token ids (blocking: called in a worker thread)


def _encode(tokenizer: ServedTokenizer, text: str, param: str, add_special_tokens: bool = False) -> list[int]:
    try:
        return tokenizer.encode(text, add_special_tokens)
    except PromptTooLong as exc:
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None


def _check_ids(ids: list[int], tokenizer: ServedTokenizer, param: str) -> None:
    if any(not 0 <= i < tokenizer.vocab_size for i in ids):
        raise APIError(400, f"{param!r} holds token ids outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                       param=param, code="invalid_value")


def _prompt_ids(prompt, tokenizer: ServedTokenizer) -> tuple[list[list[int]], list[str | None]]:
    """Token ids of each prompt, and its text when it was sent as text: text is tokenized without special tokens;
    an empty prompt starts a new document."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "'prompt' is an empty list", param="prompt", code="invalid_value")
    prompts, texts = [], []
    for item in prompt:
        ids = _encode(tokenizer, item, "prompt") if isinstance(item, str) else item
        _check_ids(ids, tokenizer, "prompt")
        eos = tokenizer.tokenizer.eos_token_id
        prompts.append(list(ids) or [eos])
        texts.append(item if isinstance(item, str) else None)
    return prompts, texts


def _chat_ids(messages, served: Served, add_generation_prompt: bool) -> list[int]:
    """The messages rendered through the model's chat template, as token ids."""
    if not served.chat_template:
        raise APIError(400, f"{served.model_name} is a base model: its tokenizer has no chat template, so it cannot "
                            "format chat messages; send the text to continue to /v1/completions instead",
                       param="messages", code="no_chat_template")
    conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
    tokenizer = served.tokenizer.tokenizer
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # a template may raise anything jinja can (e.g. it refuses a role)
        raise APIError(400, f"the model's chat template cannot format these messages: {exc}",
                       param="messages", code="invalid_value") from None
    # the template writes its own special tokens: tokenize the text without adding any
    return _encode(served.tokenizer, text, "messages") or [tokenizer.eos_token_id]


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
    instruments = metrics.ServerMetrics(scheduler, model_name)
    scheduler.on_step = instruments.batch_size.observe
    served = Served(scheduler, ServedTokenizer(tokenizer, n_positions), model_name, n_positions, settings,
                    instruments)
    app.state.served = served
    app.include_router(router)
    app.add_middleware(GuardMiddleware, settings=settings, served=served, open_paths=_OPEN_PATHS)
    # added last, so it runs first: refused requests get an id, a log line and a count too
    app.add_middleware(RequestContextMiddleware, observe=_observer(instruments))
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


def _observer(instruments: metrics.ServerMetrics):
    known = {route.path for route in router.routes}

    def observe(path: str, status: int) -> None:  # unknown paths are one label, not one each (a scanner's 404s)
        instruments.requests.labels(path if path in known else "other", str(status)).inc()

    return observe


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def default_threads() -> int:
    """One core fewer than the machine has, at most 8: the HTTP side (event loop, JSON, SSE) needs a core of its own.

    When torch's threads take every core they spin at the end of each small decoding op while the event loop waits
    for the CPU; see benchmarks/bench_serve.py for what that costs on a 2-core machine.
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a `UserError` naming the flag (a bad address, a port in use)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--host {host!r} is not an address of this machine ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        flag = "--port" if exc.errno in (98, 13) else "--host"  # EADDRINUSE, EACCES: the port; else the address
        raise UserError(f"{flag}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def read_chat_template(path: str) -> str:
    """The text of a Jinja chat template file, checked to parse; a `UserError` naming `--chat-template` if not."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--chat-template {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise UserError(f"--chat-template {path}: not a Jinja template: {exc.message} (line {exc.lineno})") from None
    return text


def check_chat_template(tokenizer, name: str) -> None:
    """Render a two-message conversation through the tokenizer's template: it must work and add a generation
    prompt (the text the model continues from), or a `UserError` naming `name`."""
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    try:
        bare = tokenizer.apply_chat_template(conversation, tokenize=False)
        prompted = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # anything jinja raises: an undefined variable, the template's own raise_exception
        raise UserError(f"{name}: the template cannot format a system + user conversation: {exc}") from None
    if prompted == bare:
        raise UserError(f"{name}: the template adds no generation prompt (add_generation_prompt changes nothing), "
                        "so the model would not know where its answer starts")


class _DrainingServer:
    """Uvicorn's server, told on SIGTERM/SIGINT to stop accepting, let in-flight requests finish for the drain time,
    then cancel what is left through the scheduler: streams end with the cancellation event and `[DONE]`-less close,
    whole responses with a 503 envelope, half-sent bodies with a 503 too; uvicorn then has a few seconds to flush."""

    FLUSH_SECONDS = 5.0

    def __init__(self, app: FastAPI, served: Served, sock: socket.socket):
        import uvicorn

        settings = served.settings
        config = uvicorn.Config(app, log_config=None, access_log=False,
                                timeout_graceful_shutdown=settings.drain_seconds + self.FLUSH_SECONDS)
        self.server, self.served, self.sock = uvicorn.Server(config), served, sock
        self.server.handle_exit = self._handle_exit
        self._uvicorn_exit = uvicorn.Server.handle_exit.__get__(self.server)
        self._timer: threading.Timer | None = None

    def _handle_exit(self, sig, frame) -> None:
        if self._timer is None:
            self.served.ready = False  # /health says so at once: a load balancer stops sending
            self._timer = threading.Timer(self.served.settings.drain_seconds, self._drain_over)
            self._timer.daemon = True
            self._timer.start()
        self._uvicorn_exit(sig, frame)

    def _drain_over(self) -> None:
        logger.info("drain time over: cancelling the requests still in flight")
        self.served.draining_over = True
        self.served.scheduler.cancel_all()

    def run(self) -> None:
        self.server.run(sockets=[self.sock])
        if self._timer is not None:
            self._timer.cancel()


def serve(model: str, hub=None, settings: ServeSettings = ServeSettings()) -> None:
    """Load `model` (run dir, checkpoint, export dir or hub name, revision-verified) and serve it until SIGTERM/SIGINT.

    `settings` were checked when they were built; the address is bound before the model loads, so a port in use is
    one error line at once. On SIGTERM the server stops accepting connections, lets in-flight requests finish for up
    to `settings.drain_seconds`, cancels what is left, and returns (the process exits 0).
    """
    import torch

    from lmkit import hub as lmkit_hub
    from lmkit.loading import load_model, load_tokenizer

    path = str(lmkit_hub.resolve(model, hub))  # resolve (and verify) a hub revision once
    template = read_chat_template(settings.chat_template) if settings.chat_template else None
    sock = bind(settings.host, settings.port)
    try:
        tokenizer = load_tokenizer(path)
        if template is not None:
            tokenizer.chat_template = template
            check_chat_template(tokenizer, "--chat-template")
        loaded = load_model(path)
    except BaseException:
        sock.close()
        raise
    torch.set_num_threads(settings.threads or default_threads())
    scheduler = Scheduler(loaded, tokenizer, settings.max_batch_size, settings.max_queue)
    app = create_app(scheduler, tokenizer, model, loaded.config.n_positions, settings)
    server = _DrainingServer(app, app.state.served, sock)
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler that ignores it lets the process
    # end normally (exit 0) after the drain instead of dying of SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: None)
    host, port = sock.getsockname()[:2]
    logger.info("serving %s (%s) on http://%s:%d%s", model, path, host, port,
                " (API key required)" if settings.api_key else "")
    server.run()
