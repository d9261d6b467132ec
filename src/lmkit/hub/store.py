"""The hub's store: its layout, names, manifests, revisions, `main`, verification and `resolve`.

The hub directory (`hub.dir`, else `$LMKIT_HUB`, else `./hub`) uses the Hugging Face cache layout, so plain
transformers can load from it offline with no lmkit installed:

    <hub>/models--<org>--<name>/
        refs/main                      the current revision id (the bare 40-hex id, like the HF cache)
        snapshots/<revision>/          one immutable revision: the model files as pushed, plus
            README.md                  the model card (Hugging Face metadata header)
            lmkit_revision.json        the manifest: SHA-256 and size of every file, message, date, source
            gpt2/ or gpt-neox/         lmkit models: the same model exported to a stock architecture (lmkit.exporting)
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
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lmkit.atomic import atomic_write_text, file_sha256
from lmkit.errors import UserError
from lmkit.settings import SettingError, check_fields, setting

logger = logging.getLogger(__name__)

PUSH_MODES = ("never", "end", "every_save")
MANIFEST = "lmkit_revision.json"


# One part of org/name: what the HF hub accepts, minus anything that could become a path trick. "--" is refused
# because the folder name joins org and name with "--" ("a--b/c" and "a/b--c" would share a folder).
_NAME_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")
REVISION_ID = re.compile(r"^[0-9a-f]{40}$")
# The manifest fields every reader relies on, and their JSON types.
_MANIFEST_FIELDS = {"name": str, "revision": str, "created": str, "message": str, "files": dict}
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


def split_ref(model: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); the name is validated, the revision spec is checked when looked up."""
    name, _, revision = model.partition("@")
    validate_name(name, key="model name")
    if "@" in model and not re.fullmatch(r"main|[0-9a-f]{4,40}", revision):
        raise UserError(f"revision in {model!r} must be 'main' or a revision id (4-40 hex digits), got {revision!r}")
    return name, revision or None


def folder_name(name: str) -> str:
    return "models--" + name.replace("/", "--")


def model_dir_of(hub: Path, name: str) -> Path:
    return hub / folder_name(name)


@contextlib.contextmanager
def push_lock(hub: Path, name: str, revision: str):
    """Hold a lock named after the revision being staged, so that `gc` can tell a live push's staging dir from a
    killed one's (the kernel releases the lock of a killed process); the lock file goes when the push ends."""
    lock_path = push_lock_path(hub, name, revision)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()


def push_lock_path(hub: Path, name: str, revision: str) -> Path:
    return hub / ".locks" / folder_name(name) / f"push-{revision}.lock"


@contextlib.contextmanager
def model_lock(hub: Path, name: str):
    """Hold an exclusive lock for `name` while `main` is read-modified-written or revisions are deleted.

    The lock file lives outside the model folder so that deleting the model (a rename of its folder) cannot strand a
    waiter on a lock inside the renamed folder. flock is released by the kernel if the holder is killed.
    """
    lock_path = hub / ".locks" / folder_name(name) / "lmkit.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------------------------------------------------
# Revisions: reading manifests, finding `main`, verifying


def read_manifest(snapshot: Path, name: str | None = None) -> dict:
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
    problem = _manifest_problem(manifest, snapshot.name, name if name is not None else name_of(snapshot.parent.parent))
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


def name_of(model_dir: Path) -> str | None:
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


def revisions_of(model_dir: Path) -> list[dict]:
    """Manifests of the finished, undamaged revisions of one model, oldest first.

    Hidden staging directories of pushes in progress (or killed) and snapshots not written by lmkit are skipped
    silently; a revision whose manifest is damaged is skipped with one warning line.
    """
    snapshots = model_dir / "snapshots"
    name = name_of(model_dir)
    found = []
    for entry in sorted(snapshots.iterdir()) if name and snapshots.is_dir() else []:
        if REVISION_ID.match(entry.name) and (entry / MANIFEST).is_file():
            try:
                found.append(read_manifest(entry, name))
            except UserError as error:
                _warn_damaged(entry, str(error))
    return sorted(found, key=lambda m: (m["created"], m["revision"]))


def ref_path(model_dir: Path) -> Path:
    return model_dir / "refs" / "main"


def read_ref(model_dir: Path) -> str | None:
    """What `refs/main` says (whatever it says: callers check it names a revision), or None when there is no ref."""
    try:
        return ref_path(model_dir).read_text(encoding="utf-8", errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_ref(model_dir: Path, revision: str) -> None:
    # No trailing newline: huggingface_hub reads the ref file verbatim as the snapshot name.
    atomic_write_text(ref_path(model_dir), revision)


def main_revision(model_dir: Path, revisions: list[dict]) -> str | None:
    """The revision `main` names; the newest revision if the ref is missing (a first push killed just before it)."""
    ref = read_ref(model_dir)
    if ref in {m["revision"] for m in revisions}:
        return ref
    return revisions[-1]["revision"] if revisions else None


def no_model(name: str, hub: Path) -> UserError:
    """The error for a name the hub does not hold."""
    return UserError(f"no model {name!r} in hub {hub} (`lmkit hub list` shows what is there)")


def find_revision(hub: Path, name: str, spec: str | None) -> str:
    model_dir = model_dir_of(hub, name)
    revisions = revisions_of(model_dir)
    if not revisions:
        raise no_model(name, hub)
    if spec in (None, "main"):
        return main_revision(model_dir, revisions)
    matches = [m["revision"] for m in revisions if m["revision"].startswith(spec)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(m["revision"][:SHORT_REVISION] for m in reversed(revisions))
    if not matches:
        raise UserError(f"{name}@{spec}: no such revision in hub {hub} (revisions, newest first: {known})")
    raise UserError(f"{name}@{spec}: ambiguous revision prefix, give more digits (revisions: {known})")


def files_under(directory: Path) -> dict[str, Path]:
    """Every non-directory entry under `directory` by POSIX relative path, symlinks included (not followed)."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for entry in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root, entry)
            found[path.relative_to(directory).as_posix()] = path
    return found


def verify_revision(snapshot: Path) -> dict:
    """Check every file of a revision against its manifest; any difference is a UserError naming the file."""
    manifest = read_manifest(snapshot)
    expected = manifest["files"]
    present = files_under(snapshot)
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


def shard_names(model_dir: Path) -> list[str]:
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
        name, spec = split_ref(model)
    except UserError as error:
        if local.is_dir():
            raise UserError(f"{model}: directory has no config.json or tokenizer.json (not a model dir)") from None
        if not local.exists() and "@" not in model and (model.startswith((".", "/", "~")) or model.count("/") != 1):
            raise UserError(f"model {model!r} is neither a local model directory nor a hub name: no such directory "
                            "(a hub name is org/name[@rev])") from None
        raise UserError(f"model {model!r} is neither a local model directory nor a hub name: {error}") from None
    hub = hub_dir(hub)
    snapshot = model_dir_of(hub, name) / "snapshots" / find_revision(hub, name, spec)
    verify_revision(snapshot)
    return snapshot


def revision_containing(path: str | os.PathLike) -> tuple[str, str] | None:
    """(name, revision) when `path` is a hub revision folder or lies inside one, else None.

    Nothing but push, delete and gc writes under a hub: commands given a snapshot path use this to write elsewhere.
    """
    path = Path(path).expanduser().absolute()
    for folder in (path, *path.parents):
        if folder.parent.name == "snapshots" and REVISION_ID.match(folder.name) and (folder / MANIFEST).is_file():
            name = name_of(folder.parent.parent)
            if name:
                return name, folder.name
    return None


def refuse_inside_hub(path: str | os.PathLike, what: str, hub: str | os.PathLike | None = None) -> None:
    """A UserError when `path` (an output of `what`) would be written inside a hub: in one of its revisions, in the
    hub directory `hub` (see `hub_dir`), or in any directory laid out as a hub (`models--*` folders with snapshots).
    Nothing but push, delete and gc writes under a hub."""
    found = revision_containing(path)
    if found:
        raise UserError(f"{what} {path} is inside hub revision {found[0]}@{found[1][:SHORT_REVISION]}, which is "
                        f"immutable; choose a path outside the hub")
    path = Path(path).expanduser().absolute()
    configured = hub_dir(hub)
    for folder in (path, *path.parents):
        if folder == configured or folder.name.startswith("models--") or _holds_models(folder):
            hub_folder = folder.parent if folder.name.startswith("models--") else folder
            raise UserError(f"{what} {path} is inside the hub {hub_folder}, where only lmkit push, hub delete and "
                            "hub gc write; choose a path outside it")


def _holds_models(folder: Path) -> bool:
    """Whether `folder` is laid out as a hub: a `models--*` folder with `snapshots` in it."""
    try:
        return any(child.name.startswith("models--") and (child / "snapshots").is_dir() for child in folder.iterdir())
    except OSError:  # missing or unreadable: not a hub anyone can have written
        return False
