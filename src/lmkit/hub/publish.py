"""Push: a run, checkpoint or tokenizer directory published as a new immutable hub revision, and `main` moved to it.

A revision is staged in a hidden directory (files copied, never linked; a stock-transformers export beside an lmkit
model; the model card; the manifest last, with every file's SHA-256) and renamed into `snapshots/` in one step.
"""

import fnmatch
import json
import logging
import secrets
import shutil
import stat
from datetime import datetime, timezone
from pathlib import Path

from lmkit import __version__
from lmkit.atomic import atomic_directory, atomic_write_json, current_umask, file_sha256
from lmkit.errors import UserError
from lmkit.hub.model_card import write_model_card
from lmkit.hub.store import (
    MANIFEST,
    SHORT_REVISION,
    files_under,
    folder_name,
    hub_dir,
    main_revision,
    model_dir_of,
    model_lock,
    push_lock,
    revisions_of,
    shard_names,
    validate_name,
    write_ref,
)
from lmkit.metrics import evaluation_at
from lmkit.run_dir import ADAPTER_FILES, RESULT_FILES, RUN_FILES, RunDir, missing_model

logger = logging.getLogger(__name__)


# What a revision holds besides the run's own files (`run_dir.RUN_FILES`, `run_dir.RESULT_FILES`): the model and
# tokenizer as transformers saves them.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Pickled weights can run code when loaded; training state (optimizer.pt, rng_state.pth, ...) is simply not copied.
PICKLE_WEIGHTS = ("pytorch_model*.bin", "model*.bin", "model*.pt", "model*.pth", "*.ckpt", "adapter_model.bin")
# Revision files are read-only for everyone the umask lets read them (0444 under 022): a revision is immutable.
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


def push(source_dir, name: str, hub: str | Path | None = None, message: str | None = None) -> str:
    """Publish a run dir or checkpoint dir as a new immutable revision of `name` and move `main` to it.

    Args:
        source_dir: a training run dir or one of its `checkpoint-<step>` dirs (which borrows recipe.yaml,
            data_stats.json, tokenizer_stats.json and training_curves.png from its run dir), or a tokenizer dir.
        name: `org/name`.
        hub: the hub directory (default: see `hub_dir`).
        message: a note kept in the revision history.

    Returns:
        `"org/name@<revision>"` with the full revision id.

    Raises:
        UserError: bad name, missing source, no safetensors weights or tokenizer, or pickle weights in the source.
    """
    validate_name(name, key="hub name")
    source = Path(source_dir).expanduser()
    files = _select_source_files(source)
    hub = hub_dir(hub)
    revision = secrets.token_hex(20)
    snapshot = model_dir_of(hub, name) / "snapshots" / revision
    with push_lock(hub, name, revision), atomic_directory(snapshot) as staging:
        for rel, src in files.items():
            _copy_file(src, staging / rel)
        results = RunDir(staging).eval_results
        if results.name not in files and RunDir(source).trainer_state.is_file():
            _write_checkpoint_results(RunDir(source).trainer_state, results)
        subfolder = _add_transformers_companion(staging)
        write_model_card(staging, name, revision, subfolder, snapshot_hint=f"{folder_name(name)}/snapshots/{revision}")
        _write_manifest(staging, name, revision, source, message, subfolder)
    _advance_main(hub, name, revision)
    logger.info("pushed %s to %s@%s", source, name, revision)
    return f"{name}@{revision}"


def _select_source_files(source: Path) -> dict[str, Path]:
    """Map revision-relative paths to the source files that go into a revision."""
    if not source.is_dir():
        raise UserError(f"{source}: push source must be a run, checkpoint or tokenizer directory")
    pickled = sorted(p.name for p in source.iterdir() if any(fnmatch.fnmatch(p.name, g) for g in PICKLE_WEIGHTS))
    if pickled:
        raise UserError(
            f"{source / pickled[0]}: pickle weights are refused by the hub (they can run code when loaded); "
            "save the model with save_pretrained(), which writes model.safetensors"
        )
    has_weights = (source / "model.safetensors").is_file() or (source / "model.safetensors.index.json").is_file()
    if (source / "config.json").is_file() != has_weights:
        raise UserError(f"{source}: a model dir needs both config.json and model.safetensors")
    if not has_weights and (source / "adapter_config.json").is_file():
        raise UserError(missing_model(source))
    if not has_weights and not (source / "tokenizer.json").is_file():
        raise UserError(f"{source}: nothing to push (expected config.json + model.safetensors, or tokenizer.json)")

    names = list(MODEL_FILES + TOKENIZER_FILES + RUN_FILES + RESULT_FILES + ADAPTER_FILES)
    if (source / "model.safetensors.index.json").is_file():
        names += shard_names(source)
    files = {n: source / n for n in names if (source / n).is_file()}
    # A Trainer checkpoint sits inside its run dir, which holds the run-level artefacts.
    run = RunDir.of_model(source).path
    files.update({n: run / n for n in RUN_FILES if n not in files and (run / n).is_file()})
    return files



def _copy_file(src: Path, dst: Path) -> None:
    """Copy one file into a staging dir (a separate function so tests can slow it down to interrupt a push)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    # A copy, never a hard link: the run may overwrite its files later, and a revision must not change with them.
    shutil.copyfile(src, dst)


def _write_checkpoint_results(trainer_state: Path, dest: Path) -> None:
    """A checkpoint has no eval_results.json: take the latest evaluation logged up to its step from trainer_state."""
    state = json.loads(trainer_state.read_text(encoding="utf-8"))
    results = evaluation_at(state.get("log_history", []), state.get("global_step", 0))
    if results:
        atomic_write_json(dest, results)


def _add_transformers_companion(staging: Path) -> str | None:
    """Make the revision loadable by plain transformers; return the subfolder to load from ("" for the revision's top
    level), or None when no stock architecture can hold the model.

    A transformers model already is; an lmkit model is exported next to itself, into a subfolder named after the
    stock format (`gpt2/` for learned and sinusoidal positions, `gpt-neox/` for rope), unless it uses an option no
    stock architecture has (then it needs `import lmkit`, and the push says so).
    """
    if not (staging / "config.json").is_file():
        return ""  # a tokenizer-only revision: AutoTokenizer loads it as is
    config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type != "lmkit":
        return ""  # a transformers model type: the revision's top level loads as is
    from lmkit.exporting import export_model, stock_format  # torch and transformers: only the push that needs them

    try:
        subfolder = stock_format(config)
        export_model(staging, staging / subfolder)  # the stock weights, config and tokenizer files
    except UserError as error:
        logger.warning("no plain-transformers copy in this revision, it needs `import lmkit` to load: %s", error)
        return None
    return subfolder


def _write_manifest(staging: Path, name: str, revision: str, source: Path, message, subfolder) -> None:
    files = {}
    for rel, path in sorted(files_under(staging).items()):
        files[rel] = {"sha256": file_sha256(path), "size": path.stat().st_size}
        # Read-only files: a revision is immutable, and this stops the accidental in-place edit.
        path.chmod(_READ_ONLY & ~current_umask())
    manifest = {
        "name": name,
        "revision": revision,
        "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),  # noqa: UP017 (3.10)
        "message": message or "",
        "source": str(source.absolute()),
        "lmkit_version": __version__,
        "transformers_subfolder": subfolder,
        "files": files,
    }
    atomic_write_json(staging / MANIFEST, manifest)
    (staging / MANIFEST).chmod(_READ_ONLY & ~current_umask())


def _advance_main(hub: Path, name: str, revision: str) -> None:
    """Point `main` at `revision`, unless a concurrent push already moved it to a newer revision."""
    model_dir = model_dir_of(hub, name)
    with model_lock(hub, name):
        revisions = revisions_of(model_dir)
        current = main_revision(model_dir, revisions)
        order = {m["revision"]: i for i, m in enumerate(revisions)}
        if revision not in order:  # deleted by someone else the moment it landed: main stays valid as it is
            return
        if current != revision and order[current] > order[revision]:
            logger.warning("%s: main stays at %s, pushed concurrently after %s",
                           name, current[:SHORT_REVISION], revision)
            revision = current
        write_ref(model_dir, revision)
