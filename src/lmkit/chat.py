"""The chat template: which one a run uses, its turn markers as special tokens, and conversations rendered through it.

A chat model's tokenizer carries its template (`tokenizer.chat_template`, saved by transformers as
`chat_template.jinja`), so plain `AutoTokenizer.from_pretrained(model).apply_chat_template(messages,
add_generation_prompt=True)` gives the ids lmkit trained on, in lmkit, in transformers and in vLLM alike. The recipe
key `tokenizer.chat_template` names the built-in `chatml` or a `.jinja` file. Every `<|...|>` literal of the template
is a turn marker: one missing from the tokenizer is added as a special token, so it is always one token and never
produced from plain text.

Rendering is transformers' own (`render_jinja_template`, what `apply_chat_template` runs), fed the tokenizer's special
tokens as it is. `turn_pieces` cuts a rendered conversation into template text and assistant replies by rendering its
prefixes, so the data stage can tokenize turn by turn and label the replies exactly; `end_of_turn` is the special token
the template closes an assistant reply with, the one generation stops at.

What a server calls: `prompt_ids(tokenizer, messages)` for the ids to generate from, `stop_token_ids(tokenizer)` for
the ids that end a reply.
"""

import re
from pathlib import Path

from lmkit.errors import UserError

ROLES = ("system", "user", "assistant")

# ChatML, as Qwen and vLLM's examples write it: each message `<|im_start|>ROLE\nCONTENT<|im_end|>\n`, and the
# generation prompt `<|im_start|>assistant\n`. <|im_end|> ends a reply: it is what generation stops at.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BUILT_IN = {"chatml": CHATML}

# A turn marker: `<|` + a name without spaces or bars + `|>` (<|im_start|>, <|user|>, <|end|>).
MARKER = re.compile(r"<\|[^|<>\s]+\|>")

# The conversation the checks render: distinct plain words, so each reply can be found in the rendered text.
_PROBE = [{"role": "system", "content": "sys"}, {"role": "user", "content": "ask"},
          {"role": "assistant", "content": "reply"}, {"role": "user", "content": "more"},
          {"role": "assistant", "content": "again"}]


def _compile(template: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template  # the environment transformers uses

    return _compile_jinja_template(template)


def read_template(value: str, key: str = "tokenizer.chat_template") -> str:
    """The template source `value` names: a built-in name (`chatml`) or a `.jinja` file, parsed as transformers would.

    Raises:
        UserError: an unknown name or missing file, a file that is not UTF-8, or a template that does not parse, or
            that renders no generation prompt.
    """
    if value in BUILT_IN:
        return BUILT_IN[value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"{key}: {value!r} is neither a built-in template ({', '.join(BUILT_IN)}) nor a file; give "
                        f"chatml or the path of a .jinja file")
    try:
        template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{key}: cannot read {path}: {error}") from None
    import jinja2

    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as error:
        raise UserError(f"{key}: {path}:{error.lineno}: not a valid Jinja template ({error.message})") from None
    try:
        with_prompt = _render(template, _PROBE[1:2], True, {})
        without = _render(template, _PROBE[1:2], False, {})
    except Exception as error:  # a template may raise anything while rendering (raise_exception, undefined names)
        raise UserError(f"{key}: {path}: {_first_line(error)}") from None
    if with_prompt == without:
        raise UserError(f"{key}: {path}: renders no generation prompt (add_generation_prompt=True adds nothing); a "
                        f"chat template must open the assistant's turn when asked to")
    return template


def template_markers(template: str) -> list[str]:
    """The `<|...|>` literals of a template, in order of first appearance: the tokens that must be special."""
    return list(dict.fromkeys(MARKER.findall(template)))


def add_template(tokenizer, template: str, key: str = "tokenizer.chat_template") -> list[str]:
    """Give `tokenizer` the chat template, adding its markers missing from the vocabulary as special tokens; checked.

    Returns:
        The markers added (their ids follow the existing ones, in order): the model needs an embedding row for each.

    Raises:
        UserError: see `end_of_turn`; also when a marker of the template does not encode as one token.
    """
    vocabulary = tokenizer.get_vocab()
    added = [marker for marker in template_markers(template) if marker not in vocabulary]
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    tokenizer.chat_template = template
    for marker in template_markers(template):
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"{key}: the marker {marker} is {len(ids)} tokens of the tokenizer, not one special token")
    end_of_turn(tokenizer, key)
    turn_pieces(tokenizer, _PROBE)  # a template that rewrites earlier turns stops here, not in the data stage
    return added


def check_template(template: str, tokenizer=None, key: str = "tokenizer.chat_template") -> None:
    """`add_template`'s checks on a copy of `tokenizer`, or where there is none yet (a tokenizer the run will train) on
    a stand-in with lmkit's special tokens: a template that cannot work stops before any data is read."""
    import copy

    add_template(copy.deepcopy(tokenizer) if tokenizer is not None else _stand_in_tokenizer(), template, key)


def _stand_in_tokenizer():
    """One token per character, with lmkit's fixed special tokens: enough to render and tokenize a template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lmkit.tokenization import EOS_TOKEN, FIXED_SPECIAL_TOKENS, PAD_TOKEN, UNK_TOKEN

    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(FIXED_SPECIAL_TOKENS)},
                                         unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.add_special_tokens(list(FIXED_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=UNK_TOKEN)


def saved_template(directory) -> str | None:
    """The chat template a saved tokenizer carries (`chat_template.jinja`, or the `chat_template` of an older
    `tokenizer_config.json`), read without loading the tokenizer; None for a model that is not a chat model."""
    import json

    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) and template else None


def has_template(tokenizer) -> bool:
    return isinstance(getattr(tokenizer, "chat_template", None), str) and bool(tokenizer.chat_template)


def _render(template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict) -> str:
    """transformers' rendering; an error the template raises (raise_exception, an undefined name) is a ValueError."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                            add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as error:
        roles = ", ".join(m["role"] for m in messages) or "no messages"
        raise ValueError(f"rendering a conversation ({roles}) fails: {_first_line(error)}") from None
    return rendered[0]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The text of `messages` through the tokenizer's template: what `apply_chat_template(tokenize=False)` gives.

    Raises:
        UserError: the template raises an error for these messages.
    """
    try:
        return _render(tokenizer.chat_template, messages, add_generation_prompt, tokenizer.special_tokens_map)
    except ValueError as error:
        raise UserError(f"tokenizer.chat_template: {error}") from None


def plain_text(template: str, messages: list[dict]) -> str:
    """`messages` through `template` with its markers left out: what a tokenizer trained for it should learn from (the
    role names and the template's own text, beside the contents), before the markers become special tokens."""
    return MARKER.sub("", _render(template, messages, False, {}))


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids a reply to `messages` is generated from: the conversation and the opened assistant turn, exactly
    `apply_chat_template(messages, add_generation_prompt=True)`'s (the rendered text tokenized as one string)."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # a long one is cut by the caller


_END_OF_TURN: dict[tuple, str] = {}  # by (template, special tokens, added tokens): probed once per process


def _end_of_turn_text(template: str, tokens: dict, added: list[str]) -> str:
    """The special token the template closes an assistant reply with; see `end_of_turn`."""
    key = (template, repr(sorted(tokens.items())), tuple(added))
    if key not in _END_OF_TURN:
        _END_OF_TURN[key] = _probe_end_of_turn(template, tokens, added)
    return _END_OF_TURN[key]


def _probe_end_of_turn(template: str, tokens: dict, added: list[str]) -> str:
    conversation = _PROBE[1:3]
    opened = _render(template, conversation[:1], True, tokens)
    closed = _render(template, conversation, False, tokens)
    reply = conversation[1]["content"]
    if not closed.startswith(opened + reply):
        raise ValueError("the template does not write an assistant reply right after the generation prompt "
                         f"(rendered {closed!r})")
    after = closed[len(opened) + len(reply):]
    marker = max((token for token in added if after.startswith(token)), key=len, default=None)
    if marker is None:
        raise ValueError(f"an assistant reply is followed by {after[:24]!r}, not by a special token of the tokenizer; "
                         "end each reply with a marker such as <|im_end|>")
    return marker


def end_of_turn(tokenizer, key: str = "tokenizer.chat_template") -> tuple[str, int]:
    """(text, id) of the special token that ends an assistant reply in the tokenizer's template.

    Raises:
        UserError: the template does not write the reply verbatim right after the generation prompt, or follows it
            with something other than a special token of the tokenizer.
    """
    try:
        text = _end_of_turn_text(tokenizer.chat_template, tokenizer.special_tokens_map,
                                 list(tokenizer.added_tokens_encoder))
    except ValueError as error:
        raise UserError(f"{key}: {error}") from None
    return text, tokenizer.convert_tokens_to_ids(text)


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end a reply: the template's end of turn, then the end-of-text token (if the tokenizer has one)."""
    ids = [end_of_turn(tokenizer)[1]]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def turn_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, labelled) pieces whose concatenation is `render(messages)`: each
    assistant reply and its end-of-turn token labelled, everything else (template text, system and user turns) not.

    Each assistant turn is found by rendering the conversation before it with the generation prompt: the reply must
    follow that text verbatim, then the end-of-turn token.

    Raises:
        UserError: the template renders a conversation other than as its turns in order (one that rewrites earlier
            turns, for instance).
    """
    marker, _ = end_of_turn(tokenizer)
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        opened = render(tokenizer, messages[:i], add_generation_prompt=True)
        closed = render(tokenizer, messages[:i + 1])
        reply = message["content"] + marker
        if not opened.startswith(done) or not closed.startswith(opened + reply):
            raise UserError(f"tokenizer.chat_template: the template does not render a conversation as its turns in "
                            f"order (turn {i + 1} of {len(messages)}); lmkit labels replies turn by turn")
        pieces += [(opened[len(done):], False), (message["content"], True), (marker, True)]
        done = opened + reply
    full = render(tokenizer, messages)
    if not full.startswith(done):
        raise UserError("tokenizer.chat_template: the template does not render a conversation as its turns in order")
    pieces.append((full[len(done):], False))
    return [(text, labelled) for text, labelled in pieces if text]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
