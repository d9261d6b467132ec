"""The chat template (lmkit.chat): markers added as special tokens, the ids lmkit renders equal to what plain
transformers' apply_chat_template gives, the end-of-turn stop token, and templates refused with one clear line."""

import pytest
from transformers import AutoTokenizer

from lmkit import chat
from lmkit.errors import UserError
from lmkit.tokenization import TokenizerSpec, save_portable, train_tokenizer

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
])
def test_unusable_templates_are_refused_with_the_reason(tmp_path, template, message):
    path = tmp_path / "bad.jinja"
    path.write_text(template)
    with pytest.raises(UserError, match=message):
        chat.check_template(chat.read_template(str(path)))


def test_an_unknown_template_name_is_refused():
    with pytest.raises(UserError, match="'chatgpt' is neither a built-in template"):
        chat.read_template("chatgpt")
