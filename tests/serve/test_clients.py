"""Programs written for OpenAI's API, run unchanged against a live `lmkit serve`: LangChain's `OpenAI` and `ChatOpenAI`
with their defaults, and lm-evaluation-harness scoring a multiple-choice task through `local-completions`, which
must agree with lm-eval's own `hf` backend on the model's stock export.

The server runs without an API key and nothing but `base_url` is configured, as a first-time user would.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LMKIT
from servers import CHAT_TEMPLATE, Server, build_tiny_model


@pytest.fixture(scope="module")
def live(tmp_path_factory, fixtures):
    directory = tmp_path_factory.mktemp("clients") / "tiny"
    _, tokenizer = build_tiny_model(directory, fixtures, n_positions=256)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    server = Server(directory, log=tmp_path_factory.mktemp("clients-log") / "server.log")
    yield server, str(directory)
    assert server.stop() == 0, server.log.read_text()[-3000:]


def test_langchain_openai_invoke_stream_and_batch_with_its_defaults(live):
    from langchain_openai import OpenAI

    server, name = live
    llm = OpenAI(base_url=f"{server.url}/v1", api_key="unused", model=name, max_tokens=16, max_retries=0)
    text = llm.invoke("The cat")  # LangChain sends frequency_penalty 0, presence_penalty 0, n 1, logprobs null...
    assert isinstance(text, str) and len(text) > 0
    greedy = OpenAI(base_url=f"{server.url}/v1", api_key="unused", model=name, max_tokens=16, temperature=0,
                    max_retries=0, extra_body={"ignore_eos": True})
    whole = greedy.invoke("The cat")
    assert "".join(greedy.stream("The cat")) == whole
    assert greedy.batch(["The cat", "A dog"]) == [whole, greedy.invoke("A dog")]


def test_langchain_chat_openai_invoke_and_stream(live):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    server, name = live
    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=name, max_tokens=12, temperature=0,
                      max_retries=0, extra_body={"ignore_eos": True})
    messages = [SystemMessage("be brief"), HumanMessage("hi")]
    answer = chat.invoke(messages)
    assert len(answer.content) == 12 and answer.response_metadata["finish_reason"] == "length"
    assert "".join(chunk.content for chunk in chat.stream(messages)) == answer.content


# ---- lm-evaluation-harness ---------------------------------------------------------------------------------------


def _multiple_choice_task(directory: Path, fixtures: Path) -> str:
    """A local lm-eval task (YAML + jsonl, no network): which ending belongs to the start of a fortune."""
    texts = [json.loads(line)["text"] for line in (fixtures / "en-fortunes.jsonl").open(encoding="utf-8")]
    texts = [t for t in texts if 30 <= len(t) <= 160][:16]
    rng = random.Random(0)
    docs = []
    for i, text in enumerate(texts):
        cut = len(text) // 2
        others = [t[len(t) // 2:] for j, t in enumerate(texts) if j != i]
        choices = [text[cut:], *rng.sample(others, 3)]
        rng.shuffle(choices)
        docs.append({"question": text[:cut], "choices": choices, "answer": choices.index(text[cut:])})
    (directory / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (directory / "lmkit_mc.yaml").write_text(
        "task: lmkit_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / 'mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    return "lmkit_mc"


def _lm_eval(directory: Path, output: Path, *model_args: str) -> tuple[float, list[list[float]]]:
    """Run the `lm_eval` CLI; its accuracy and each document's per-choice log-likelihoods."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", *model_args, "--tasks", "lmkit_mc", "--include_path", str(directory),
         "--output_path", str(output), "--log_samples", "--batch_size", "1"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(next(output.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(output.rglob("samples_lmkit_mc_*.jsonl")).open()]
    scores = [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in sorted(samples,
                                                                                       key=lambda s: s["doc_id"])]
    return results["results"]["lmkit_mc"]["acc,none"], scores


@pytest.mark.slow
def test_lm_eval_through_the_server_equals_lm_eval_on_the_export(live, fixtures, tmp_path):
    server, name = live
    _multiple_choice_task(tmp_path, fixtures)
    exported = tmp_path / "export"
    done = subprocess.run([LMKIT, "export", name, "--output", str(exported)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    served_acc, served = _lm_eval(tmp_path, tmp_path / "served", "--model", "local-completions", "--model_args",
                                  f"model={name},base_url={server.url}/v1/completions,num_concurrent=1,max_retries=1")
    local_acc, local = _lm_eval(tmp_path, tmp_path / "hf", "--model", "hf", "--model_args",
                                f"pretrained={exported},dtype=float32", "--device", "cpu")
    assert served_acc == local_acc
    assert len(served) == len(local) == 16
    for ours, theirs in zip(served, local):
        assert len(ours) == len(theirs) == 4
        assert all(abs(a - b) < 1e-4 for a, b in zip(ours, theirs)), (ours, theirs)
