"""`lmkit serve`: an OpenAI-compatible HTTP server with continuous batching, streaming and a browser playground.

    protocol.py       the request and response models of the HTTP API, and its one error type
    app.py            the routes, the server's settings and `serve`
    middleware.py     what stands before every route: request ids and the access log, the API key, the body
    responses.py      from a request to generations (n, best_of, limits) and back to a response or a stream
    tokens.py         the served tokenizer: prompts to ids off the event loop, token strings, bytes and offsets
    scheduler.py      continuous batching of concurrent generations over one KV cache
    sampling.py       one row's next token: penalties, bias, a draw that cannot fail, log-probabilities
    metrics.py        the Prometheus instruments behind /metrics
    playground.html   the page at `/`
"""

from lmkit.serve.app import API_KEY_ENV, ServeSettings, create_app, default_threads, serve

__all__ = ["API_KEY_ENV", "ServeSettings", "create_app", "default_threads", "serve"]
