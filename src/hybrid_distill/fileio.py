"""Atomic writes of files and whole folders (temporary sibling, fsync, ``os.replace``) and JSON helpers: the
one way this package writes anything a later step trusts, so an interrupted run never leaves a half-written
result."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
# What open() / mkdir() would create; mkstemp / mkdtemp make 0600 / 0700, unreadable to a team's other accounts.
DEFAULT_FILE_MODE = 0o666 & ~_UMASK
DEFAULT_DIR_MODE = 0o777 & ~_UMASK


# errno values of a write that failed for want of space: the disk, or the user's quota, is full.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError that names no file as one naming ``path``: a writer of an open file (``torch.save`` into
    a file object, ``f.write``) reports a full disk as a bare ``[Errno 28] No space left on device``."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path`` then ``os.replace`` it into place. An OSError of
    the write (e.g. a full disk) names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        with naming(path):
            write(tmp)
        os.chmod(tmp, DEFAULT_FILE_MODE)  # mkstemp creates 0600; results should be as readable as any other file
        os.replace(tmp, path)
        fsync_directory(path.parent)  # the rename itself survives a power loss
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under ``path``, then the directories, before a rename publishes them."""
    dirs = []
    for root, _, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        dirs.append(root)
    for d in reversed(dirs):
        fsync_directory(d)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, fsynced."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def jsonable(obj: Any) -> Any:
    """``obj`` with string keys, non-finite floats as None and numpy/torch scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in (sorted(obj) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):
        return jsonable(obj.item())
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (see `jsonable`) atomically."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=1) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in ``path``, or None when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------------
# Whole folders


def interrupted_replace_copies(path: Path) -> list[Path]:
    """Copies of ``path`` an interrupted or finished replace left beside it (newest first)."""
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)


def restore_interrupted_replace(path: str | os.PathLike) -> Path | None:
    """Put back the previous folder an interrupted replace set aside (a crash between its two renames
    leaves ``.NAME.old-PID`` and no ``NAME``); returns the restored path, or None if nothing was missing."""
    path = Path(path)
    if path.exists():
        return None
    for old in interrupted_replace_copies(path):
        try:
            os.replace(old, path)
        except OSError:
            continue
        fsync_directory(path.parent)
        return path
    return None


def check_output_folder(path: str | os.PathLike, name: str) -> Path:
    """Refuse, before any work, an output folder that cannot be one: ``path`` (or a folder above it) is a file, or
    the nearest folder of it that exists is not writable. ``name`` is the option or setting that gave it."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == path else f"cannot be made: {existing} is a file"
        raise NotADirectoryError(f"{name} {path} {what}; give a new folder, or a run folder to resume")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{name} {path}: {existing} is not writable by this user")
    return path


def temporary_directory_for(path: str | os.PathLike) -> Path:
    """A new empty sibling of ``path`` to write a folder into before `publish_directory`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_replace(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, DEFAULT_DIR_MODE)
    return tmp


def publish_directory(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the written folder ``tmp`` the folder ``path``: usual file modes, fsync everything, then rename over
    any previous ``path`` (set aside first, removed after). ``tmp`` is removed if publishing fails."""
    tmp, path = Path(tmp), Path(path)
    try:
        for root, _, files in os.walk(tmp):  # writers such as safetensors create their files 0600
            for name in files:
                os.chmod(os.path.join(root, name), DEFAULT_FILE_MODE)
        fsync_tree(tmp)
        if path.exists():
            # unique, so a copy left by a crashed writer (which the next write restores) never blocks this one
            os.replace(path, path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(path.parent)
    # this write's set-aside copy, and any left by writers that crashed after their second rename
    for stale in interrupted_replace_copies(path):
        shutil.rmtree(stale, ignore_errors=True)
    return path


class atomic_directory_write:  # noqa: N801 (used as a function: ``with atomic_directory_write(path) as tmp``)
    """Context manager yielding a temporary sibling folder that replaces ``path`` only on success. A symlinked
    ``path`` is written where the link points, so the link keeps naming it."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path.resolve() if path.is_symlink() else path

    def __enter__(self) -> Path:
        self.tmp = temporary_directory_for(self.path)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        publish_directory(self.tmp, self.path)
        return False


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
