"""The local model hub: named models with immutable, verified revisions in a plain directory.

The hub directory (`hub.dir`, else `$LMKIT_HUB`, else `./hub`) uses the Hugging Face cache layout, so plain
transformers can load from it offline with no lmkit installed:

    <hub>/models--<org>--<name>/
        refs/main                      the current revision id (the bare 40-hex id, like the HF cache)
        snapshots/<revision>/          one immutable revision: the model files as pushed, plus
            README.md                  the model card (Hugging Face metadata header)
            lmkit_revision.json        the manifest: SHA-256 and size of every file, message, date, source
            gpt2/ or gpt-neox/         lmkit models: the same model exported to a stock architecture (lmkit.export)
    <hub>/.locks/models--<org>--<name>/lmkit.lock   serialises moves of `main` and deletes

Why the HF cache layout rather than a layout of our own: it costs nothing (a directory of revisions plus a ref file is
what any hub needs) and buys `AutoModelForCausalLM.from_pretrained("org/name", cache_dir=hub, revision=...,
local_files_only=True)` for free. Revision ids are random 40-hex strings because huggingface_hub only takes a
revision it has no ref for as a snapshot name when it looks like a commit hash; files are stored directly in the
snapshot (no blobs/ symlinks) so a hub also works on drives and buckets without symlinks.

Dependability:
- a revision is staged in a hidden temporary directory and renamed into `snapshots/` in one step; `main` is then
  switched by writing a temporary ref file and `os.replace`-ing it, so a push killed at any moment leaves the hub
  as it was (plus, at worst, a hidden temporary directory that listing and loading ignore);
- random revision ids and rename-into-place make concurrent pushes to one name land as separate revisions; `main`
  only moves forward in time, so it always names the newest revision;
- `resolve()` re-hashes every file against the manifest and refuses added, missing or modified files;
- names are validated before any path is built, so nothing is written outside the hub; only safetensors weights
  are accepted.
"""

import contextlib
import fcntl
import fnmatch
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lmkit import __version__
from lmkit.atomic import atomic_directory, atomic_write_json, atomic_write_text, current_umask, file_sha256
from lmkit.errors import UserError
from lmkit.metrics import evaluation_at, with_perplexity
from lmkit.model_card import architecture, read_json, write_model_card
from lmkit.run_dir import ADAPTER_FILES, RESULT_FILES, RUN_FILES, RunDir
from lmkit.settings import SettingError, check_fields, setting

logger = logging.getLogger(__name__)

PUSH_MODES = ("never", "end", "every_save")
MANIFEST = "lmkit_revision.json"

# What a revision holds besides the run's own files (`run_dir.RUN_FILES`, `run_dir.RESULT_FILES`): the model and
# tokenizer as transformers saves them.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Pickled weights can run code when loaded; training state (optimizer.pt, rng_state.pth, ...) is simply not copied.
PICKLE_WEIGHTS = ("pytorch_model*.bin", "model*.bin", "model*.pt", "model*.pth", "*.ckpt", "adapter_model.bin")

# One part of org/name: what the HF hub accepts, minus anything that could become a path trick. "--" is refused
# because the folder name joins org and name with "--" ("a--b/c" and "a/b--c" would share a folder).
_NAME_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_REVISION_ID = re.compile(r"^[0-9a-f]{40}$")
# The manifest fields every reader relies on, and their JSON types.
_MANIFEST_FIELDS = {"name": str, "revision": str, "created": str, "message": str, "files": dict}
# Revision files are read-only for everyone the umask lets read them (0444 under 022): a revision is immutable.
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
SHORT_REVISION = 12  # characters of a revision id shown to people; any unique prefix of >= 4 characters resolves


@dataclass
class HubArgs:
    """The recipe's `hub:` section: where the hub is and whether a training run publishes to it."""

    dir: str | None = setting(None, "Hub directory; default $LMKIT_HUB, else ./hub (read when used, not here).")
    name: str | None = setting(None, "Model name org/name; required when push is not never.")
    push: str = setting(
        "never", "never | end (push the final model) | every_save (push every checkpoint as a revision).",
        choices=PUSH_MODES,
    )

    def __post_init__(self):
        check_fields(self, "hub")
        if self.name is not None:
            validate_name(self.name, key="hub.name")
        elif self.push != "never":
            raise SettingError("name", f"is required when hub.push is {self.push!r} (expected org/name)", "hub")


# ---------------------------------------------------------------------------------------------------------------------
# Names and paths


def hub_dir(path: str | os.PathLike | None = None) -> Path:
    """The hub directory: `path`, else `$LMKIT_HUB`, else `./hub`, as an absolute path (it may not exist yet)."""
    chosen = path if path is not None else os.environ.get("LMKIT_HUB") or "hub"
    return Path(chosen).expanduser().absolute()


def validate_name(name: str, key: str = "name") -> str:
    """Check that `name` is `org/name` with safe parts, and return it; `key` names the input in the error."""
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) != 2 or not all(_NAME_PART.match(p) and "--" not in p and ".." not in p for p in parts):
        raise UserError(
            f"{key} must be org/name (letters, digits, '.', '_', '-'; no '..' or '--'; one '/'), got {name!r}"
        )
    if len(name) > 96:
        raise UserError(f"{key} must be at most 96 characters, got {len(name)}")
    return name


def _split_ref(model: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); the name is validated, the revision spec is checked when looked up."""
    name, _, revision = model.partition("@")
    validate_name(name, key="model name")
    if "@" in model and not re.fullmatch(r"main|[0-9a-f]{4,40}", revision):
        raise UserError(f"revision in {model!r} must be 'main' or a revision id (4-40 hex digits), got {revision!r}")
    return name, revision or None


def _folder(name: str) -> str:
    return "models--" + name.replace("/", "--")


def _model_dir(hub: Path, name: str) -> Path:
    return hub / _folder(name)


@contextlib.contextmanager
def _push_lock(hub: Path, name: str, revision: str):
    """Hold a lock named after the revision being staged, so that `gc` can tell a live push's staging dir from a
    killed one's (the kernel releases the lock of a killed process); the lock file goes when the push ends."""
    lock_path = _push_lock_path(hub, name, revision)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()


def _push_lock_path(hub: Path, name: str, revision: str) -> Path:
    return hub / ".locks" / _folder(name) / f"push-{revision}.lock"


@contextlib.contextmanager
def _model_lock(hub: Path, name: str):
    """Hold an exclusive lock for `name` while `main` is read-modified-written or revisions are deleted.

    The lock file lives outside the model folder so that deleting the model (a rename of its folder) cannot strand a
    waiter on a lock inside the renamed folder. flock is released by the kernel if the holder is killed.
    """
    lock_path = hub / ".locks" / _folder(name) / "lmkit.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------------------------------------------------
# Revisions: reading manifests, finding `main`, verifying


def _read_manifest(snapshot: Path, name: str | None = None) -> dict:
    """The manifest of the revision folder `snapshot`, checked against the folder it sits in.

    Paths are only ever built from folder names; a manifest whose `revision` or `name` disagrees with its folder,
    or that is not the shape lmkit writes, marks a damaged revision (a UserError naming the file and the fault).
    """
    path = snapshot / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{snapshot}: not an lmkit hub revision ({MANIFEST} is missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: revision manifest is not valid JSON (altered after push)") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the revision manifest ({error.strerror})") from None
    problem = _manifest_problem(manifest, snapshot.name, name if name is not None else _name_of(snapshot.parent.parent))
    if problem:
        raise UserError(f"{path}: damaged revision manifest: {problem}")
    return manifest


def _manifest_problem(manifest, revision: str, name: str | None) -> str | None:
    """What is wrong with a manifest read from the folder `revision` of model `name`, or None."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    for key, kind in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            return f"field {key!r} must be a {kind.__name__}, got {manifest.get(key)!r:.80}"
    if manifest["revision"] != revision:
        return f"says revision {manifest['revision']!r:.80} but sits in folder {revision!r}"
    if name is not None and manifest["name"] != name:
        return f"says name {manifest['name']!r:.80} but sits in the folder of {name!r}"
    for rel, meta in manifest["files"].items():
        parts = rel.split("/")
        if rel.startswith("/") or any(part in ("", ".", "..") for part in parts) or rel == MANIFEST:
            return f"file entry {rel!r:.80} is not a plain path inside the revision"
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and type(meta.get("size")) is int):
            return f"file entry {rel!r:.80} needs a sha256 string and an integer size"
    return None


def _name_of(model_dir: Path) -> str | None:
    """`org/name` from a model folder `models--org--name`, or None when the folder name is not one lmkit makes."""
    parts = model_dir.name.split("--")
    if len(parts) != 3 or parts[0] != "models":
        return None
    name = f"{parts[1]}/{parts[2]}"
    try:
        return validate_name(name)
    except UserError:
        return None


_warned: set[str] = set()


def _warn_damaged(where: Path, problem: str) -> None:
    """One warning line per damaged revision and process: hub readers skip it and carry on."""
    if str(where) not in _warned:
        _warned.add(str(where))
        logger.warning("skipping damaged hub revision %s: %s (`lmkit hub verify` checks the hub)", where,
                       " ".join(problem.split()))


def _revisions(model_dir: Path) -> list[dict]:
    """Manifests of the finished, undamaged revisions of one model, oldest first.

    Hidden staging directories of pushes in progress (or killed) and snapshots not written by lmkit are skipped
    silently; a revision whose manifest is damaged is skipped with one warning line.
    """
    snapshots = model_dir / "snapshots"
    name = _name_of(model_dir)
    found = []
    for entry in sorted(snapshots.iterdir()) if name and snapshots.is_dir() else []:
        if _REVISION_ID.match(entry.name) and (entry / MANIFEST).is_file():
            try:
                found.append(_read_manifest(entry, name))
            except UserError as error:
                _warn_damaged(entry, str(error))
    return sorted(found, key=lambda m: (m["created"], m["revision"]))


def _main_revision(model_dir: Path, revisions: list[dict]) -> str | None:
    """The revision `main` names; the newest revision if the ref is missing (a first push killed just before it)."""
    known = {m["revision"] for m in revisions}
    with contextlib.suppress(FileNotFoundError):
        ref = (model_dir / "refs" / "main").read_text().strip()
        if ref in known:
            return ref
    return revisions[-1]["revision"] if revisions else None


def _find_revision(hub: Path, name: str, spec: str | None) -> str:
    model_dir = _model_dir(hub, name)
    revisions = _revisions(model_dir)
    if not revisions:
        raise UserError(f"no model {name!r} in hub {hub} (`lmkit hub list` shows what is there)")
    if spec in (None, "main"):
        return _main_revision(model_dir, revisions)
    matches = [m["revision"] for m in revisions if m["revision"].startswith(spec)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(m["revision"][:SHORT_REVISION] for m in reversed(revisions))
    if not matches:
        raise UserError(f"{name}@{spec}: no such revision in hub {hub} (revisions, newest first: {known})")
    raise UserError(f"{name}@{spec}: ambiguous revision prefix, give more digits (revisions: {known})")


def _files_under(directory: Path) -> dict[str, Path]:
    """Every non-directory entry under `directory` by POSIX relative path, symlinks included (not followed)."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for entry in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root, entry)
            found[path.relative_to(directory).as_posix()] = path
    return found


def _verify(snapshot: Path) -> dict:
    """Check every file of a revision against its manifest; any difference is a UserError naming the file."""
    manifest = _read_manifest(snapshot)
    expected = manifest["files"]
    present = _files_under(snapshot)
    present.pop(MANIFEST, None)
    added = sorted(set(present) - set(expected))
    if added:
        raise UserError(f"{present[added[0]]}: file added to hub revision after it was pushed (not in {MANIFEST})")
    for rel, meta in sorted(expected.items()):
        path = snapshot / rel
        if rel not in present:
            raise UserError(f"{path}: file missing from hub revision (listed in {MANIFEST})")
        if path.is_symlink() or path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
            raise UserError(f"{path}: file modified after push (SHA-256 does not match {MANIFEST}); re-push or delete")
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Push


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
    snapshot = _model_dir(hub, name) / "snapshots" / revision
    with _push_lock(hub, name, revision), atomic_directory(snapshot) as staging:
        for rel, src in files.items():
            _copy_file(src, staging / rel)
        results = RunDir(staging).eval_results
        if results.name not in files and RunDir(source).trainer_state.is_file():
            _write_checkpoint_results(RunDir(source).trainer_state, results)
        subfolder = _add_transformers_companion(staging)
        write_model_card(staging, name, revision, subfolder, snapshot_hint=f"{_folder(name)}/snapshots/{revision}")
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
        raise UserError(f"{source}: a LoRA checkpoint holds the adapter only, not a model; push the finished run dir "
                        f"(the merged model, with the adapter beside it)")
    if not has_weights and not (source / "tokenizer.json").is_file():
        raise UserError(f"{source}: nothing to push (expected config.json + model.safetensors, or tokenizer.json)")

    names = list(MODEL_FILES + TOKENIZER_FILES + RUN_FILES + RESULT_FILES + ADAPTER_FILES)
    if (source / "model.safetensors.index.json").is_file():
        names += _shard_names(source)
    files = {n: source / n for n in names if (source / n).is_file()}
    # A Trainer checkpoint sits inside its run dir, which holds the run-level artefacts.
    run = RunDir.of_model(source).path
    files.update({n: run / n for n in RUN_FILES if n not in files and (run / n).is_file()})
    return files


def _shard_names(model_dir: Path) -> list[str]:
    """The weight shards a `model.safetensors.index.json` names, each checked to be a plain file name that exists."""
    index_path = model_dir / "model.safetensors.index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{index_path}: damaged sharded-weights index, not valid JSON ({error})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index_path}: damaged sharded-weights index, expected a 'weight_map' of tensor names to "
                        f"shard file names")
    shards = sorted(set(weight_map.values()))
    # Shard names become paths inside the revision: plain file names only, nothing that climbs out of it.
    bad = [n for n in shards if Path(n).name != n or n.startswith(".") or not n.endswith(".safetensors")]
    if bad:
        raise UserError(f"{index_path}: shard {bad[0]!r} must be a *.safetensors file name")
    missing = [n for n in shards if not (model_dir / n).is_file()]
    if missing:
        raise UserError(f"{index_path}: damaged sharded-weights index, shard {missing[0]} is missing")
    return shards


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
    """Make the revision loadable by plain transformers; return the subfolder to load from, or None if none can.

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
    from lmkit.export import export_model, stock_format  # torch and transformers: only the push that needs them

    try:
        subfolder = stock_format(config)
        export_model(staging, staging / subfolder)  # the stock weights, config and tokenizer files
    except UserError as error:
        logger.warning("no plain-transformers copy in this revision, it needs `import lmkit` to load: %s", error)
        return None
    return subfolder


def _write_manifest(staging: Path, name: str, revision: str, source: Path, message, subfolder) -> None:
    files = {}
    for rel, path in sorted(_files_under(staging).items()):
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
    model_dir = _model_dir(hub, name)
    with _model_lock(hub, name):
        revisions = _revisions(model_dir)
        current = _main_revision(model_dir, revisions)
        order = {m["revision"]: i for i, m in enumerate(revisions)}
        if revision not in order:  # deleted by someone else the moment it landed: main stays valid as it is
            return
        if current != revision and order[current] > order[revision]:
            logger.warning("%s: main stays at %s, pushed concurrently after %s", name, current[:SHORT_REVISION], revision)
            revision = current
        _write_ref(model_dir, revision)


def _write_ref(model_dir: Path, revision: str) -> None:
    # No trailing newline: huggingface_hub reads the ref file verbatim as the snapshot name.
    atomic_write_text(model_dir / "refs" / "main", revision)


# ---------------------------------------------------------------------------------------------------------------------
# Resolve and load


def resolve(model: str, hub: str | Path | None = None) -> Path:
    """Turn a local model dir, `org/name` or `org/name@rev` into a directory that transformers can load.

    A local directory that exists and holds config.json or tokenizer.json wins over a hub name and is returned as is.
    A hub revision is verified against its manifest first.

    Raises:
        UserError: not a model dir nor a valid hub name, unknown model or revision, or a revision altered after push.
    """
    local = Path(model).expanduser()
    if local.is_dir() and ((local / "config.json").is_file() or (local / "tokenizer.json").is_file()):
        return local
    try:
        name, spec = _split_ref(model)
    except UserError as error:
        if local.is_dir():
            raise UserError(f"{model}: directory has no config.json or tokenizer.json (not a model dir)") from None
        if not local.exists() and "@" not in model and (model.startswith((".", "/", "~")) or model.count("/") != 1):
            raise UserError(f"model {model!r} is neither a local model directory nor a hub name: no such directory "
                            "(a hub name is org/name[@rev])") from None
        raise UserError(f"model {model!r} is neither a local model directory nor a hub name: {error}") from None
    hub = hub_dir(hub)
    snapshot = _model_dir(hub, name) / "snapshots" / _find_revision(hub, name, spec)
    _verify(snapshot)
    return snapshot


def revision_containing(path: str | os.PathLike) -> tuple[str, str] | None:
    """(name, revision) when `path` is a hub revision folder or lies inside one, else None.

    Nothing but push, delete and gc writes under a hub: commands given a snapshot path use this to write elsewhere.
    """
    path = Path(path).expanduser().absolute()
    for folder in (path, *path.parents):
        if folder.parent.name == "snapshots" and _REVISION_ID.match(folder.name) and (folder / MANIFEST).is_file():
            name = _name_of(folder.parent.parent)
            if name:
                return name, folder.name
    return None


def refuse_inside_revision(path: str | os.PathLike, what: str) -> None:
    """A UserError when `path` (an output of `what`) would be written inside a hub revision."""
    found = revision_containing(path)
    if found:
        raise UserError(f"{what} {path} is inside hub revision {found[0]}@{found[1][:SHORT_REVISION]}, which is "
                        f"immutable; choose a path outside the hub")


def load_model(model: str, hub=None):
    """`LmkitForCausalLM` from a local dir or hub name (see `resolve`): an lmkit model, a GPT-2 or an lmkit GPT-NeoX export."""
    from lmkit.modeling import LmkitForCausalLM  # heavy; the hub itself (and so the CLI) imports no torch

    path = resolve(model, hub)
    if not (path / "config.json").is_file():
        raise UserError(f"{model}: no config.json here: a tokenizer directory, not a model")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path / 'config.json'}: damaged model config, not valid JSON ({error})") from None
    if (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").is_file():
        _shard_names(path)  # a damaged index is one clear line here, not a traceback deep in from_pretrained
    if not isinstance(config, dict):
        raise UserError(f"{path / 'config.json'}: damaged model config, expected a JSON object")
    model_type = config.get("model_type")
    if model_type == "gpt2":
        return LmkitForCausalLM.from_gpt2(path)
    if model_type == "gpt_neox":  # an `lmkit export` of a rope model
        from lmkit.export import from_gpt_neox

        return from_gpt_neox(path)
    if model_type != "lmkit":  # loading it as lmkit would leave every weight randomly initialised
        raise UserError(f"{path / 'config.json'}: model_type must be lmkit, gpt2 or gpt_neox, got {model_type!r}")
    return LmkitForCausalLM.from_pretrained(path)


def load_tokenizer(model: str, hub=None):
    """The `PreTrainedTokenizerFast` of a local model or tokenizer dir or hub name (see `resolve`), as saved.

    For a directory fresh from tokenizer training, `tokenization.load_trained_tokenizer` also checks its special tokens.
    """
    from transformers import PreTrainedTokenizerFast  # heavy, as above

    path = resolve(model, hub)
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{path}: no tokenizer.json to load")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------------------------------
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
        revisions = _revisions(model_dir)
        if not revisions:
            continue
        main = _main_revision(model_dir, revisions)
        head = _history_entry(model_dir, next(m for m in revisions if m["revision"] == main), main)
        rows.append({"name": _name_of(model_dir), "revisions": len(revisions), **head})
    return rows


def show(name: str, hub=None) -> dict:
    """The card summary of `name[@rev]` (main by default) and the model's revision history, newest first."""
    name, spec = _split_ref(name)
    hub = hub_dir(hub)
    model_dir = _model_dir(hub, name)
    revision = _find_revision(hub, name, spec)
    revisions = _revisions(model_dir)
    main = _main_revision(model_dir, revisions)
    history = [_history_entry(model_dir, m, main) for m in reversed(revisions)]
    info = {"name": name, **next(h for h in history if h["revision"] == revision), "history": history}
    snapshot = model_dir / "snapshots" / revision
    _verify(snapshot)  # what is shown is what was pushed: a tampered card or results file is refused, not printed
    info["architecture"] = architecture(snapshot)
    info["data"] = read_json(RunDir(snapshot).data_stats)
    info["tokenizer"] = read_json(RunDir(snapshot).tokenizer_stats)
    return info


def delete(name: str, hub=None) -> None:
    """Delete a whole model (`org/name`) or one revision (`org/name@rev`).

    Deleting the revision `main` points at moves `main` to the newest remaining revision first; deleting the last
    revision deletes the model. Each removal is a rename out of sight followed by the actual removal, so readers see
    the revision either complete or gone.
    """
    name, spec = _split_ref(name)
    hub = hub_dir(hub)
    model_dir = _model_dir(hub, name)
    with _model_lock(hub, name):
        if not model_dir.is_dir():
            raise UserError(f"no model {name!r} in hub {hub} (`lmkit hub list` shows what is there)")
        revisions = _revisions(model_dir)
        if spec and _REVISION_ID.match(spec) and (model_dir / "snapshots" / spec).is_dir():
            revision = spec  # by full id: also a damaged revision, which no lookup lists
        else:
            revision = _find_revision(hub, name, spec) if spec else None
        remaining = [m for m in revisions if m["revision"] != revision]
        others = [p for p in (model_dir / "snapshots").glob("*") if _REVISION_ID.match(p.name) and p.name != revision]
        if revision is None or not others:
            _remove_out_of_sight(model_dir, hub / f".trash-{model_dir.name}-{secrets.token_hex(4)}")
            logger.info("deleted %s from %s", name, hub)
            return
        ref_path = model_dir / "refs" / "main"
        ref = ref_path.read_text(encoding="utf-8", errors="replace").strip() if ref_path.is_file() else None
        if ref == revision or _main_revision(model_dir, revisions) == revision:
            if remaining:
                _write_ref(model_dir, remaining[-1]["revision"])
            else:  # only damaged revisions are left: no ref rather than one naming a deleted revision
                ref_path.unlink(missing_ok=True)
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
        model_dirs = [_model_dir(hub, name)]
        if not model_dirs[0].is_dir():
            raise UserError(f"no model {name!r} in hub {hub} (`lmkit hub list` shows what is there)")
    else:
        model_dirs = sorted(p for p in hub.glob("models--*") if p.is_dir()) if hub.is_dir() else []
    rows = []
    for model_dir in model_dirs:
        model_name = _name_of(model_dir)
        if model_name is None:
            rows.append({"name": model_dir.name, "revision": None, "ok": False,
                         "problem": f"{model_dir}: not a folder name lmkit makes (models--<org>--<name>)"})
            continue
        snapshots = model_dir / "snapshots"
        good = set()
        for entry in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
            if not _REVISION_ID.match(entry.name):
                continue  # staging and trash dirs: `gc` removes them
            try:
                _verify(entry)
                good.add(entry.name)
                rows.append({"name": model_name, "revision": entry.name, "ok": True, "problem": None})
            except UserError as error:
                rows.append({"name": model_name, "revision": entry.name, "ok": False, "problem": str(error)})
        ref_path = model_dir / "refs" / "main"
        ref = ref_path.read_text(encoding="utf-8", errors="replace").strip() if ref_path.is_file() else None
        if good and ref not in good:
            problem = f"{ref_path}: " + (f"names {ref!r:.60}, which is not a verified revision of this model"
                                         if ref is not None else "missing")
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
    no live push holds its lock (`_push_lock`; the kernel drops the lock of a killed process). The grace period also
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
    # Lock files of killed pushes (`_push_is_live` drops those whose staging dir it looks at, these are the rest).
    candidates += [p for p in (hub / ".locks").glob("models--*/push-*.lock") if _LOCK_FILE.match(p.name)]
    removed = []
    for path in sorted(candidates):
        lock = _LOCK_FILE.match(path.name)
        if lock:
            if now - path.stat().st_mtime >= grace_seconds and _name_of(path.parent) and \
                    not _push_is_live(hub, _name_of(path.parent), lock.group(1)):
                removed.append(path)
            continue
        if now - _newest_mtime(path) < grace_seconds:
            continue
        staging = _LEFTOVER.match(path.name)
        name = _name_of(path.parent.parent) if path.parent.name == "snapshots" else None
        if staging and staging.group("staging") and name and _push_is_live(hub, name, staging.group("staging")):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
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
    lock_path = _push_lock_path(hub, name, revision)
    if not lock_path.is_file():
        return False
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    with contextlib.suppress(FileNotFoundError):
        lock_path.unlink()  # a killed push's lock file
    return False
