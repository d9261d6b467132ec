"""What stands in front of every route of `lmkit serve`, unknown ones included: the request id and access log, the
API key, and the request body (its size counted on the bytes actually read, its type, its arrival before the drain
ends).

Both are raw ASGI middleware rather than `@app.middleware("http")`, which pipes every streamed chunk through an extra
task and memory stream, a cost paid per generated token.
"""

import asyncio
import base64
import hmac
import logging
import time
import uuid

from lmkit.serve.protocol import APIError

logger = logging.getLogger(__name__)

_BODY_METHODS = ("POST", "PUT", "PATCH")
_REQUEST_ID = "x-request-id"


class RequestContextMiddleware:
    """Give each request an id (the client's `X-Request-Id`, else a new one), send it back in the same header, and log
    the request's method, path, status, time to the end of its response (a stream's end, for SSE) and id.

    `observe(path, status)`, when given, is told each answered request (the server's metrics).
    """

    def __init__(self, app, observe=None):
        self.app, self.observe = app, observe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"x-request-id"), "")
        request_id = given[:128] if given.isprintable() and given else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logger.info("%s %s -> %d in %.1f ms [%s]", scope["method"], scope["path"], status[0],
                        1000 * (time.perf_counter() - start), request_id)
            if self.observe is not None:
                self.observe(scope["path"], status[0])


class GuardMiddleware:
    """Refuse requests without the API key (all paths but `open_paths`), bodies that are not JSON, and bodies larger
    than `settings.max_body_bytes`, counted as they arrive whatever `Content-Length` claims.

    A body is read whole here and handed to the app from memory. While it arrives, `served.draining_over` is watched:
    a request still sending its body when the server's drain time is over gets a 503 in OpenAI's envelope.
    """

    def __init__(self, app, settings, served, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.settings, self.served, self.open_paths = app, settings, served, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.settings.api_key and scope["path"] not in self.open_paths and not self._authorised(headers):
            missing = "authorization" not in headers
            error = APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'" if missing
                             else "invalid API key", code="invalid_api_key", kind="authentication_error")
            return await error.response()(scope, receive, send)
        if scope["method"] not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type != "application/json":
            error = APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json', not "
                                  f"{content_type!r} (curl: add -H 'Content-Type: application/json')",
                             code="unsupported_media_type")
            return await error.response()(scope, receive, send)
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await APIError.too_large(limit).response()(scope, receive, send)
        body = await self._read_body(receive, limit)
        if isinstance(body, APIError):
            return await body.response()(scope, receive, send)
        if body is None:  # the client went away
            return None
        replayed = False

        async def receive_replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, receive_replay, send)

    async def _read_body(self, receive, limit: int) -> bytes | APIError | None:
        """The whole body within `limit` bytes, an error to answer instead, or None if the client disconnected."""
        parts, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), timeout=0.25)
            except asyncio.TimeoutError:  # a slow sender: fine, unless the server has stopped waiting for anyone
                if self.served.draining_over:
                    return APIError(503, "the server is shutting down; send the request again", code="shutting_down",
                                    kind="server_overloaded")
                continue
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return APIError.too_large(limit)
            parts.append(chunk)
            more = message.get("more_body", False)
        return b"".join(parts)

    def _authorised(self, headers: dict) -> bool:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":  # the playground in a browser: any user name, the key as password
            try:
                credentials = base64.b64decode(credentials).decode().partition(":")[2]
            except ValueError:
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode("latin-1", "replace"), self.settings.api_key.encode())
