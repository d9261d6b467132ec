"""`lmkit serve` against real clients: the official `openai` package, raw HTTP and a headless browser.

One tiny model (char tokenizer from the committed fixtures, 2 layers, random weights scaled up so that greedy choices
are clear) is served by one `lmkit serve` subprocess for the whole module, on a free 127.0.0.1 port, with an API key
given through the environment. Tests that stop a server (SIGTERM) start their own.
"""

import base64
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import LMKIT  # tests/ is on sys.path under pytest
from servers import API_KEY, CHAT_TEMPLATE, PROMPTS, SCREENSHOT, Server, build_tiny_model, greedy, model_name

from lmkit.generation import generate_ids
from lmkit.serve.scheduler import SamplingParams, Scheduler


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, fixtures):
    directory = tmp_path_factory.mktemp("serve") / "tiny"
    model, tokenizer = build_tiny_model(directory, fixtures)
    return directory, model, tokenizer


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    directory, _, _ = tiny_model
    running = Server(directory, "--max-tokens", "1000", api_key=API_KEY,
                     log=tmp_path_factory.mktemp("serve-log") / "server.log")
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


# ---- completions -----------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client, tiny_model):
    assert [m.id for m in client.models.list().data] == [model_name(tiny_model)]


def test_greedy_completion_equals_in_process_generate(client, tiny_model):
    _, model, tokenizer = tiny_model
    prompt = "The best way to"
    response = client.completions.create(model=model_name(tiny_model), prompt=prompt, max_tokens=24, temperature=0)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    expected_ids = generate_ids(model, [ids], tokenizer.pad_token_id, max_new_tokens=24, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id)[0]
    expected = tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert response.choices[0].text == expected
    assert response.object == "text_completion" and response.model == model_name(tiny_model)
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens == len(expected_ids)  # an end-of-text token counts, but is not shown
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    ended = expected_ids[-1] == tokenizer.eos_token_id
    assert response.choices[0].finish_reason == ("stop" if ended else "length")


def test_a_list_of_prompts_gets_one_choice_each(client, tiny_model):
    response = client.completions.create(model=model_name(tiny_model), prompt=["The cat", "A dog"], max_tokens=8,
                                         temperature=0)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [greedy(client, tiny_model, p, 8)[0] for p in ("The cat", "A dog")]


def test_streaming_sends_the_same_text_then_usage_then_done(client, server, tiny_model):
    expected, _ = greedy(client, tiny_model, "Hello", 400, extra_body={"ignore_eos": True})
    start = time.perf_counter()
    stream = client.completions.create(model=model_name(tiny_model), prompt="Hello", max_tokens=400, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks, arrivals = [], []
    for chunk in stream:
        chunks.append(chunk)
        arrivals.append(time.perf_counter() - start)
    text_chunks = [c for c in chunks if c.choices]
    # it streamed: the first text came early, the rest in several chunks (at most one per 20 ms)
    assert len(text_chunks) > 3
    assert arrivals[0] < arrivals[-1] / 2
    assert "".join(c.choices[0].text for c in text_chunks) == expected
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 400
    assert chunks[-1].usage.prompt_tokens == 5 and chunks[-1].usage.total_tokens == 405

    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": model_name(tiny_model), "prompt": "Hi", "max_tokens": 3, "stream": True},
                      timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_sequences_cut_the_text_exactly(client, tiny_model):
    full, _ = greedy(client, tiny_model, "When the", 60, extra_body={"ignore_eos": True})
    assert len(full) >= 30
    stop = full[20:22]
    expected = full[: full.find(stop)]
    text, reason = greedy(client, tiny_model, "When the", 60, stop=[stop, "\x00never"],
                          extra_body={"ignore_eos": True})
    assert (text, reason) == (expected, "stop")
    streamed = client.completions.create(model=model_name(tiny_model), prompt="When the", max_tokens=60,
                                         temperature=0, stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_a_seed_makes_sampling_reproducible(client, tiny_model):
    def sample(seed):
        response = client.completions.create(model=model_name(tiny_model), prompt="Once", max_tokens=30,
                                             temperature=1.0, top_p=0.9, seed=seed, extra_body={"ignore_eos": True})
        return response.choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_chat_on_a_base_model_says_to_use_completions(client, tiny_model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_name(tiny_model), messages=[{"role": "user", "content": "hi"}])
    message = caught.value.body["message"]
    assert "base model" in message and "/v1/completions" in message


# ---- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1001}, "max_tokens"),  # the server's per-request ceiling
        ({"n": 17}, "n"),  # past --max-n
        ({"n": 4, "max_tokens": 300}, "n"),  # 4 x 300 tokens past the ceiling
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"suffix": "and then"}, "suffix"),  # an OpenAI field lmkit cannot honour: named, not ignored
        ({"logprobs": 6}, "logprobs"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"logit_bias": {"100000": 1}}, "logit_bias"),  # not a token id of this model
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"max_tokens": "5"}, "max_tokens"),  # strict types, as OpenAI's API: no coercion
        ({"max_tokens": True}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"prompt": [True, False]}, "prompt"),
        ({"stop_token_ids": [100000]}, "stop_token_ids"),
        ({"min_tokens": 5}, "min_tokens"),  # more than max_tokens
        ({"store": True}, "store"),
        ({"stop": ""}, "stop"),
        ({"prompt": [1.5]}, "prompt"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # only with stream
        ({"prompt": "x" * 1100}, "prompt"),  # longer than the 1024-token window
        ({"prompt": "x" * 1024, "echo": True}, "prompt"),  # echo, and no room left for a token
        ({"prompt": "x" * 1000, "max_tokens": 100}, "max_tokens"),  # prompt + max_tokens past the window
    ],
)
def test_bad_fields_get_a_400_naming_the_field(client, tiny_model, kwargs, param):
    arguments = {"model": model_name(tiny_model), "prompt": "Hi", "max_tokens": 4, **kwargs}
    known = {"model", "prompt", "temperature", "top_p", "stop", "stream_options", "logprobs"}
    extra = {k: arguments.pop(k) for k in list(arguments) if k not in known}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**arguments, extra_body=extra or None)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"


def test_unknown_model_and_route_are_404(client, server):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="someone/else", prompt="Hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
    response = httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_api_key_guards_every_path_but_health(server, tiny_model):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model_name(tiny_model), prompt="Hi", max_tokens=2)
    for path in ("/", "/v1/models", "/v1/nothing"):
        response = httpx.get(server.url + path)
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"
    basic = base64.b64encode(f"me:{API_KEY}".encode()).decode()  # how a browser sends it to the playground
    assert httpx.get(f"{server.url}/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_malformed_and_oversized_bodies(server, tiny_model):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    bad_json = httpx.post(f"{server.url}/v1/completions", headers=headers, content=b'{"model": ')
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    huge = json.dumps({"model": model_name(tiny_model), "prompt": "x" * (2 << 20)})
    too_large = httpx.post(f"{server.url}/v1/completions", headers=headers, content=huge)
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds for a streamed body too
        for _ in range(3):
            yield b"x" * (1 << 20)

    assert httpx.post(f"{server.url}/v1/completions", headers=headers, content=chunked()).status_code == 413
    assert server.health()["status"] == "ok"  # and it keeps serving


# ---- batching ----------------------------------------------------------------------------------------------------


def test_16_concurrent_requests_each_equal_their_solo_result(client, server, tiny_model):
    lengths = [4 + 9 * i for i in range(16)]
    solo = [greedy(client, tiny_model, p, n, extra_body={"ignore_eos": True}) for p, n in zip(PROMPTS, lengths)]
    steps_before = server.health()["steps"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda a: greedy(client, tiny_model, *a, extra_body={"ignore_eos": True}),
                                 zip(PROMPTS, lengths)))
    assert together == solo
    # they shared decoding steps: one at a time would take sum(lengths) - 16 steps
    assert server.health()["steps"] - steps_before < (sum(lengths) - 16) / 2


@pytest.mark.parametrize("position_embedding_type", ["learned", "sinusoidal", "rope"])
def test_left_padded_batch_equals_solo_for_every_position_type(tmp_path, fixtures, position_embedding_type):
    """In process: requests joining a running batch at different steps decode exactly as they do alone."""
    model, tokenizer = build_tiny_model(tmp_path / "m", fixtures, position_embedding_type, n_positions=128)
    scheduler = Scheduler(model, tokenizer, max_batch_size=8)
    scheduler.start()
    try:
        def run(items, stagger):
            done, results = threading.Semaphore(0), {}
            for i, (prompt, n) in enumerate(items):
                ids = tokenizer(prompt, add_special_tokens=False).input_ids

                def on_event(event, i=i, parts=[]):  # noqa: B006 (one list per request, bound here)
                    parts.append(event.text)
                    if event.finish_reason is not None:
                        results[i] = "".join(parts)
                        done.release()

                scheduler.submit(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), on_event)
                time.sleep(stagger * (i % 3))
            for _ in items:
                assert done.acquire(timeout=60)
            return [results[i] for i in range(len(items))]

        items = list(zip(PROMPTS[:10], [3 + 5 * i for i in range(10)]))
        solo = [run([item], 0)[0] for item in items]
        assert run(items, 0.002) == solo
    finally:
        scheduler.stop()


def test_a_client_that_disconnects_frees_its_place(server, tiny_model):
    before = server.health()
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": model_name(tiny_model), "prompt": "Go", "max_tokens": 1000, "stream": True,
                            "ignore_eos": True, "temperature": 0}, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # the connection is closed now; the generation must leave the batch long before its 1000 tokens
    for _ in range(100):
        health = server.health()
        if health["running"] == 0 and health["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    assert health["running"] == 0 and health["cancelled"] == before["cancelled"] + 1
    assert health["generated_tokens"] - before["generated_tokens"] < 1000


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_model, tmp_path):
    directory = tiny_model[0]
    server = Server(directory, log=tmp_path / "server.log")
    result = {}

    def stream():
        with httpx.stream("POST", f"{server.url}/v1/completions",
                          json={"model": str(directory), "prompt": "Go", "max_tokens": 400, "stream": True,
                                "ignore_eos": True}, timeout=60) as response:
            result["lines"] = []
            for line in response.iter_lines():
                result["lines"].append(line)
                if len(result["lines"]) == 1:
                    started.set()

    started = threading.Event()
    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(30)
    code = server.stop(timeout=60)
    thread.join(30)
    assert code == 0, server.log.read_text()[-2000:]
    lines = [line for line in result["lines"] if line]
    assert lines[-1] == "data: [DONE]"  # the in-flight request was finished, not cut
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)


# ---- in process: chat template, full queue ---------------------------------------------------------------------


def test_chat_completions_with_a_chat_template(tiny_model):
    from fastapi.testclient import TestClient

    from lmkit.serve import create_app

    _, model, tokenizer = tiny_model
    tokenizer = tokenizer.__class__.from_pretrained(str(tiny_model[0]))
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    app = create_app(Scheduler(model, tokenizer), tokenizer, "chat", model.config.n_positions)
    with TestClient(app) as http:
        body = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10,
                "temperature": 0, "ignore_eos": True}
        response = http.post("/v1/chat/completions", json=body).json()
        assert response["object"] == "chat.completion"
        message = response["choices"][0]["message"]
        assert message["role"] == "assistant" and len(message["content"]) > 0
        assert response["usage"]["prompt_tokens"] == len("user: Hi\nassistant:")
        completion = http.post("/v1/completions", json={"model": "chat", "prompt": "user: Hi\nassistant:",
                                                        "max_tokens": 10, "temperature": 0, "ignore_eos": True})
        assert completion.json()["choices"][0]["text"] == message["content"]
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            events = [json.loads(line[6:]) for line in streamed.iter_lines() if line and line != "data: [DONE]"]
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == message["content"]
        assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_a_full_queue_answers_503(tiny_model):
    from fastapi.testclient import TestClient

    from lmkit.serve import create_app

    _, model, tokenizer = tiny_model
    app = create_app(Scheduler(model, tokenizer, max_queue=0), tokenizer, "m", model.config.n_positions)
    with TestClient(app) as http:
        response = http.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"
        assert http.get("/health").json()["status"] == "ok"


def test_responses_are_their_protocol_models(tiny_model):
    """What the app answers validates against `lmkit.serve.protocol` and is exactly what the model writes back."""
    from fastapi.testclient import TestClient

    from lmkit.serve import create_app
    from lmkit.serve.protocol import CompletionChunk, CompletionResponse, ErrorResponse, Health, ModelList

    _, model, tokenizer = tiny_model
    app = create_app(Scheduler(model, tokenizer), tokenizer, "m", model.config.n_positions)
    body = {"model": "m", "prompt": ["Hi", "Yo"], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    with TestClient(app) as http:
        answered = [(CompletionResponse, http.post("/v1/completions", json=body).json()),
                    (ModelList, http.get("/v1/models").json()), (Health, http.get("/health").json()),
                    (ErrorResponse, http.post("/v1/completions", json={**body, "n": 99}).json()),
                    (CompletionResponse, http.post("/v1/completions", json={**body, "echo": True, "logprobs": 2,
                                                                            "n": 2}).json())]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True, "logprobs": 1, "echo": True,
                                                          "stream_options": {"include_usage": True}}) as streamed:
            answered += [(CompletionChunk, json.loads(line[6:])) for line in streamed.iter_lines()
                         if line and line != "data: [DONE]"]
    for schema, sent in answered:
        assert schema.model_validate(sent).model_dump(mode="json") == sent, schema.__name__
    assert [choice["index"] for choice in answered[0][1]["choices"]] == [0, 1]
    assert [choice["index"] for choice in answered[4][1]["choices"]] == [0, 1, 2, 3]  # 2 prompts x n = 2
    assert all("usage" in chunk for _, chunk in answered[5:])  # `"usage": null` until the last chunk


def test_protocol_models_write_the_openai_shapes():
    """The JSON of each response model, key for key, as OpenAI's clients read it (and as lmkit wrote it by hand)."""
    from lmkit.serve.protocol import (
        APIError,
        AssistantMessage,
        ChatCompletionChoice,
        ChatCompletionChunk,
        ChatCompletionResponse,
        ChatCompletionStreamChoice,
        ChatDelta,
        CompletionChoice,
        CompletionChunk,
        CompletionResponse,
        CompletionStreamChoice,
        ModelCard,
        ModelList,
        Usage,
    )

    usage = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    head = {"id": "cmpl-1", "created": 7, "model": "m"}
    completion = CompletionResponse(**head, usage=Usage(**usage),
                                    choices=[CompletionChoice(index=0, text="abc", finish_reason="length")])
    assert completion.model_dump(mode="json") == {
        **head, "object": "text_completion", "usage": usage,
        "choices": [{"index": 0, "text": "abc", "finish_reason": "length", "logprobs": None}],
    }  # fmt: skip
    chat = ChatCompletionResponse(**head, usage=Usage(**usage), choices=[
        ChatCompletionChoice(index=0, message=AssistantMessage(content="abc"), finish_reason="stop")])
    assert chat.model_dump(mode="json") == {
        **head, "object": "chat.completion", "usage": usage,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "abc"}, "finish_reason": "stop",
                     "logprobs": None}],
    }  # fmt: skip

    def event(chunk, include_usage):
        text = chunk.event(include_usage)
        assert text.startswith("data: ") and text.endswith("\n\n")
        return json.loads(text[6:])

    text_chunk = CompletionChunk(**head, choices=[CompletionStreamChoice(index=1, text="ab")])
    text_choice = {"index": 1, "text": "ab", "finish_reason": None, "logprobs": None}
    assert event(text_chunk, False) == {**head, "object": "text_completion", "choices": [text_choice]}
    assert event(text_chunk, True) == {**head, "object": "text_completion", "choices": [text_choice], "usage": None}
    assert event(CompletionChunk(**head, choices=[], usage=Usage(**usage)), True)["usage"] == usage

    def delta(**fields):
        chunk = ChatCompletionChunk(**head, choices=[ChatCompletionStreamChoice(index=0, delta=ChatDelta(**fields))])
        sent = event(chunk, False)
        assert sent["object"] == "chat.completion.chunk"
        assert set(sent) == {"id", "object", "created", "model", "choices"}
        return sent["choices"][0]["delta"]

    assert delta(role="assistant", content="") == {"role": "assistant", "content": ""}  # the first chunk
    assert delta(content="ab") == {"content": "ab"}
    assert delta() == {}  # the closing chunk, which carries the finish reason

    assert ModelList(data=[ModelCard(id="m", created=7)]).model_dump(mode="json") == {
        "object": "list", "data": [{"id": "m", "object": "model", "created": 7, "owned_by": "lmkit"}]}
    cancelled = {"error": {"message": "the request was cancelled: the server is shutting down",
                           "type": "server_overloaded", "param": None, "code": "cancelled"}}
    assert json.loads(APIError.cancelled().event()[6:]) == cancelled
    response = APIError.cancelled().response()
    assert response.status_code == 503 and json.loads(response.body) == cancelled
    unauthorised = APIError(401, "invalid API key", code="invalid_api_key", kind="authentication_error").response()
    assert unauthorised.headers["WWW-Authenticate"] == 'Basic realm="lmkit"'


@pytest.mark.parametrize(
    ("field", "value"),
    [("port", 65536), ("port", -1), ("port", "80"), ("max_tokens", 0), ("max_tokens", 1.5), ("max_batch_size", True),
     ("max_queue", 0), ("max_body_bytes", 0), ("drain_seconds", -1.0), ("threads", 0), ("stream_interval_ms", -5),
     ("host", None)],
)
def test_a_bad_serve_setting_raises_a_setting_error_naming_the_field(field, value):
    from lmkit.serve import ServeSettings
    from lmkit.settings import SettingError

    with pytest.raises(SettingError) as caught:
        ServeSettings(**{field: value})
    assert caught.value.key == field
    assert str(caught.value).startswith(f"serve.{field} must be ")


def test_serve_settings_defaults_are_the_cli_defaults():
    from lmkit.serve import ServeSettings

    settings = ServeSettings()
    assert (settings.host, settings.port, settings.api_key, settings.threads) == ("127.0.0.1", 8000, None, None)
    assert (settings.max_tokens, settings.max_batch_size, settings.max_queue) == (1024, 32, 64)
    assert (settings.max_body_bytes, settings.drain_seconds, settings.stream_interval_ms) == (1 << 20, 30.0, 20.0)
    assert ServeSettings(port=0, threads=1, drain_seconds=0, stream_interval_ms=0).port == 0  # the bounds hold


# ---- the playground, in a real browser -------------------------------------------------------------------------


def _chromium() -> tuple[str | None, str | None]:
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@contextlib.contextmanager
def headless_browser(api_key: str | None):
    """A headless Chromium driven by selenium; its requests carry `api_key` as a browser would after the Basic-auth
    prompt. Skips outside CI when there is no browser; fails in CI."""
    browser, driver_path = _chromium()
    if not (browser and driver_path):
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the browser test: chromium and chromedriver are missing (`make browser`)")
        # Outside CI a developer may lack the browser (installing it needs root); CI never skips, see above.
        pytest.skip("no chromium + chromedriver here (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"lmkit-chromium-{os.getpid()}"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        if api_key:
            basic = base64.b64encode(f"me:{api_key}".encode()).decode()
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {basic}"}})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_playground_streams_text_in_a_headless_browser(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_browser(API_KEY) as driver:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text == str(server_model(server)))
        driver.find_element(By.ID, "prompt").send_keys("The cat")
        tokens = driver.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys("40")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "stats").text)
        generated = driver.find_element(By.ID, "generated").text
        assert generated.strip(), "no generated text appeared"
        assert re.search(r"\b\d+ tokens, ", driver.find_element(By.ID, "stats").text)
        assert not driver.find_elements(By.CLASS_NAME, "error")
        driver.find_element(By.ID, "tab-chat").click()  # a base model: the chat mode says why it cannot chat
        assert driver.find_element(By.ID, "no-template").is_displayed()
        assert not driver.find_element(By.ID, "send").is_enabled()
        driver.save_screenshot(str(SCREENSHOT))


def server_model(server) -> str:
    return server.health()["model"]


def test_serve_refuses_a_missing_model_with_one_error_line(tmp_path):
    done = subprocess.run([LMKIT, "serve", str(tmp_path / "nothing"), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "nothing" in done.stderr


# ---- chat templates: --chat-template, end-of-turn tokens ---------------------------------------------------------



@pytest.fixture(scope="module")
def chat_server(tiny_model, tmp_path_factory):
    """The tiny base model served with --chat-template (and the API key)."""
    work = tmp_path_factory.mktemp("chat-server")
    template = work / "chat.jinja"
    template.write_text(CHAT_TEMPLATE, encoding="utf-8")
    server = Server(tiny_model[0], "--chat-template", str(template), api_key=API_KEY, log=work / "server.log")
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


@pytest.mark.slow
def test_chat_template_flag_gives_a_base_model_chat(tiny_model, chat_server):
    directory = tiny_model[0]
    client = openai.OpenAI(base_url=f"{chat_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    chat = client.chat.completions.create(model=str(directory), messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(model=str(directory), prompt="user: Hi\nassistant:", max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == plain.choices[0].text


@pytest.mark.slow
def test_playground_chat_keeps_a_conversation_in_a_headless_browser(tiny_model, chat_server):
    """Two turns with a system prompt: each answer streams in, and the second request carries the whole conversation
    (its answer equals the API's answer to the same messages)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_browser(API_KEY) as driver:
        driver.get(chat_server.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text == str(tiny_model[0]))
        driver.find_element(By.ID, "tab-chat").click()
        for name, value in (("temperature", "0"), ("max_tokens", "12")):
            field = driver.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)
        driver.find_element(By.ID, "system").send_keys("be brief")
        answers = []
        for message in ("Hi", "And then?"):
            wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
            driver.find_element(By.ID, "message").send_keys(message)
            driver.find_element(By.ID, "send").click()
            turns = len(answers) + 1

            def answered(d):
                return (len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant")) == turns  # noqa: B023 (this turn)
                        and "tokens/s" in d.find_element(By.ID, "stats").text
                        and d.find_element(By.ID, "send").is_enabled())

            wait.until(answered)
            shown = driver.find_elements(By.CSS_SELECTOR, ".turn.assistant .content")[-1]
            answers.append(driver.execute_script("return arguments[0].textContent", shown))  # spaces kept
        assert not driver.find_elements(By.CLASS_NAME, "error")
        assert [t.text.split("\n")[0] for t in driver.find_elements(By.CSS_SELECTOR, ".turn")] == \
            ["user", "assistant", "user", "assistant"]
        driver.save_screenshot(str(SCREENSHOT.with_name("lmkit-playground-chat.png")))
    client = openai.OpenAI(base_url=f"{chat_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": answers[0]}, {"role": "user", "content": "And then?"}]
    expected = client.chat.completions.create(model=str(tiny_model[0]), messages=messages, max_tokens=12,
                                              temperature=0).choices[0].message.content
    assert answers[1] == expected and answers[1]


@pytest.mark.parametrize(("text", "expected"), [
    ("{% for m in messages %}{{ m['content'] }", "not a Jinja template"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "adds no generation prompt"),
    ("{{ raise_exception('no system messages') }}", "cannot format"),
])
def test_a_bad_chat_template_file_is_one_error_line(tiny_model, tmp_path, text, expected):
    template = tmp_path / "chat.jinja"
    template.write_text(text, encoding="utf-8")
    done = subprocess.run([LMKIT, "serve", str(tiny_model[0]), "--port", "0", "--chat-template", str(template)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --chat-template")
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_generation_configs_end_tokens_stop_generation(tiny_model):
    """A chat model's end-of-turn token sits in its generation config's eos_token_id list: generation stops there."""
    from fastapi.testclient import TestClient

    from lmkit.serve import create_app

    _, model, tokenizer = tiny_model
    body = {"model": "m", "prompt": "The cat", "max_tokens": 30, "temperature": 0}
    with TestClient(create_app(Scheduler(model, tokenizer), tokenizer, "m", model.config.n_positions)) as http:
        full = http.post("/v1/completions", json={**body, "ignore_eos": True}).json()["choices"][0]["text"]
    end_of_turn = tokenizer.convert_tokens_to_ids(full[6])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    try:
        with TestClient(create_app(Scheduler(model, tokenizer), tokenizer, "m", model.config.n_positions)) as http:
            choice = http.post("/v1/completions", json=body).json()["choices"][0]
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert (choice["text"], choice["finish_reason"]) == (full[: full.index(full[6])], "stop")


@pytest.mark.parametrize(("flags", "env_key", "expected"), [
    (["--api-key", ""], None, "error: --api-key is empty, which would leave the server open"),
    ([], "", "error: $LMKIT_API_KEY is empty, which would leave the server open"),
    (["--api-key", "clé"], None, "error: --api-key must be printable ASCII"),
    (["--api-key", " key"], None, "error: --api-key must be printable ASCII"),
])
def test_an_api_key_that_would_not_guard_the_server_is_refused(tiny_model, flags, env_key, expected):
    env = {**os.environ}
    env.pop("LMKIT_API_KEY", None)
    if env_key is not None:
        env["LMKIT_API_KEY"] = env_key
    done = subprocess.run([LMKIT, "serve", str(tiny_model[0]), "--port", "0", *flags], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 2 and done.stderr.startswith(expected), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
