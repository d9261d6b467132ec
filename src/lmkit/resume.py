"""What a run directory remembers about itself, and what `lmkit train --resume` may change.

A run records its identity when it starts (`RunDir.identity`): the resolved recipe, the SHA-256 of every corpus file
(content only, so a moved corpus is the same corpus), the SHA-256 of the tokenizer it trains with and of its chat
template. `--resume` compares the recipe and the files it is given with that record before anything is written:

- settings that cannot change mid-run (`IMMUTABLE`: the data and how it is read, cleaned and split, the tokenizer, the
  model and how it is fine-tuned, the seeds and the batch shape) -> a UserError listing every difference;
- the rest (more `max_steps`, evaluation and saving frequency, logging, `eval:`, `hub:`, `budget:`) may change, and
  each change is appended to the run's history (`RunDir.history`, one JSON object per line) with the step it took
  effect at.

Resuming a run that already reached its end changes nothing and publishes nothing (`already_finished`).
"""

import dataclasses
import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import yaml
from transformers import TrainingArguments

from lmkit import chat
from lmkit import hub as hub_lib
from lmkit.atomic import atomic_write_json, file_sha256
from lmkit.configuration import LmkitConfig
from lmkit.data.corpus import resolve_files, source_identity
from lmkit.errors import UserError
from lmkit.optimizers import OptimizerArgs
from lmkit.recipe import Recipe
from lmkit.run_dir import RunDir

logger = logging.getLogger(__name__)

# Dotted keys (or whole sections, ending in ".") that a resumed run must share with the run it continues.
IMMUTABLE = ("data.", "tokenizer.", "model.", "finetune.", "optimizer.", "training.seed", "training.data_seed",
             "training.per_device_train_batch_size", "training.gradient_accumulation_steps")
# Exceptions inside those: how the data is processed, not what it is; data.files is compared by content instead.
MUTABLE_INSIDE = ("data.num_proc", "data.cache_dir", "data.files")
# Never compared, nor reported as a change: the output dir is the run being resumed, whatever its spelling (relative
# or absolute, from another working directory, or the run dir moved), so another string for it is no other setting.
IGNORED = ("training.output_dir",)


def identity(recipe: Recipe, tokenizer_file: Path | None) -> dict:
    """The record `--resume` compares against: resolved recipe, corpus content hashes, tokenizer hash."""
    return {
        "recipe": recipe.resolved,
        "data_files_sha256": _data_hashes(recipe),
        "tokenizer_sha256": file_sha256(tokenizer_file) if tokenizer_file and tokenizer_file.is_file() else None,
        "chat_template_sha256": _chat_template_sha256(recipe),
    }


def _chat_template_sha256(recipe: Recipe) -> str | None:
    """The hash of the chat template's text: a .jinja file edited in place is another template under the same name."""
    if recipe.tokenizer.chat_template is None:
        return None
    return hashlib.sha256(chat.read_template(recipe.tokenizer.chat_template).encode("utf-8")).hexdigest()


def _data_hashes(recipe: Recipe) -> list[str]:
    return sorted(sha for source in resolve_files(recipe.data.files) for _, _, sha in source_identity(source))


def _tokenizer_file(recipe: Recipe, run_dir: RunDir) -> Path:
    if recipe.tokenizer.path:
        return hub_lib.resolve(recipe.tokenizer.path, recipe.hub.dir) / "tokenizer.json"
    return run_dir.tokenizer_dir / "tokenizer.json"


def remember(recipe: Recipe, run_dir: RunDir) -> None:
    """Record the identity of a run that starts now (call once the tokenizer exists), and a history line."""
    atomic_write_json(run_dir.identity, identity(recipe, _tokenizer_file(recipe, run_dir)))
    append_history(run_dir, {"event": "start"})


def append_history(run_dir: RunDir, entry: dict) -> None:
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **entry}  # noqa: UP017 (3.10)
    with open(run_dir.history, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_MISSING = object()


def _default(key: str):
    """What an absent key means: recipes keep only the given `training:` and `model:` values, and a run recorded
    before the `optimizer:` section existed trained with its defaults."""
    section, _, name = key.partition(".")
    if section == "optimizer":
        field = {f.name: f for f in dataclasses.fields(OptimizerArgs)}.get(name)
        return field.default if field is not None else _MISSING
    if section == "training":
        field = {f.name: f for f in dataclasses.fields(TrainingArguments)}.get(name)
        if field is not None and field.default is not dataclasses.MISSING:
            return field.default
    if section == "model" and name in LmkitConfig.architecture_keys():
        return getattr(LmkitConfig(vocab_size=8), name)
    return _MISSING


def _is_immutable(key: str) -> bool:
    if key in IGNORED or any(key == m or key.startswith(m + ".") for m in MUTABLE_INSIDE):
        return False
    return any(key.startswith(p) if p.endswith(".") else key == p for p in IMMUTABLE)


def recipe_changes(before: dict, after: dict) -> dict:
    """{dotted key: (before, after)} for every setting that differs between two resolved recipes."""
    old, new = _flatten(before), _flatten(after)
    changes = {}
    for key in sorted(set(old) | set(new)):
        if key in IGNORED:
            continue
        was, now = old.get(key, _MISSING), new.get(key, _MISSING)
        was = _default(key) if was is _MISSING else was
        now = _default(key) if now is _MISSING else now
        if was != now:
            changes[key] = (None if was is _MISSING else was, None if now is _MISSING else now)
    return changes


def check_resume(recipe: Recipe, run_dir: RunDir) -> dict:
    """Compare the recipe and its files with what the run recorded; return the allowed (mutable) changes.

    Raises:
        UserError: one line listing every immutable difference, before anything is read into or written to the run.
    """
    recorded = _read_identity(run_dir)
    if recorded is None:
        return {}
    changes = recipe_changes(recorded["recipe"], recipe.resolved)
    fixed = [f"{k}: {_short(v[0])} -> {_short(v[1])}" for k, v in changes.items() if _is_immutable(k)]
    if recorded.get("data_files_sha256") is not None and _data_hashes(recipe) != recorded["data_files_sha256"]:
        fixed.append("data.files: the corpus content differs from what the run trained on")
    tokenizer_file = _tokenizer_file(recipe, run_dir)
    if recorded.get("tokenizer_sha256") and tokenizer_file.is_file() and \
            file_sha256(tokenizer_file) != recorded["tokenizer_sha256"]:
        fixed.append(f"tokenizer: {tokenizer_file} differs from the tokenizer the run trained with")
    if recorded.get("chat_template_sha256") and _chat_template_sha256(recipe) != recorded["chat_template_sha256"]:
        fixed.append(f"tokenizer.chat_template: {recipe.tokenizer.chat_template} differs from the template the run "
                     f"trained with")
    if fixed:
        raise UserError(f"--resume: {run_dir.path} was started with other settings that cannot change mid-run: "
                        f"{'; '.join(fixed)}. Resume with the run's own recipe ({run_dir.recipe}), or start a new run "
                        f"in another training.output_dir")
    return {k: v for k, v in changes.items() if not _is_immutable(k)}


def _read_identity(run_dir: RunDir) -> dict | None:
    """The recorded identity; for a run made before identities were recorded, its recipe.yaml alone."""
    if run_dir.identity.is_file():
        try:
            recorded = json.loads(run_dir.identity.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{run_dir.identity}: damaged run record (not valid JSON); the run cannot be checked "
                            f"for --resume") from None
        if isinstance(recorded, dict) and isinstance(recorded.get("recipe"), dict):
            return recorded
        raise UserError(f"{run_dir.identity}: damaged run record (expected an object with a 'recipe')")
    if run_dir.recipe.is_file():
        saved = yaml.safe_load(run_dir.recipe.read_text(encoding="utf-8"))
        if isinstance(saved, dict):
            logger.warning("%s has no %s (made by an older lmkit): comparing the recipe only", run_dir.path,
                           run_dir.identity.name)
            return {"recipe": saved}
    return None


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def already_finished(recipe: Recipe, run_dir: RunDir) -> dict | None:
    """The final metrics of a finished run the recipe asks for no more training of, else None."""
    if not (run_dir.is_finished and run_dir.trainer_state.is_file()):
        return None
    try:
        state = json.loads(run_dir.trainer_state.read_text(encoding="utf-8"))
        results = json.loads(run_dir.eval_results.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{run_dir.path}: the finished run's trainer_state.json or eval_results.json is damaged "
                        f"({error})") from None
    args = recipe.training
    if args.max_steps > 0:
        more = args.max_steps > state.get("global_step", 0)
    else:
        more = args.num_train_epochs > state.get("num_train_epochs", args.num_train_epochs)
    return None if more else results
