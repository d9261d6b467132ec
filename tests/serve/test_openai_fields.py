"""Every field of OpenAI's completions and chat completions requests, through the official `openai` client against a
live `lmkit serve`: no-op values accepted, penalties and biases as OpenAI defines them, log-probabilities equal to
the model's own forward pass, echo, n and best_of, vLLM's tokenizer routes, Prometheus metrics and request ids.

The served model is the serve tests' tiny char-level model with a chat template added, so one server answers both
APIs; its in-memory twin computes what each answer must be.
"""

import concurrent.futures

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from servers import API_KEY, CHAT_TEMPLATE, PROMPTS, Server, build_tiny_model


@pytest.fixture(scope="module")
def served(tmp_path_factory, fixtures):
    directory = tmp_path_factory.mktemp("fields") / "tiny-chat"
    model, tokenizer = build_tiny_model(directory, fixtures)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    server = Server(directory, "--max-tokens", "1000", api_key=API_KEY,
                    log=tmp_path_factory.mktemp("fields-log") / "server.log")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield server, client, str(directory), model, tokenizer
    assert server.stop() == 0, server.log.read_text()[-3000:]


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits at every position of `ids`, computed alone."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def complete(served, **fields):
    _, client, name, _, _ = served
    return client.completions.create(model=name, **{"max_tokens": 8, "temperature": 0, **fields})


# ---- accepted as OpenAI sends them ---------------------------------------------------------------------------------


def test_the_no_op_values_of_every_field_change_nothing(served):
    _, client, name, _, _ = served
    plain = complete(served, prompt="The cat", max_tokens=12).choices[0].text
    no_ops = dict(frequency_penalty=0, presence_penalty=0, n=1, best_of=1, logit_bias={}, logprobs=None, echo=False,
                  suffix=None, stream=False, stream_options=None, user="someone", seed=None, stop=None)
    extras = {"metadata": {"a": "b"}, "store": False, "service_tier": "auto", "top_k": 0, "min_tokens": 0,
              "repetition_penalty": 1.0, "stop_token_ids": []}
    assert complete(served, prompt="The cat", max_tokens=12, **no_ops, extra_body=extras).choices[0].text == plain
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat_plain = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    chat = client.chat.completions.create(
        model=name, messages=messages, max_tokens=10, temperature=0, frequency_penalty=0, presence_penalty=0, n=1,
        logit_bias={}, logprobs=False, response_format={"type": "text"}, parallel_tool_calls=False, tools=None,
        tool_choice=None, metadata={"k": "v"}, store=False, service_tier="auto", stream_options=None, user="u",
    )  # fmt: skip
    assert chat.choices[0].message.content == chat_plain.choices[0].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    by_parts = client.chat.completions.create(model=name, messages=[messages[0], *parts], max_tokens=10,
                                              temperature=0)
    assert by_parts.choices[0].message.content == chat_plain.choices[0].message.content


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_chat_fields_lmkit_cannot_honour_are_a_400_naming_them(served, fields, param):
    _, client, name, _, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       extra_body=fields)
    assert caught.value.body["param"] == param


# ---- log-probabilities -------------------------------------------------------------------------------------------


def test_greedy_logprobs_equal_the_forward_pass_alone_and_among_16(served):
    _, _, _, model, tokenizer = served

    def check(prompt):
        response = complete(served, prompt=prompt, max_tokens=10, logprobs=5, extra_body={"ignore_eos": True})
        choice = response.choices[0]
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        generated = tokenizer(choice.text, add_special_tokens=False).input_ids
        expected = forward_logprobs(model, prompt_ids + generated)[len(prompt_ids) - 1:-1]
        for position, (token, logprob, top) in enumerate(zip(generated, choice.logprobs.token_logprobs,
                                                             choice.logprobs.top_logprobs)):
            assert abs(logprob - float(expected[position, token])) < 1e-5
            assert token == int(expected[position].argmax())  # greedy: the chosen token is the most likely one
            assert len(top) == 5 and abs(max(top.values()) - logprob) < 1e-6
        assert "".join(choice.logprobs.tokens) == choice.text
        assert choice.logprobs.text_offset == list(range(len(choice.text)))  # one character per token here
        return choice.logprobs.token_logprobs

    alone = [check(prompt) for prompt in PROMPTS[:4]]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(check, PROMPTS))
    for batched, solo in zip(together[:4], alone):
        assert len(batched) == len(solo) and all(abs(a - b) < 1e-5 for a, b in zip(batched, solo))


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt(served, as_ids):
    _, _, _, model, tokenizer = served
    text = "When the weight of the paperwork"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    choice = complete(served, prompt=ids if as_ids else text, max_tokens=0, echo=True, logprobs=1).choices[0]
    assert choice.text == text and choice.finish_reason == "length"
    scored = choice.logprobs.token_logprobs
    assert scored[0] is None and len(scored) == len(ids)
    expected = forward_logprobs(model, ids)
    assert all(abs(scored[i] - float(expected[i - 1, ids[i]])) < 1e-5 for i in range(1, len(ids)))
    assert choice.logprobs.top_logprobs[0] is None and all(len(t) in (1, 2) for t in choice.logprobs.top_logprobs[1:])
    # with a completion, the echoed prompt comes first and the completion's tokens follow it
    both = complete(served, prompt=text, max_tokens=5, echo=True, logprobs=0).choices[0]
    assert both.text.startswith(text) and len(both.logprobs.tokens) == len(ids) + 5
    assert both.logprobs.text_offset[len(ids)] == len(text)


def test_streamed_logprobs_and_echo_equal_the_whole_response(served):
    _, client, name, _, _ = served
    fields = dict(model=name, prompt="Mary had", max_tokens=30, temperature=0, logprobs=2, echo=True,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**fields).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**fields, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [lp for c in chunks if c.logprobs for lp in c.logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == whole.logprobs.text_offset


def test_chat_logprobs_have_openais_shape_streamed_or_not(served):
    _, client, name, _, _ = served
    fields = dict(model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0,
                  logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**fields).choices[0]
    content = whole.logprobs.content
    assert len(content) == 12 and "".join(t.token for t in content) == whole.message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    streamed = [t for c in client.chat.completions.create(**fields, stream=True) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 6)) for t in streamed] == [(t.token, round(t.logprob, 6)) for t in content]


# ---- penalties and biases, as OpenAI defines them -----------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"frequency_penalty": -1.0, "presence_penalty": 0.5},
    {"extra_body": {"repetition_penalty": 1.8, "ignore_eos": True}},
])
def test_penalties_follow_their_definitions(served, fields):
    """Greedy with a penalty: each token is the argmax of the forward pass's logits after the penalty, computed here
    from OpenAI's formula (mu - c * frequency - (c > 0) * presence) or vLLM's repetition penalty."""
    _, _, _, model, tokenizer = served
    prompt = "xyzxyzxyz"
    extra = fields.pop("extra_body", {"ignore_eos": True})
    response = complete(served, prompt=prompt, max_tokens=20, logprobs=0, extra_body=extra, **fields)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    generated = [tokenizer.convert_tokens_to_ids(t) for t in response.choices[0].logprobs.tokens]
    frequency, presence = fields.get("frequency_penalty", 0), fields.get("presence_penalty", 0)
    repetition = extra.get("repetition_penalty", 1.0)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids + generated])).logits[0].float()
    plain_choice = []
    for step, token in enumerate(generated):
        row = logits[len(prompt_ids) - 1 + step].clone()
        plain_choice.append(int(row.argmax()))
        counts = torch.bincount(torch.tensor(generated[:step], dtype=torch.long), minlength=row.shape[0]).float()
        if repetition != 1.0:
            seen = torch.zeros_like(row, dtype=torch.bool)
            seen[torch.tensor(prompt_ids + generated[:step])] = True
            row = torch.where(seen, torch.where(row > 0, row / repetition, row * repetition), row)
        row -= counts * frequency + (counts > 0).float() * presence
        assert token == int(row.argmax()), f"step {step}"
    assert plain_choice != generated  # the penalty changed the text: the test is not vacuous


def test_logit_bias_bans_and_forces_tokens(served):
    _, _, _, _, tokenizer = served
    plain = complete(served, prompt="The cat", max_tokens=10, extra_body={"ignore_eos": True}).choices[0].text
    banned = tokenizer.convert_tokens_to_ids(plain[0])
    text = complete(served, prompt="The cat", max_tokens=10, logit_bias={str(banned): -100},
                    extra_body={"ignore_eos": True}).choices[0].text
    assert plain[0] not in text
    forced = tokenizer.convert_tokens_to_ids("q")
    assert complete(served, prompt="The cat", max_tokens=5, logit_bias={str(forced): 100}).choices[0].text == "qqqqq"


def test_min_tokens_and_stop_token_ids(served):
    _, _, _, _, tokenizer = served
    eos = tokenizer.eos_token_id
    ended = complete(served, prompt="The cat", max_tokens=10, logit_bias={str(eos): 100}).choices[0]
    assert (ended.text, ended.finish_reason) == ("", "stop")
    held = complete(served, prompt="The cat", max_tokens=10, logit_bias={str(eos): 100},
                    extra_body={"min_tokens": 4}).choices[0]
    assert len(held.text) == 4 and held.finish_reason == "stop"  # eos banned for 4 tokens, then taken at once
    plain = complete(served, prompt="The cat", max_tokens=20, extra_body={"ignore_eos": True}).choices[0].text
    stop_id = tokenizer.convert_tokens_to_ids(plain[5])
    cut = complete(served, prompt="The cat", max_tokens=20, extra_body={"ignore_eos": True,
                                                                        "stop_token_ids": [stop_id]}).choices[0]
    assert (cut.text, cut.finish_reason) == (plain[: plain.index(plain[5])], "stop")


# ---- n and best_of -----------------------------------------------------------------------------------------------


def test_n_choices_are_distinct_and_the_same_for_a_seed(served):
    fields = dict(prompt=["Once", "Twice"], max_tokens=12, temperature=1.0, seed=11, n=3,
                  extra_body={"ignore_eos": True})
    first = [c.text for c in complete(served, **fields).choices]
    assert len(first) == 6 and len(set(first[:3])) == 3
    assert [c.text for c in complete(served, **fields).choices] == first
    single = complete(served, prompt="Once", max_tokens=12, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert single.choices[0].text == first[0]
    streamed = [""] * 6
    for chunk in complete(served, stream=True, **fields):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == first
    with pytest.raises(openai.BadRequestError):
        complete(served, prompt="Once", n=2, best_of=3, stream=True)


def test_best_of_returns_the_candidates_with_the_best_mean_logprob(served):
    fields = dict(prompt="Once", max_tokens=10, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    candidates = complete(served, n=5, logprobs=0, **fields).choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates]
    best = complete(served, n=2, best_of=5, **fields)
    ranked = [candidates[i].text for i in sorted(range(5), key=lambda i: -means[i])[:2]]
    assert [c.text for c in best.choices] == ranked
    assert best.usage.completion_tokens == 50  # every candidate counts, as OpenAI bills best_of


# ---- tokenizer routes, metrics, request ids ---------------------------------------------------------------------


def test_tokenize_detokenize_and_tokenizer_info(served):
    server, _, name, _, tokenizer = served
    headers = {"Authorization": f"Bearer {API_KEY}"}
    tokenized = httpx.post(f"{server.url}/tokenize", json={"model": name, "prompt": "The cat",
                                                           "return_token_strs": True}, headers=headers).json()
    ids = tokenizer("The cat").input_ids
    assert tokenized == {"count": len(ids), "max_model_len": 1024, "tokens": ids, "token_strs": list("The cat")}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                      headers=headers).json()
    assert chat["tokens"] == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                           add_generation_prompt=True, return_dict=False)
    detokenized = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, headers=headers).json()
    assert detokenized == {"prompt": "The cat"}
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    info = httpx.get(f"{server.url}/tokenizer_info", headers=headers).json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == CHAT_TEMPLATE
    assert info["model_max_length"] == 1024 and info["vocab_size"] == len(tokenizer)


def test_metrics_count_requests_tokens_and_latencies(served):
    server, _, _, _, _ = served
    before = _metrics(server)
    complete(served, prompt="The cat", max_tokens=7, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        complete(served, prompt="The cat", max_tokens=7, logprobs=9)
    after = _metrics(server)  # no key needed, as Prometheus scrapes
    assert after[("lmkit:requests_total", ("/v1/completions", "200"))] == \
        before.get(("lmkit:requests_total", ("/v1/completions", "200")), 0) + 1
    assert after[("lmkit:requests_total", ("/v1/completions", "400"))] >= 1
    assert after[("lmkit:generation_tokens_total", ())] == before[("lmkit:generation_tokens_total", ())] + 7
    assert after[("lmkit:prompt_tokens_total", ())] == before[("lmkit:prompt_tokens_total", ())] + 7
    assert after[("lmkit:time_to_first_token_seconds_count", ())] == \
        before[("lmkit:time_to_first_token_seconds_count", ())] + 1
    assert after[("lmkit:e2e_request_latency_seconds_count", ())] >= 1
    assert after[("lmkit:batch_size_count", ())] > before[("lmkit:batch_size_count", ())]
    assert after[("lmkit:num_requests_running", ())] == 0


def _metrics(server) -> dict:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(v for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" not in sample.labels:
                values[(sample.name, labels)] = sample.value
    return values


def test_request_ids_are_echoed_or_made(served):
    server, _, name, _, _ = served
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": name, "prompt": "Hi", "max_tokens": 2}
    given = httpx.post(f"{server.url}/v1/completions", json=body, headers={**headers, "X-Request-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123" and given.json()["id"] == "cmpl-abc-123"
    made = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
    assert len(made.headers["x-request-id"]) == 32 and made.json()["id"] == f"cmpl-{made.headers['x-request-id']}"
    assert "[abc-123]" in server.log.read_text()
