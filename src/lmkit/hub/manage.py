"""Managing a hub: list models, show one, delete a model or revision, verify every file, collect leftovers."""

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from lmkit import chat
from lmkit.errors import UserError
from lmkit.hub.model_card import architecture, read_json
from lmkit.hub.store import (
    REVISION_ID,
    find_revision,
    hub_dir,
    main_revision,
    model_dir_of,
    model_lock,
    name_of,
    no_model,
    push_lock_path,
    read_ref,
    ref_path,
    revisions_of,
    split_ref,
    validate_name,
    verify_revision,
    write_ref,
)
from lmkit.metrics import with_perplexity
from lmkit.run_dir import RunDir

logger = logging.getLogger(__name__)

# List, show, delete


def _metrics(snapshot: Path) -> dict:
    """BLEU, chrF, perplexity and bits per byte of a revision (the keys present), from its eval_results.json."""
    try:
        results = with_perplexity(json.loads(RunDir(snapshot).eval_results.read_text(encoding="utf-8")))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {k: results[f"eval_{k}"] for k in ("bleu", "chrf", "perplexity", "bits_per_byte") if f"eval_{k}" in results}


def _history_entry(model_dir: Path, manifest: dict, main: str) -> dict:
    snapshot = model_dir / "snapshots" / manifest["revision"]
    return {
        "revision": manifest["revision"],
        "created": manifest["created"],
        "message": manifest["message"],
        "size": sum(f["size"] for f in manifest["files"].values()),
        "main": manifest["revision"] == main,
        "metrics": _metrics(snapshot),
        "transformers_subfolder": manifest.get("transformers_subfolder"),
        "path": str(snapshot),
    }


def list_models(hub=None) -> list[dict]:
    """One row per model with at least one finished revision: name, revisions, main, metrics, size, created."""
    hub = hub_dir(hub)
    rows = []
    for model_dir in sorted(hub.glob("models--*--*")):
        revisions = revisions_of(model_dir)
        if not revisions:
            continue
        main = main_revision(model_dir, revisions)
        head = _history_entry(model_dir, next(m for m in revisions if m["revision"] == main), main)
        rows.append({"name": name_of(model_dir), "revisions": len(revisions), **head})
    return rows


def show(name: str, hub=None) -> dict:
    """The card summary of `name[@rev]` (main by default) and the model's revision history, newest first."""
    name, spec = split_ref(name)
    hub = hub_dir(hub)
    model_dir = model_dir_of(hub, name)
    revision = find_revision(hub, name, spec)
    revisions = revisions_of(model_dir)
    main = main_revision(model_dir, revisions)
    history = [_history_entry(model_dir, m, main) for m in reversed(revisions)]
    info = {"name": name, **next(h for h in history if h["revision"] == revision), "history": history}
    snapshot = model_dir / "snapshots" / revision
    # What is shown is what was pushed: a tampered card or results file is refused, not printed.
    verify_revision(snapshot)
    info["architecture"] = architecture(snapshot)
    info["data"] = read_json(RunDir(snapshot).data_stats)
    info["tokenizer"] = read_json(RunDir(snapshot).tokenizer_stats)
    template = chat.saved_template(snapshot)
    if template is not None:  # a chat model: what its template marks turns with, and where generation stops
        stops = read_json(snapshot / "generation_config.json").get("eos_token_id")
        info["chat"] = {"markers": chat.template_markers(template),
                        "stop_token_ids": stops if isinstance(stops, list) else [stops]}
    return info


def delete(name: str, hub=None) -> None:
    """Delete a whole model (`org/name`) or one revision (`org/name@rev`).

    Deleting the revision `main` points at moves `main` to the newest remaining revision first; deleting the last
    revision deletes the model. Each removal is a rename out of sight followed by the actual removal, so readers see
    the revision either complete or gone.
    """
    name, spec = split_ref(name)
    hub = hub_dir(hub)
    model_dir = model_dir_of(hub, name)
    with model_lock(hub, name):
        if not model_dir.is_dir():
            raise no_model(name, hub)
        revisions = revisions_of(model_dir)
        if spec and REVISION_ID.match(spec) and (model_dir / "snapshots" / spec).is_dir():
            revision = spec  # by full id: also a damaged revision, which no lookup lists
        else:
            revision = find_revision(hub, name, spec) if spec else None
        remaining = [m for m in revisions if m["revision"] != revision]
        others = [p for p in (model_dir / "snapshots").glob("*") if REVISION_ID.match(p.name) and p.name != revision]
        if revision is None or not others:
            _remove_out_of_sight(model_dir, hub / f".trash-{model_dir.name}-{secrets.token_hex(4)}")
            logger.info("deleted %s from %s", name, hub)
            return
        ref = read_ref(model_dir)
        if ref == revision or main_revision(model_dir, revisions) == revision:
            if remaining:
                write_ref(model_dir, remaining[-1]["revision"])
            else:  # only damaged revisions are left: no ref rather than one naming a deleted revision
                ref_path(model_dir).unlink(missing_ok=True)
        snapshot = model_dir / "snapshots" / revision
        _remove_out_of_sight(snapshot, model_dir / "snapshots" / f".trash-{revision}")
        logger.info("deleted %s@%s from %s", name, revision, hub)


def _remove_out_of_sight(path: Path, trash: Path) -> None:
    os.replace(path, trash)
    shutil.rmtree(trash)


# ---------------------------------------------------------------------------------------------------------------------
# Verify and garbage-collect


def verify(name: str | None = None, hub=None) -> list[dict]:
    """Check every revision of `name` (every model when None): manifest, files and hashes, and each model's `main` ref.

    Returns:
        One row per revision folder and per bad ref: `name`, `revision` (None for a ref), `ok` and `problem`.
    """
    hub = hub_dir(hub)
    if name is not None:
        validate_name(name, key="model name")
        model_dirs = [model_dir_of(hub, name)]
        if not model_dirs[0].is_dir():
            raise no_model(name, hub)
    else:
        model_dirs = sorted(p for p in hub.glob("models--*") if p.is_dir()) if hub.is_dir() else []
    rows = []
    for model_dir in model_dirs:
        model_name = name_of(model_dir)
        if model_name is None:
            rows.append({"name": model_dir.name, "revision": None, "ok": False,
                         "problem": f"{model_dir}: not a folder name lmkit makes (models--<org>--<name>)"})
            continue
        snapshots = model_dir / "snapshots"
        good = set()
        for entry in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
            if not REVISION_ID.match(entry.name):
                continue  # staging and trash dirs: `gc` removes them
            try:
                verify_revision(entry)
                good.add(entry.name)
                rows.append({"name": model_name, "revision": entry.name, "ok": True, "problem": None})
            except UserError as error:
                rows.append({"name": model_name, "revision": entry.name, "ok": False, "problem": str(error)})
        ref = read_ref(model_dir)
        if good and ref not in good:
            problem = f"{ref_path(model_dir)}: " + (
                f"names {ref!r:.60}, which is not a verified revision of this model" if ref is not None else "missing"
            )
            rows.append({"name": model_name, "revision": None, "ok": False, "problem": problem})
    return rows


# Hidden entries lmkit leaves behind only when a process dies mid-way: a push's staging dir (atomic_directory's
# `.<revision>.tmp-*`), a deletion's trash dir, a swapped-out dir, a temporary ref or manifest file.
_LEFTOVER = re.compile(r"^\.(?:(?P<staging>[0-9a-f]{40})\.tmp-.*|trash-.*|.*\.old-\d+|.*\.tmp-.*)$")
_LOCK_FILE = re.compile(r"^push-([0-9a-f]{40})\.lock$")
GC_GRACE_SECONDS = 3600


def gc(hub=None, grace_seconds: float = GC_GRACE_SECONDS) -> list[Path]:
    """Remove what killed pushes and deletes left behind; return the removed paths.

    A leftover is removed only when nothing in it changed for `grace_seconds` and, for a push's staging dir, when
    no live push holds its lock (`push_lock`; the kernel drops the lock of a killed process). The grace period also
    covers hubs on filesystems where locks are not shared between machines.
    """
    hub = hub_dir(hub)
    if not hub.is_dir():
        return []
    now = time.time()
    candidates = [p for p in hub.iterdir() if p.name.startswith(".trash-")]
    for model_dir in sorted(hub.glob("models--*")):
        for folder in (model_dir / "snapshots", model_dir / "refs"):
            candidates += [p for p in folder.iterdir() if _LEFTOVER.match(p.name)] if folder.is_dir() else []
    # Lock files of killed pushes: a push that ends removes its own.
    candidates += [p for p in (hub / ".locks").glob("models--*/push-*.lock") if _LOCK_FILE.match(p.name)]
    removed = []
    for path in sorted(candidates):
        lock = _LOCK_FILE.match(path.name)
        if lock:
            name = name_of(path.parent)
            if not name or now - path.stat().st_mtime < grace_seconds or _push_is_live(hub, name, lock.group(1)):
                continue
        else:
            if now - _newest_mtime(path) < grace_seconds:
                continue
            staging = _LEFTOVER.match(path.name)
            name = name_of(path.parent.parent) if path.parent.name == "snapshots" else None
            if staging and staging.group("staging") and name and _push_is_live(hub, name, staging.group("staging")):
                continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        logger.info("removed %s", path)
    return removed


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for entry in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(root, entry)).st_mtime)
    return newest


def _push_is_live(hub: Path, name: str, revision: str) -> bool:
    """Whether a running process holds the push lock of `revision` (the lock file is only looked at, never made)."""
    try:
        with open(push_lock_path(hub, name, revision), "rb") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released as the file closes
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False
