"""`lmkit serve`: an OpenAI-compatible HTTP server with continuous batching, streaming and a browser playground.

    protocol.py       the request and response models of the HTTP API, and its one error type
    app.py            the routes, the guards (API key, body size) and `serve`
    scheduler.py      continuous batching of concurrent generations over one KV cache
    playground.html   the page at `/`
"""

from lmkit.serve.app import API_KEY_ENV, ServeSettings, create_app, default_threads, serve

__all__ = ["API_KEY_ENV", "ServeSettings", "create_app", "default_threads", "serve"]
