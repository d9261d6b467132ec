"""A live `lmkit serve` for the serve tests: a tiny deterministic model and the subprocess that serves it.

Plain helpers rather than conftest fixtures: a second conftest.py beside tests/conftest.py would shadow the
`conftest` module the tests import from. Each test module makes its own module-scoped fixtures from these.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from conftest import LMKIT, free_port  # tests/ is on sys.path under pytest
from conftest import tiny_model as in_memory_model

from lmkit.tokenization import TokenizerSpec, train_tokenizer

API_KEY = "test-key-123"
# a template any char-level tokenizer of the fixtures can write: "role: content" lines, then "assistant:"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
SCREENSHOT = Path("/tmp/lmkit-playground.png")  # outside the repository, for the human reading the test run
PROMPTS = ["The cat", "A", "When the weight of the paperwork equals the weight", "Q: why?\nA:", "xyz" * 12,
           "Hello, world", "-- Donald", "To be or not to be, that is", "9", "Mary had a little lamb, its fleece",
           "What", "ok", "The meaning of life is", "Linux", "If at first you don't succeed, try", "#"]


def build_tiny_model(directory: Path, fixtures: Path, position_embedding_type: str = "rope", n_positions: int = 1024):
    """A char-level model with random weights: fast, deterministic, and decisive enough for greedy equality."""
    texts = [json.loads(line)["text"] for line in (fixtures / "en-fortunes.jsonl").open(encoding="utf-8")]
    tokenizer = train_tokenizer(TokenizerSpec(kind="char", vocab_size=200, min_frequency=1), texts, directory)
    model = in_memory_model(
        position_embedding_type, vocab_size=len(tokenizer), n_positions=n_positions, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model.save_pretrained(directory)
    return model, tokenizer


class Server:
    """A `lmkit serve` subprocess on a free port; `stop()` sends SIGTERM and returns the exit code."""

    def __init__(self, model: Path, *args: str, api_key: str | None = None, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("LMKIT_API_KEY", None)
        if api_key:
            env["LMKIT_API_KEY"] = api_key
        self.log = log
        self.process = subprocess.Popen(
            [LMKIT, "serve", str(model), "--port", str(self.port), *args],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        for _ in range(900):
            if self.process.poll() is not None:
                raise RuntimeError(f"lmkit serve exited with {self.process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.process.kill()
        raise RuntimeError(f"lmkit serve did not become ready in 90 s:\n{log.read_text()[-3000:]}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def model_name(tiny_model) -> str:
    return str(tiny_model[0])


def greedy(client, tiny_model, prompt, max_tokens, **kwargs):
    response = client.completions.create(model=model_name(tiny_model), prompt=prompt, max_tokens=max_tokens,
                                         temperature=0, **kwargs)
    return response.choices[0].text, response.choices[0].finish_reason
