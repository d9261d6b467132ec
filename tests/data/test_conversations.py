"""Conversations (data.format: messages): the label mask on assistant replies and their end of turn, ids equal to
apply_chat_template's, truncation by whole turns, reading from every structured format, the split by group, and bad
records as one-line errors."""

import json
import re
from pathlib import Path

import pytest
from conftest import one_error_line  # tests/ is on sys.path
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from lmkit import chat
from lmkit import data as data_lib
from lmkit.errors import UserError
from lmkit.tokenization import TokenizerSpec, save_portable, train_tokenizer

TEXTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "hello world, hello there, say hello to the theme",
         "system user assistant"] * 40
SYSTEM = {"role": "system", "content": "你是诗人。"}


def turn(role, content):
    return {"role": role, "content": content}


MULTI = [SYSTEM, turn("user", "hello there"), turn("assistant", "床前明月光"), turn("user", "say hello"),
         turn("assistant", "hello world, 举头望明月")]


@pytest.fixture(scope="module", params=["bpe", "char"])
def tokenizer(request, tmp_path_factory):
    spec = TokenizerSpec(kind=request.param, vocab_size=300 if request.param == "bpe" else 200, min_frequency=1)
    trained = train_tokenizer(spec, TEXTS, tmp_path_factory.mktemp(request.param) / "tok")
    chat.add_template(trained, chat.read_template("chatml"))
    return trained


def build(tokenizer, conversations, block_size=128):
    args = data_lib.DataArgs(files=["unused.jsonl"], format="messages", block_size=block_size)
    rows = {"messages": conversations, "group": ["g"] * len(conversations)}
    splits = DatasetDict({"train": Dataset.from_dict(rows)})
    return data_lib.build_conversation_datasets(splits, tokenizer, args, vocab_size=len(tokenizer))


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_are_each_assistant_reply_and_its_end_of_turn_in_every_turn(tokenizer):
    datasets, stats = build(tokenizer, [MULTI])
    example = datasets["train"][0]
    end = chat.end_of_turn(tokenizer)[1]
    labelled = [label for label in example["labels"] if label != -100]
    expected = [*ids_of(tokenizer, "床前明月光"), end, *ids_of(tokenizer, "hello world, 举头望明月"), end]
    assert labelled == expected
    # the labelled positions are exactly where those ids are in the input: the boundary never moves
    assert [i for i, label in zip(example["input_ids"], example["labels"]) if label != -100] == expected
    assert stats["splits"]["train"]["assistant_tokens"] == len(expected)


def test_full_ids_equal_apply_chat_template_of_a_plain_autotokenizer(tokenizer, tmp_path):
    save_portable(tokenizer, tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    datasets, _ = build(tokenizer, [MULTI, MULTI[1:3]])
    for example, conversation in zip(datasets["train"], [MULTI, MULTI[1:3]]):
        assert example["input_ids"] == plain.apply_chat_template(conversation, return_dict=False)


def test_long_conversations_lose_earliest_turns_keeping_the_system_message(tokenizer):
    full = len(build(tokenizer, [MULTI])[0]["train"][0]["input_ids"])
    last_exchange = [SYSTEM, *MULTI[3:]]
    short = len(build(tokenizer, [last_exchange])[0]["train"][0]["input_ids"])
    datasets, stats = build(tokenizer, [MULTI], block_size=full - 1)
    assert datasets["train"][0]["input_ids"] == build(tokenizer, [last_exchange])[0]["train"][0]["input_ids"]
    assert stats["splits"]["train"]["truncated"] == 1 and stats["splits"]["train"]["messages_cut"] == 2
    datasets, stats = build(tokenizer, [MULTI, MULTI[1:3]], block_size=short - 1)
    assert len(datasets["train"]) == 1 and stats["dropped_too_long"] == 1
    with pytest.raises(UserError, match=r"none of the 1 train conversations fits"):
        build(tokenizer, [MULTI], block_size=4)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def records(n=20):
    return [{"messages": [turn("user", f"问题{i}"), turn("assistant", f"回答{i}")], "group": f"g{i % 10}"}
            for i in range(n)]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "saved"])
def test_conversations_are_read_from_every_structured_format(tmp_path, fmt):
    rows = records()
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "c.jsonl", rows)
    elif fmt == "json":
        path = tmp_path / "c.json"
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        dataset = Dataset.from_list(rows)
        path = tmp_path / ("c.parquet" if fmt == "parquet" else "saved")
        dataset.to_parquet(str(path)) if fmt == "parquet" else dataset.save_to_disk(str(path))
    args = data_lib.DataArgs(files=[str(path)], format="messages", test_size=0.3)
    splits, stats = data_lib.prepare_conversation_splits(args, seed=1)
    assert stats["records_read"] == 20 and stats["conversations_kept"] == 20
    read = sorted(m[1]["content"] for name in splits for m in splits[name]["messages"])
    assert read == sorted(f"回答{i}" for i in range(20))


def test_split_is_by_group_seeded_and_duplicates_are_removed(tmp_path):
    rows = records(40) + records(5)  # five exact duplicates
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    args = data_lib.DataArgs(files=[str(path)], format="messages", group_field="group", test_size=0.3)
    splits, stats = data_lib.prepare_conversation_splits(args, seed=3)
    again, _ = data_lib.prepare_conversation_splits(args, seed=3)
    assert stats["dropped"]["duplicate"] == 5 and stats["conversations_kept"] == 40
    assert not set(splits["train"]["group"]) & set(splits["test"]["group"])
    assert splits["test"]["messages"] == again["test"]["messages"]
    assert stats["splits"]["test"]["groups"] == len(set(splits["test"]["group"]))
    replies = [m[1]["content"] for m in splits["train"]["messages"]]
    assert stats["most_frequent_train_completion"] == {"text": replies[0], "count": 1}  # all distinct: the first


def test_contents_are_cleaned_and_a_conversation_with_a_dropped_message_is_dropped(tmp_path):
    rows = [{"messages": [turn("user", "ｈｅｌｌｏ\x07  there "), turn("assistant", "ok")]},
            {"messages": [turn("user", "hi"), turn("assistant", "\x07")]}] + records(4)
    args = data_lib.DataArgs(files=[str(write_jsonl(tmp_path / "c.jsonl", rows))], format="messages")
    splits, stats = data_lib.prepare_conversation_splits(args, seed=0)
    contents = [m[0]["content"] for name in splits for m in splits[name]["messages"]]
    assert "hello there" in contents and stats["dropped"]["empty"] == 1


BASE_RECIPE = """
data: {{files: [{corpus}], format: messages, block_size: 32}}
tokenizer: {{train: {{kind: char, vocab_size: 200, min_frequency: 1}}, chat_template: {template}}}
model: {{n_layer: 1, n_head: 1, n_embd: 8, n_positions: 64}}
training: {{output_dir: {out}, max_steps: 1, report_to: none}}
"""


@pytest.mark.parametrize("messages, message", [
    ([turn("user", "hi")], r"c.jsonl:2: the conversation in 'messages' has no assistant turn"),
    ([turn("user", "hi"), turn("bot", "yo")], r"c.jsonl:2: message 2 of 'messages' has role 'bot', expected one of "
                                              r"system, user, assistant"),
    ([turn("user", "hi"), turn("assistant", 5)], r"c.jsonl:2: message 2 of 'messages' \(assistant\) has content a "
                                                 r"int \('5'\), expected a string"),
    ([turn("user", " "), turn("assistant", "yo")], r"c.jsonl:2: message 1 of 'messages' \(user\) has empty content"),
    ("hi", r"c.jsonl:2: field 'messages' \(data.messages_field\) holds a str \('hi'\), expected a list of messages"),
    ([["user", "hi"]], r"c.jsonl:2: message 1 of 'messages' is \"\['user', 'hi'\]\", expected an object with role "
                       r"and content"),
])
def test_bad_conversations_are_one_line_errors_and_nothing_is_written(tmp_path, capsys, messages, message):
    corpus = write_jsonl(tmp_path / "c.jsonl", [records(1)[0], {"messages": messages}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE_RECIPE.format(corpus=corpus, template="chatml", out=tmp_path / "run"))
    err = one_error_line(capsys, ["train", recipe])
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("template, message", [
    ("{% if %}", r"t.jinja:1: not a valid Jinja template"),
    ("{% for m in messages %}<|a|>{{ m.content }}<|b|>{% endfor %}", r"t.jinja: renders no generation prompt"),
])
def test_bad_templates_stop_before_the_data_is_read(tmp_path, capsys, template, message):
    (tmp_path / "t.jinja").write_text(template)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"messages": "not read: the template stops first"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE_RECIPE.format(corpus=corpus, template=tmp_path / "t.jinja", out=tmp_path / "run"))
    err = one_error_line(capsys, ["train", recipe])
    assert "tokenizer.chat_template" in err and re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_messages_need_a_template_and_a_template_needs_messages(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", records())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE_RECIPE.format(corpus=corpus, template="null", out=tmp_path / "run"))
    assert "data.format messages needs a chat template" in one_error_line(capsys, ["train", recipe])
    err = one_error_line(capsys, ["train", recipe, "tokenizer.chat_template=chatml", "data.format=text"])
    assert "tokenizer.chat_template is for conversations: it needs data.format: messages" in err
