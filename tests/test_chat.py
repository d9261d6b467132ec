"""The chat template (lmkit.chat): markers added as special tokens, the ids lmkit renders equal to what plain
transformers' apply_chat_template gives, the end-of-turn stop token, and templates refused with one clear line."""

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import LMKIT, free_port, one_error_line  # tests/ is on sys.path
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmkit import chat
from lmkit.cli import main
from lmkit.configuration import LmkitConfig
from lmkit.errors import UserError
from lmkit.modeling import LmkitForCausalLM
from lmkit.tokenization import TokenizerSpec, save_portable, train_tokenizer

REPO = Path(__file__).resolve().parents[1]

TEXTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "hello world, hello there, say hello to the theme"] * 40
CONVERSATION = [
    {"role": "system", "content": "你是诗人。"},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "床前明月光"},
    {"role": "user", "content": "say hello"},
    {"role": "assistant", "content": "hello world, 举头望明月"},
]


@pytest.fixture(scope="module", params=["bpe", "char"])
def tokenizer(request, tmp_path_factory):
    spec = TokenizerSpec(kind=request.param, vocab_size=300 if request.param == "bpe" else 200, min_frequency=1)
    trained = train_tokenizer(spec, TEXTS, tmp_path_factory.mktemp(request.param) / "tok")
    chat.add_template(trained, chat.read_template("chatml"))
    return trained


def test_chatml_markers_become_special_tokens_after_the_existing_ids(tokenizer):
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert {start, end} == {len(tokenizer) - 2, len(tokenizer) - 1}
    assert {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.all_special_tokens)
    assert chat.end_of_turn(tokenizer) == ("<|im_end|>", end)
    assert chat.stop_token_ids(tokenizer) == [end, tokenizer.eos_token_id]
    # a marker typed by a user is still the one special token (as transformers encodes it), never its characters
    assert tokenizer("a<|im_end|>b", add_special_tokens=False)["input_ids"].count(end) == 1


def test_prompt_ids_equal_apply_chat_template_of_a_plain_autotokenizer(tokenizer, tmp_path):
    save_portable(tokenizer, tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    plain = AutoTokenizer.from_pretrained(tmp_path)  # no lmkit involved in loading or rendering
    for end in (2, 4):
        context = CONVERSATION[:end]
        expected = plain.apply_chat_template(context, add_generation_prompt=True, return_dict=False)
        assert chat.prompt_ids(tokenizer, context) == expected
    assert chat.render(tokenizer, CONVERSATION) == plain.apply_chat_template(CONVERSATION, tokenize=False)


def test_turn_pieces_are_the_rendered_conversation_with_replies_and_end_of_turn_labelled(tokenizer):
    pieces = chat.turn_pieces(tokenizer, CONVERSATION)
    assert "".join(text for text, _ in pieces) == chat.render(tokenizer, CONVERSATION)
    assert [text for text, labelled in pieces if labelled] == ["床前明月光", "<|im_end|>",
                                                               "hello world, 举头望明月", "<|im_end|>"]


def test_a_template_file_with_its_own_markers_is_used_as_written(tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    template = chat.read_template(str(path))
    assert chat.template_markers(template) == ["<|end|>", "<|assistant|>"]
    tokenizer = train_tokenizer(TokenizerSpec(kind="char", vocab_size=200, min_frequency=1), TEXTS, tmp_path / "tok")
    chat.add_template(tokenizer, template)
    assert chat.end_of_turn(tokenizer)[0] == "<|end|>"


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }", r"bad.jinja:1: not a valid Jinja template"),
    ("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}", "renders no generation prompt"),
    ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: "
     "{% endif %}", r"followed by '\\n', not by a special token of the tokenizer"),
    ("{% for m in messages %}<|s|>{{ m.content | upper }}<|e|>{% endfor %}{% if add_generation_prompt %}<|s|>"
     "{% endif %}", "does not write an assistant reply right after the generation prompt"),
    ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}<|s|>"
     "{{ m.content }}<|e|>{% endfor %}{% if add_generation_prompt %}<|s|>{% endif %}",
     r"rendering a conversation \(system, user\) fails: no system role"),
    ("{% for m in messages %}<|s|>{% if m.role == 'assistant' and not loop.last %}...{% else %}{{ m.content }}"
     "{% endif %}<|e|>{% endfor %}{% if add_generation_prompt %}<|s|>{% endif %}",
     "does not render a conversation as its turns in order"),
])
def test_unusable_templates_are_refused_with_the_reason(tmp_path, template, message):
    path = tmp_path / "bad.jinja"
    path.write_text(template)
    with pytest.raises(UserError, match=message):
        chat.check_template(chat.read_template(str(path)))


def test_an_unknown_template_name_is_refused():
    with pytest.raises(UserError, match="'chatgpt' is neither a built-in template"):
        chat.read_template("chatgpt")


# ---------------------------------------------------------------------------------------------------------------------
# A chat fine-tune end to end: train, evaluate, publish, export, and the template in every copy


@pytest.fixture()
def base_model_dir(tmp_path, fixtures) -> Path:
    """A tiny random rope model with a char tokenizer of the fixture poems (no chat markers): what chat runs start
    from."""
    texts = [json.loads(line)["text"] for line in (fixtures / "zh-poetry.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer(TokenizerSpec(kind="char", vocab_size=3000, min_frequency=1), texts,
                                tmp_path / "base-tok")
    config = LmkitConfig(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tokenizer),
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, position_embedding_type="rope")
    torch.manual_seed(0)
    LmkitForCausalLM(config).save_pretrained(tmp_path / "base")
    save_portable(tokenizer, tmp_path / "base")
    return tmp_path / "base"


CHAT_RECIPE = """
data: {{files: [{corpus}], format: messages, group_field: group, block_size: 128, test_size: 0.2}}
tokenizer: {{path: {base}, chat_template: chatml}}
model: {{init_from: {base}}}
eval: {{bleu_samples: 6, max_new_tokens: 16}}
hub: {{dir: {hub}, name: t/chat, push: end}}
training:
  output_dir: {out}
  max_steps: 6
  per_device_train_batch_size: 8
  learning_rate: 3.0e-3
  eval_strategy: steps
  eval_steps: 6
  save_steps: 6
  logging_steps: 2
  report_to: none
  seed: 7
  disable_tqdm: true
"""


def chat_recipe(tmp_path, fixtures, base, name="run") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(CHAT_RECIPE.format(corpus=fixtures / "zh-chat.jsonl", base=base, hub=tmp_path / "hub",
                                       out=tmp_path / name))
    return path


@pytest.mark.slow
def test_a_chat_run_carries_its_template_to_the_run_the_hub_and_the_export(tmp_path, fixtures, base_model_dir,
                                                                           capsys):
    assert main(["train", str(chat_recipe(tmp_path, fixtures, base_model_dir))]) == 0
    run = tmp_path / "run"
    tokenizer = AutoTokenizer.from_pretrained(run)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end == len(tokenizer) - 1 and (run / "chat_template.jinja").is_file()
    assert json.loads((run / "generation_config.json").read_text())["eos_token_id"] == [end, tokenizer.eos_token_id]
    base_rows = load_file(str(base_model_dir / "model.safetensors"))["transformer.wte.weight"]
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["splits"]["train"]["assistant_tokens"] > 0 and stats["dropped_too_long"] >= 0
    results = json.loads((run / "eval_results.json").read_text())
    assert {"eval_stop_rate", "eval_exact_match", "eval_baseline_copy_bleu", "eval_baseline_frequent_bleu",
            "eval_bits_per_byte"} <= set(results)
    assert "| 0 | user: " in (run / "eval_samples.md").read_text()  # the samples table shows the conversation

    # the held-out conversations again, and another file of conversations, through `lmkit eval`
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(fixtures / "zh-chat.jsonl"), "--output", str(tmp_path / "ev"),
                 "--num-samples", "4"]) == 0
    report = json.loads((tmp_path / "ev" / "eval_report.json").read_text())
    assert "user: " in (tmp_path / "ev" / "eval_report_samples.md").read_text()
    assert report["conversations"] == 180 and report["bleu_samples"] == 4 and "eval_stop_rate" in report

    # the hub revision and its stock export: plain transformers renders the same ids and stops at <|im_end|>
    snapshot = next((tmp_path / "hub" / "models--t--chat" / "snapshots").iterdir())
    conversation = [{"role": "user", "content": "请背诵《静夜思》。"}]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
    for where in (snapshot, snapshot / "gpt-neox"):
        plain = AutoTokenizer.from_pretrained(where)
        assert plain.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False) == expected
        assert end in json.loads((where / "generation_config.json").read_text())["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(snapshot / "gpt-neox")  # a GPTNeoXForCausalLM, no lmkit
    embeddings = model.get_input_embeddings().weight.detach()
    assert embeddings.shape[0] == len(tokenizer) and not torch.equal(embeddings[:-2], base_rows)
    card = (snapshot / "README.md").read_text()
    assert "conversational" in card and "## Chat" in card and "apply_chat_template(messages" in card
    capsys.readouterr()
    assert main(["hub", "show", "t/chat", "--hub", str(tmp_path / "hub")]) == 0
    shown = capsys.readouterr().out
    assert "a chat model" in shown and "<|im_start|>, <|im_end|>" in shown and "conversations" in shown


@pytest.mark.slow
def test_lora_on_chat_data_trains_the_new_marker_rows(tmp_path, fixtures, base_model_dir):
    recipe = chat_recipe(tmp_path, fixtures, base_model_dir)
    assert main(["train", str(recipe), "finetune.method=lora", "hub.push=never", "training.max_steps=2",
                 "training.eval_steps=2", "training.save_steps=2"]) == 0
    run = tmp_path / "run"
    rows = load_file(str(run / "model.safetensors"))["transformer.wte.weight"]
    base_rows = load_file(str(base_model_dir / "model.safetensors"))["transformer.wte.weight"]
    assert torch.equal(rows[:-2], base_rows)  # LoRA: the existing embedding untouched
    assert not torch.equal(rows[-2], rows[-1])  # the two markers learned apart from their shared mean start
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"] == {"wte": [len(rows) - 2, len(rows) - 1]}


@pytest.mark.slow
def test_the_chat_recipe_runs_in_a_fast_form(tmp_path, fixtures, monkeypatch):
    """recipes/chat-zh: a tiny demo model trained and published first, then the chat fine-tune on the fixture
    conversations (the real recipe reads what `make chat-data` makes from fortunes-zh, with the same script)."""
    monkeypatch.setenv("LMKIT_HUB", str(tmp_path / "hub"))
    demo = ["data.files=[" + str(fixtures / "zh-poetry.jsonl") + "]", f"training.output_dir={tmp_path / 'demo'}",
            "training.max_steps=4", "training.eval_steps=4", "training.save_strategy=no", "eval.bleu_samples=2",
            "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "budget.time=null", "training.report_to=none"]
    assert main(["train", str(REPO / "recipes" / "quickstart-zh" / "config.yaml"), *demo]) == 0
    fast = ["data.files=[" + str(fixtures / "zh-chat.jsonl") + "]", f"training.output_dir={tmp_path / 'chat'}",
            "training.max_steps=4", "training.eval_steps=2", "training.save_steps=4", "training.logging_steps=2",
            "eval.bleu_samples=4", "training.report_to=none"]
    assert main(["train", str(REPO / "recipes" / "chat-zh" / "config.yaml"), *fast]) == 0
    results = json.loads((tmp_path / "chat" / "eval_results.json").read_text())
    assert {"eval_bleu", "eval_stop_rate", "eval_baseline_copy_bleu", "eval_baseline_frequent_bleu"} <= set(results)
    snapshot = next((tmp_path / "hub" / "models--demo--zh-chat" / "snapshots").iterdir())
    assert (snapshot / "chat_template.jinja").is_file()


@pytest.mark.slow
def test_resume_refuses_a_chat_template_file_edited_in_place(tmp_path, fixtures, base_model_dir, capsys):
    template = tmp_path / "chat.jinja"
    template.write_text(chat.CHATML)
    argv = ["train", str(chat_recipe(tmp_path, fixtures, base_model_dir)), f"tokenizer.chat_template={template}",
            "hub.push=never", "training.max_steps=2", "training.eval_steps=2", "training.save_steps=2"]
    assert main(argv) == 0
    template.write_text("{# edited #}" + chat.CHATML)
    err = one_error_line(capsys, [*argv, "--resume"])
    assert f"tokenizer.chat_template: {template} differs from the template the run trained with" in err


@pytest.mark.slow
def test_a_trained_chat_model_answers_chat_openai_through_lmkit_serve(tmp_path, fixtures, base_model_dir):
    """From a jsonl of conversations to LangChain's ChatOpenAI: one `lmkit train`, one `lmkit serve`. The server
    renders the messages as plain transformers does and stops a reply at <|im_end|>, the template's end of turn."""
    import httpx
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    assert main(["train", str(chat_recipe(tmp_path, fixtures, base_model_dir)), "hub.push=never"]) == 0
    run = tmp_path / "run"
    tokenizer = AutoTokenizer.from_pretrained(run)
    port = free_port()
    server = subprocess.Popen([LMKIT, "serve", str(run), "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        messages = [{"role": "system", "content": "你是诗人。"}, {"role": "user", "content": "请背诵《静夜思》。"}]
        served = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["tokens"]
        assert served == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        chat_model = ChatOpenAI(base_url=f"{url}/v1", api_key="none", model=str(run), max_tokens=12, temperature=0,
                                max_retries=0)
        history = [SystemMessage("你是诗人。"), HumanMessage("请背诵《静夜思》。")]
        answer = chat_model.invoke(history)
        assert "".join(chunk.content for chunk in chat_model.stream(history)) == answer.content
        # <|im_end|> made the likeliest token after 3 tokens: the reply ends there, as a finished turn
        ended = ChatOpenAI(base_url=f"{url}/v1", api_key="none", model=str(run), max_tokens=12, temperature=0,
                           max_retries=0, logit_bias={end: 100}, extra_body={"min_tokens": 3}).invoke(history)
        assert ended.response_metadata["finish_reason"] == "stop"
        assert ended.response_metadata["token_usage"]["completion_tokens"] == 4  # 3 tokens, then <|im_end|>
        assert "<|im_end|>" not in ended.content
    finally:
        server.terminate()
        server.wait(30)
