"""The model card: the README.md of a hub revision, with a Hugging Face metadata header and how the model was made.

It reads the run artefacts a revision holds (see `lmkit.run_dir`) and the safetensors headers; `architecture` and
`read_json` also serve `lmkit hub show`.
"""

import json
import math
import struct
from pathlib import Path

import yaml

from lmkit import chat
from lmkit.atomic import atomic_write_text
from lmkit.metrics import with_perplexity
from lmkit.run_dir import RunDir


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def read_json(path: Path) -> dict:
    text = _read_text(path)
    return json.loads(text) if text else {}


def _count_parameters(directory: Path) -> int | None:
    """Parameters stored in the safetensors files, read from their headers (tied weights are stored once)."""
    total, found = 0, False
    for weights in directory.glob("*.safetensors"):
        with open(weights, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
        found = True
    return total if found else None


ARCHITECTURE_KEYS = ("model_type", "position_embedding_type", "n_layer", "n_head", "n_embd", "n_inner", "n_positions",
                     "vocab_size", "activation_function", "tie_word_embeddings")


def architecture(directory: Path) -> dict:
    config = read_json(directory / "config.json")
    arch = {k: config[k] for k in ARCHITECTURE_KEYS if config.get(k) is not None}
    params = _count_parameters(directory)
    if params is not None:
        arch["parameters"] = params
    return arch


def flatten(prefix: str, value, out: dict) -> dict:
    """Nested stats -> {'a.b': scalar}; lists are summarised by their length so a table stays readable."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        short = len(value) <= 4 and not any(isinstance(v, (dict, list)) for v in value)
        out[prefix] = value if short else f"{len(value)} items"
    else:
        out[prefix] = value
    return out


def _table(rows: dict, headers=("", "")) -> str:
    if not rows:
        return "_not recorded_\n"
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|").replace("\n", " ")
    lines = [f"| {headers[0]} | {headers[1]} |", "|---|---|"] + [f"| {k} | {cell(v)} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def _card_header(name: str, arch: dict, results: dict, is_lmkit: bool, tokenizer_kind, is_chat: bool) -> dict:
    tags = ["lmkit", "text-generation"] + (["conversational"] if is_chat else [])
    tags += [str(arch[k]) for k in ("model_type",) if k in arch]
    if "position_embedding_type" in arch:
        tags.append(f"positions-{arch['position_embedding_type']}")
    if tokenizer_kind:
        tags.append(f"tokenizer-{tokenizer_kind}")
    tags = list(dict.fromkeys(tags))  # model_type "lmkit" would repeat the library tag
    header = {"library_name": "lmkit" if is_lmkit else "transformers", "pipeline_tag": "text-generation", "tags": tags}
    metric_names = {"bleu": "BLEU", "chrf": "chrF", "perplexity": "Perplexity", "bits_per_byte": "Bits per byte"}
    metrics = [
        {"type": key, "name": label, "value": round(float(results[f"eval_{key}"]), 4)}
        for key, label in metric_names.items()
        if isinstance(results.get(f"eval_{key}"), (int, float))
    ]
    if metrics:
        header["model-index"] = [{
            "name": name,
            "results": [{
                "task": {"type": "text-generation", "name": "Text generation"},
                "dataset": {"type": "text", "name": "held-out split of the training text", "split": "test"},
                "metrics": metrics,
            }],
        }]
    return header


def _adapter_section(run: RunDir) -> str:
    """What a LoRA run's revision holds: the merged model at the top, the adapter and its base model in adapter/."""
    config = read_json(run.adapter_dir / "adapter_config.json")
    if not config:
        return ""
    base, revision = config.get("base_model_name_or_path"), config.get("revision")
    targets = config.get("target_modules") or []
    targets = sorted(targets) if isinstance(targets, (list, set)) else [str(targets)]
    rows = {"base model": base, "base revision": revision or "(a local directory: no hub revision)",
            "method": config.get("peft_type", "LORA"), "r": config.get("r"), "alpha": config.get("lora_alpha"),
            "dropout": config.get("lora_dropout"), "adapted linears": len(targets)}
    return (
        "## Adapter\n\nThis model is the LoRA fine-tune of a base model, merged into plain weights (what the files at "
        f"the top of this revision hold). `{run.adapter_dir.name}/` holds the adapter alone (peft's "
        "`adapter_config.json` and `adapter_model.safetensors`), to apply to the base model with "
        "`peft.PeftModel.from_pretrained(base, path)`.\n\n" + _table(rows, ("adapter", "value"))
    )


def _chat_section(subfolder, stop_ids) -> str:
    """How to talk to a chat model: its own template through apply_chat_template, generation stopping at the end of
    the reply (generation_config.json lists the stop ids)."""
    servers = (
        "\nServers that read the template from the tokenizer (`vllm serve` with its OpenAI chat endpoint, "
        "transformers' pipelines) use it as is"
        + (f" from the `{subfolder}/` export" if subfolder else "") + ".\n"
    ) if subfolder is not None else ""
    return (
        "## Chat\n\nThis is a chat model: its tokenizer carries the chat template it was fine-tuned with "
        "(`chat_template.jinja`), so `apply_chat_template` gives exactly the ids it was trained on, and generation "
        f"stops at the end of a reply (token ids {', '.join(map(str, stop_ids))}, from `generation_config.json`). "
        "With the model and tokenizer loaded as above:\n\n```python\n"
        'messages = [{"role": "user", "content": "Hello!"}]\n'
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True)\n"
        "output = model.generate(**inputs, max_new_tokens=64)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n```\n'
        + servers
    )


def _how_to_load(name: str, revision: str, subfolder, snapshot_hint: str, has_model: bool) -> str:
    if not has_model:
        return (
            "## How to load\n\nThis revision holds a tokenizer only.\n\n```python\n"
            f'from lmkit.hub import load_tokenizer\n\ntokenizer = load_tokenizer("{name}@{revision}")\n\n'
            "# or with plain transformers, from the revision's directory (without a config.json, transformers 5's\n"
            "# AutoTokenizer cannot take the cache_dir route):\n"
            "from transformers import AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("/path/to/hub/{snapshot_hint}")\n```\n'
        )
    lmkit_snippet = (
        "```python\nfrom lmkit.hub import load_model, load_tokenizer\n\n"
        f'model = load_model("{name}@{revision}")  # or "{name}" for the current main\n'
        f'tokenizer = load_tokenizer("{name}@{revision}")\n```\n'
    )
    text = (
        "## How to load\n\nWith lmkit (the hub dir is `$LMKIT_HUB`, else `./hub`, or pass `hub=`); loading checks "
        "every file against the revision manifest:\n\n" + lmkit_snippet
    )
    if subfolder is None:
        return text + (
            "\nWith transformers: this model uses an option no stock transformers architecture has; `import lmkit` "
            "registers its Auto classes (no `trust_remote_code`), then "
            "`AutoModelForCausalLM.from_pretrained(\"" + name + "\", "
            "cache_dir=hub, revision=..., local_files_only=True)`.\n"
        )
    sub = f', subfolder="{subfolder}"' if subfolder else ""
    return text + (
        "\nWith plain transformers, no lmkit needed: the hub is a Hugging Face cache directory. "
        "`local_files_only=True` keeps transformers from asking huggingface.co for a public repo of the same name.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'hub = "/path/to/hub"\n'
        f'kwargs = dict(cache_dir=hub, revision="{revision}"{sub}, local_files_only=True)  # or revision="main"\n'
        f'model = AutoModelForCausalLM.from_pretrained("{name}", **kwargs)\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{name}", **kwargs)\n```\n'
    )


def write_model_card(revision_dir: Path, name: str, revision: str, subfolder: str | None,
                     snapshot_hint: str) -> None:
    """Write `revision_dir/README.md`: a Hugging Face metadata header and sections on how the model was made.

    Every section draws on the run artefacts in the revision (config.json, the results, data and tokenizer statistics,
    the recipe, the samples table); an absent file leaves "not recorded" in its section.

    Args:
        subfolder: where plain transformers loads the model from ("" the top level, None: it cannot).
        snapshot_hint: the revision's path inside a hub, shown in the loading instructions.
    """
    source, run = Path(revision_dir), RunDir(revision_dir)
    arch = architecture(source)
    results = with_perplexity(read_json(run.eval_results))
    recipe_text = _read_text(run.recipe)
    recipe = (yaml.safe_load(recipe_text) if recipe_text else None) or {}
    tokenizer_stats = read_json(run.tokenizer_stats)
    train_spec = (recipe.get("tokenizer") or {}).get("train")
    tokenizer_kind = tokenizer_stats.get("kind") or (train_spec.get("kind") if isinstance(train_spec, dict) else None)
    is_chat = chat.saved_template(source) is not None
    header = _card_header(name, arch, results, arch.get("model_type") == "lmkit", tokenizer_kind, is_chat)
    adapter = read_json(run.adapter_dir / "adapter_config.json")
    if adapter.get("base_model_name_or_path"):  # Hugging Face's card field for the model this one was tuned from
        header["base_model"] = adapter["base_model_name_or_path"]

    def stats_section(title, recipe_key, stats):
        settings, stats = flatten("", recipe.get(recipe_key) or {}, {}), flatten("", stats, {})
        tables = [_table(settings, (f"recipe `{recipe_key}`", "value"))] if settings else []
        tables += [_table(stats, ("statistic", "value"))] if stats else []
        return f"## {title}\n\n" + ("\n".join(tables) or "_not recorded_\n")

    if recipe_text:
        recipe_section = (
            "The resolved recipe (`recipe.yaml` in this revision); `lmkit train recipe.yaml` re-runs it.\n\n"
            f"<details><summary>recipe.yaml</summary>\n\n```yaml\n{recipe_text.strip()}\n```\n\n</details>\n"
        )
    else:
        recipe_section = "_not recorded_\n"
    scalars = {k: v for k, v in results.items() if not isinstance(v, (dict, list))}
    plot = f"\n![training curves]({run.training_curves.name})\n" if run.training_curves.is_file() else ""
    samples = _read_text(run.eval_samples).strip().splitlines()
    if len(samples) > 40:
        samples = samples[:40] + ["", "_(first 40 lines of eval_samples.md)_"]

    parts = [
        "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n",
        f"# {name}\n\nRevision `{revision}`, trained and published with lmkit.\n",
        stats_section("Data", "data", read_json(run.data_stats)),
        stats_section("Tokenizer", "tokenizer", tokenizer_stats),
        "## Architecture\n\n" + _table(arch, ("config", "value")),
        *([_adapter_section(run)] if adapter else []),
        "## Training recipe\n\n" + recipe_section,
        "## Results\n\nOn held-out text (`eval_results.json`); `baseline_*` is the reference baseline.\n\n"
        + _table(scalars, ("metric", "value")) + plot,
        "## Sample generations\n\n" + ("\n".join(samples) + "\n" if samples else "_not recorded_\n"),
        _how_to_load(name, revision, subfolder, snapshot_hint, has_model=(source / "config.json").is_file()),
    ]
    if is_chat and (source / "config.json").is_file():
        stops = read_json(source / "generation_config.json").get("eos_token_id")
        parts.append(_chat_section(subfolder, stops if isinstance(stops, list) else [stops]))
    atomic_write_text(source / "README.md", "\n".join(parts))
