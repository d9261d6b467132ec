"""What one client can do to the others: nothing. Poison sampling values, malformed and oversized bodies, bodies that
lie about their size, prompts no window holds, requests no queue holds, while 16 greedy streams run; each stream
must end with its solo text, the server must stay up and `/health` must answer within 100 ms throughout. Then the
server's edges: a port in use, the drain running out, a sampling failure inside the batch.
"""

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import LMKIT
from servers import PROMPTS, Server, build_tiny_model

from lmkit.serve import sampling
from lmkit.serve.scheduler import ERROR, SamplingParams, Scheduler


@pytest.fixture(scope="module")
def live(tmp_path_factory, fixtures):
    directory = tmp_path_factory.mktemp("faults") / "tiny"
    model, tokenizer = build_tiny_model(directory, fixtures)
    server = Server(directory, "--max-body-bytes", "200000", log=tmp_path_factory.mktemp("faults-log") / "log")
    yield server, str(directory), model, tokenizer
    assert server.stop() == 0, server.log.read_text()[-3000:]


# polls /health every 20 ms until a line arrives on stdin; prints the latencies (seconds; inf: not a 200)
HEALTH_WATCHER = """
import json, sys, threading, time, httpx
url, latencies, stop = sys.argv[1], [], threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
with httpx.Client(timeout=5) as client:
    while not stop.is_set():
        start = time.perf_counter()
        ok = client.get(url).status_code == 200
        latencies.append(time.perf_counter() - start if ok else float("inf"))
        time.sleep(0.02)
print(json.dumps(latencies))
"""


def _raw(server, head: bytes, body_parts=(), timeout: float = 30) -> tuple[int, bytes]:
    """Send a hand-written HTTP request (headers that lie, chunks); the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as conn:
        conn.sendall(head)
        try:
            for part in body_parts:
                conn.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything: what a limit should do
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 40:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def _poison(server, name: str) -> list[tuple[str, int]]:
    """Each abusive request once; what each was answered."""
    url, answered = f"{server.url}/v1/completions", []

    def post(label, **kwargs):
        answered.append((label, httpx.post(url, timeout=60, **kwargs).status_code))

    post("temperature 1e-300", json={"model": name, "prompt": "床", "max_tokens": 3, "temperature": 1e-300})
    post("top_p 1e-300", json={"model": name, "prompt": "床", "max_tokens": 3, "top_p": 1e-300})
    post("no content type", content=json.dumps({"model": name, "prompt": "x"}).encode(),
         headers={"Content-Type": "application/x-www-form-urlencoded"})
    post("json array", json=[1, 2, 3])
    post("empty body", content=b"", headers={"Content-Type": "application/json"})
    post("seed 2**70", json={"model": name, "prompt": "x", "max_tokens": 2, "seed": 2**70})
    post("100 prompts", json={"model": name, "prompt": ["x"] * 100, "max_tokens": 2})
    post("a prompt no window holds", json={"model": name, "prompt": "y" * 190_000, "max_tokens": 2})
    post("deep json", content=b"[" * 50_000 + b"]" * 50_000, headers={"Content-Type": "application/json"})
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (100_000, b" " * 100_000)
    answered.append(("chunked past the limit", _raw(server, head, [chunk] * 5 + [b"0\r\n\r\n"])[0]))
    with httpx.stream("POST", url, json={"model": name, "prompt": "Go", "max_tokens": 500, "stream": True,
                                         "ignore_eos": True}, timeout=60) as dropped:
        next(dropped.iter_lines())  # read one event, then hang up
    answered.append(("dropped stream", dropped.status_code))
    return answered


def test_abusive_clients_change_nothing_for_16_greedy_streams(live):
    server, name, _, _ = live
    jobs = [(prompt, 60 + 10 * i) for i, prompt in enumerate(PROMPTS)]

    def stream(prompt, max_tokens):
        text = ""
        body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    text += event["choices"][0]["text"]
        return text

    solo = [stream(*job) for job in jobs]
    # /health is timed from a process of its own: in this one, 17 client threads share one GIL and would add their
    # own waits to what the server takes
    watcher = subprocess.Popen([sys.executable, "-c", HEALTH_WATCHER, f"{server.url}/health"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            streams = [pool.submit(stream, *job) for job in jobs]
            answered = _poison(server, name)
            together = [future.result(timeout=120) for future in streams]
    finally:
        latencies = json.loads(watcher.communicate("stop\n", timeout=30)[0])
    assert together == solo
    assert dict(answered) == {
        "temperature 1e-300": 200, "top_p 1e-300": 200, "no content type": 415, "json array": 400,
        "empty body": 400, "seed 2**70": 400, "100 prompts": 400, "a prompt no window holds": 400, "deep json": 400,
        "chunked past the limit": 413, "dropped stream": 200,
    }  # fmt: skip
    assert latencies and max(latencies) < 0.1, f"/health took up to {max(latencies) * 1000:.0f} ms"
    assert server.health()["status"] == "ok" and server.process.poll() is None
    assert "Traceback" not in server.log.read_text()


def test_poison_sampling_values_are_the_greedy_answer(live):
    server, name, _, _ = live
    url = f"{server.url}/v1/completions"
    greedy = httpx.post(url, json={"model": name, "prompt": "The cat", "max_tokens": 12, "temperature": 0}).json()
    for poison in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"top_p": 1e-300, "temperature": 1.0}):
        answer = httpx.post(url, json={"model": name, "prompt": "The cat", "max_tokens": 12, **poison}).json()
        assert answer["choices"][0]["text"] == greedy["choices"][0]["text"], poison


def test_head_health_and_messages_for_bodies_that_are_not_objects(live):
    server, name, _, _ = live
    assert httpx.head(f"{server.url}/health").status_code == 200
    for body, expected in ((b"[1]", "got a JSON list"), (b"", "got nothing"), (b"7", "got a JSON int")):
        answer = httpx.post(f"{server.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and expected in answer.json()["error"]["message"]
    chat = httpx.post(f"{server.url}/v1/chat/completions",
                      json={"model": name, "messages": [{"role": "user", "content": "x" * 2000}]})
    assert chat.json()["error"]["param"] == "messages"  # no template: named on messages, not on prompt


def test_a_prompt_too_long_for_any_window_is_refused_without_tokenizing(live):
    server, name, _, _ = live
    start = time.perf_counter()
    answer = httpx.post(f"{server.url}/v1/completions", json={"model": name, "prompt": "z" * 190_000}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
    assert "bytes" in answer.json()["error"]["message"]
    assert time.perf_counter() - start < 5


# ---- the server's edges --------------------------------------------------------------------------------------------


def test_a_port_in_use_is_one_error_line_before_the_model_loads(live):
    server, name, _, _ = live
    done = subprocess.run([LMKIT, "serve", name, "--port", str(server.port)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --port") and "Traceback" not in done.stderr
    assert "in use" in done.stderr
    done = subprocess.run([LMKIT, "serve", name, "--host", "999.1.1.1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --host") and len(done.stderr.splitlines()) == 1


@pytest.mark.slow
def test_when_the_drain_runs_out_streams_end_with_the_cancellation_event(live, tmp_path):
    _, name, _, _ = live
    server = Server(name, "--drain-seconds", "1", log=tmp_path / "server.log")
    lines, started = [], threading.Event()

    def stream():
        body = {"model": name, "prompt": "Go", "max_tokens": 1000, "stream": True, "ignore_eos": True,
                "temperature": 0}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                started.set()

    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    half_sent = {}
    threads = [threading.Thread(target=stream),
               threading.Thread(target=lambda: half_sent.update(answer=_raw(server, head, [b'{"model": '])))]
    # a stream too long to finish in the drain time: the model is slowed by a long max_tokens and few threads
    for thread in threads:
        thread.start()
    assert started.wait(30)
    time.sleep(0.2)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    for thread in threads:
        thread.join(30)
    events = [line for line in lines if line]
    if events[-1] != "data: [DONE]":  # it was cut by the drain: with the cancellation event, not mid-chunk
        assert json.loads(events[-1][6:])["error"]["code"] == "cancelled"
    status, answer = half_sent["answer"]
    assert status == 503 and b'"code":"shutting_down"' in answer
    assert "Traceback" not in server.log.read_text()


def test_a_sampling_failure_ends_that_request_alone(live, monkeypatch):
    _, _, model, tokenizer = live
    real_choose = sampling.choose

    def failing(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("injected")
        return real_choose(logits, params, generator)

    monkeypatch.setattr("lmkit.serve.scheduler.choose", failing)
    scheduler = Scheduler(model, tokenizer, max_batch_size=8)
    scheduler.start()
    try:
        done, results = threading.Semaphore(0), {}

        def submit(key, prompt, params):
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            parts = []

            def on_event(event):
                parts.append(event.text)
                if event.finish_reason is not None:
                    results[key] = ("".join(parts), event.finish_reason)
                    done.release()

            return scheduler.submit(ids, params, on_event)

        greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        submit("solo", "The cat", greedy)
        assert done.acquire(timeout=60)
        poisoned = submit("poisoned", "A", SamplingParams(max_tokens=20, temperature=1.0, seed=666))
        submit("neighbour", "The cat", greedy)
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
        assert results["poisoned"][1] == ERROR and "injected" in poisoned.error
        assert results["neighbour"] == results["solo"]
        assert scheduler.alive
    finally:
        scheduler.stop()
