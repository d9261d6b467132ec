"""Loading a model or tokenizer by local directory or hub name: `load_model` dispatches on the config's model type.

An lmkit model loads as itself; a GPT-2 (a stock export, or any GPT-2 checkpoint) and an lmkit GPT-NeoX export load
into `LmkitForCausalLM` through the exact inverse conversions. torch and transformers are imported on first use, so
importing this module stays cheap.
"""

import json

from lmkit.errors import UserError
from lmkit.hub.store import resolve, shard_names
from lmkit.run_dir import missing_model


def load_model(model: str, hub=None):
    """`LmkitForCausalLM` from a local dir or hub name (see `resolve`).

    The model is an lmkit model, a GPT-2 or an lmkit GPT-NeoX export.
    """
    from lmkit.modeling import LmkitForCausalLM  # heavy; the hub itself (and so the CLI) imports no torch

    path = resolve(model, hub)
    missing = missing_model(path)
    if missing:
        raise UserError(missing)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path / 'config.json'}: damaged model config, not valid JSON ({error})") from None
    if (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").is_file():
        shard_names(path)  # a damaged index is one clear line here, not a traceback deep in from_pretrained
    if not isinstance(config, dict):
        raise UserError(f"{path / 'config.json'}: damaged model config, expected a JSON object")
    model_type = config.get("model_type")
    if model_type == "gpt2":
        return LmkitForCausalLM.from_gpt2(path)
    if model_type == "gpt_neox":  # an `lmkit export` of a rope model
        from lmkit.exporting import from_gpt_neox

        return from_gpt_neox(path)
    if model_type != "lmkit":  # loading it as lmkit would leave every weight randomly initialised
        raise UserError(f"{path / 'config.json'}: model_type must be lmkit, gpt2 or gpt_neox, got {model_type!r}")
    return LmkitForCausalLM.from_pretrained(path)


def load_tokenizer(model: str, hub=None):
    """The `PreTrainedTokenizerFast` of a local model or tokenizer dir or hub name (see `resolve`), as saved.

    For a directory fresh from tokenizer training, `tokenization.load_trained_tokenizer` also checks its special
    tokens.
    """
    from transformers import PreTrainedTokenizerFast  # heavy, as above

    path = resolve(model, hub)
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{path}: no tokenizer.json to load")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
