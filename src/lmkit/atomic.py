"""Write files and directories so that a reader never sees them half-written.

Everything lmkit writes for a user (tokenizers, run artefacts, hub revisions, exports) goes to a temporary sibling
first and is renamed into place: `os.replace` is atomic on POSIX within one filesystem, so a process killed at any
moment leaves either the old content or the new, never a mix.

`tempfile` creates its files 0600 and its directories 0700 whatever the umask (it cannot know what they are for);
these helpers give them the permissions a plain `open`/`mkdir` would have (0644/0755 under umask 022), so that what
lmkit writes in a shared run dir, hub or export is readable by whoever the user's umask lets read it.

`file_sha256` is the content hash that hub revisions are verified by and that keys corpus caches and resume checks.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmkit.errors import UserError


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (`os.umask` can only be read by setting it,
    which would race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `target` that becomes `target` when the block exits cleanly.

    Args:
        target: the final directory path.
        replace: if True an existing `target` is swapped out (old copy removed after the rename); if False an existing
            `target` makes the rename fail with `FileExistsError`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~current_umask())
    try:
        yield tmp
        if replace and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.exists():
                if any(target.iterdir()):
                    raise FileExistsError(target)
                target.rmdir()
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """`atomic_write_text` of `obj` as indented, key-sorted JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def check_writable_dir(path: str | os.PathLike, key: str) -> None:
    """A directory that exists and is writable, or can be created: else a UserError naming `key` (the recipe key or
    option that chose it). Run before expensive work, so a bad output path fails in the first second, not at the end.
    """
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists() and not existing.is_symlink():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == path else f"is under {existing}, which is"
        raise UserError(f"{key} {path} {where} a file, expected a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key} {path}: {existing} is not writable (permission denied)")


def follow_umask(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the permissions the umask asks for (0644/0755 under 022).

    For directories written by other libraries: transformers' `save_pretrained` creates model.safetensors 0600.
    """
    umask = current_umask()
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
