"""Steps: output folders made under a settings key from upstream steps, and one writer per folder.

A **step** is a folder whose content is decided by its *settings* (config fields, the teacher's weights
fingerprint, the data's identity, ...) and by the *upstream* steps it was made from (their run ids). Its
``step.json`` records them::

    {"key": "<hash of settings>", "settings": {...}, "upstream": {"stage1": "<run id>"},
     "run_id": "<id of this making>", "state": "started" | "done", "result": {...}, "version": 1}

`Step.begin` opens the folder for work: a folder made under another key or upstream (or with content but no
record, as earlier versions left) is refused with a message naming every changed setting (standalone commands)
or moved to a ``superseded/`` folder (the pipeline) — never resumed or reused by mistake. `Step.publish`
writes the result and the ``done`` state in one atomic write; `Step.finished` returns that record while it
is current. `FolderLock` keeps a second process out of a folder being written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HybridDistillError
from .fileio import atomic_write_json, jsonable, read_json

logger = logging.getLogger(__name__)

STEP_FILE = "step.json"
LOCK_FILE = ".lock"
STEP_VERSION = 1
SUPERSEDED_DIR = "superseded"


def canonical(obj: Any) -> Any:
    """``obj`` as plain JSON data (sorted keys once dumped): what a settings key is computed from."""
    return json.loads(json.dumps(jsonable(obj), sort_keys=True, default=str))


def settings_key(settings: Any) -> str:
    """A short hash of ``settings`` (canonical JSON)."""
    return hashlib.sha256(json.dumps(canonical(settings), sort_keys=True).encode()).hexdigest()[:16]


def describe_changes(stored: Any, now: Any, prefix: str = "") -> list[str]:
    """``name: stored -> now`` for every setting that differs (nested mappings by dotted name)."""
    if isinstance(stored, Mapping) and isinstance(now, Mapping):
        out = []
        for key in sorted(set(stored) | set(now)):
            out += describe_changes(stored.get(key, "<missing>"), now.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    if json.dumps(canonical(stored), sort_keys=True) != json.dumps(canonical(now), sort_keys=True):
        return [f"{prefix.rstrip('.')}: {stored!r} -> {now!r}"]
    return []


class StaleStepError(HybridDistillError, ValueError):
    """A folder holds work made under other settings (or by an earlier version) and may not be reused."""


class FolderLockedError(HybridDistillError, RuntimeError):
    """Another live process writes to the folder."""


# ----------------------------------------------------------------------------------------------
# One writer per folder


class FolderLock:
    """An exclusive lock on a folder (``flock`` on ``<folder>/.lock``), naming its holder.

    The kernel releases the lock when the holding process dies, so a stale lock of a crashed run is taken
    over at once; the file keeps the holder's host and PID for the message another process gets.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is a file, not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = self.holder() or {}
            raise FolderLockedError(
                f"{self.folder} is in use by another process (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
                f"since {holder.get('since', '?')}); wait for it to finish, or stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, json.JSONDecodeError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# Steps


@dataclass
class StepRecord:
    """The content of ``step.json``."""

    key: str
    settings: dict[str, Any]
    upstream: dict[str, str | None] = field(default_factory=dict)
    run_id: str = ""
    state: str = "started"  # "started" or "done"
    result: dict[str, Any] | None = None
    version: int = STEP_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "settings": self.settings, "upstream": self.upstream, "run_id": self.run_id,
                "state": self.state, "result": self.result, "version": self.version}

    @classmethod
    def read(cls, folder: Path) -> StepRecord | None:
        """The record in ``folder/step.json``; None when absent; StaleStepError when unreadable."""
        path = folder / STEP_FILE
        try:
            data = read_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StaleStepError(f"{path} is damaged ({err}); delete {folder} to make it again") from None
        if data is None:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("key"), str):
            raise StaleStepError(f"{path} is not a step record; delete {folder} to make it again")
        known = {k: data[k] for k in ("key", "settings", "upstream", "run_id", "state", "result", "version") if k in data}
        return cls(**known)


class Step:
    """A folder made under ``settings`` from ``upstream`` steps (``{name: run id}``).

    ``ignore``: names in the folder that are not the step's work (e.g. a lock, or a parent's own files).
    """

    def __init__(self, folder: str | os.PathLike, settings: Mapping[str, Any],
                 upstream: Mapping[str, str | None] | None = None, *, what: str = "step",
                 ignore: tuple[str, ...] = ()):
        self.folder = Path(folder)
        self.settings = canonical(dict(settings))
        self.upstream = dict(upstream or {})
        self.key = self.key_of(self.settings, self.upstream)
        self.what = what
        self.ignore = {STEP_FILE, LOCK_FILE, *ignore}

    @staticmethod
    def key_of(settings: Mapping[str, Any], upstream: Mapping[str, str | None] | None = None) -> str:
        """The key of a step made under ``settings`` from ``upstream``, before its folder is known (a
        content-addressed folder, such as a token cache, is named by it)."""
        return settings_key({"settings": canonical(dict(settings)), "upstream": dict(upstream or {})})

    # -- reading -------------------------------------------------------------------------------
    def record(self) -> StepRecord | None:
        return StepRecord.read(self.folder)

    def has_work(self) -> bool:
        """Whether the folder holds anything besides the step's own bookkeeping."""
        return self.folder.is_dir() and any(p.name not in self.ignore for p in self.folder.iterdir())

    def stale_reason(self) -> str | None:
        """Why the folder's work is not this step's (None: absent, or made under this key)."""
        rec = self.record()
        if rec is None:
            if self.has_work():
                return (f"{self.folder} holds a {self.what} with no record of its settings ({STEP_FILE}; made by an "
                        "earlier version of hybrid-distill, or by hand)")
            return None
        if rec.key == self.key:
            return None
        changes = describe_changes(rec.settings, self.settings)
        changes += [f"upstream {c}" for c in describe_changes(rec.upstream, self.upstream)]
        state = "finished" if rec.state == "done" else "partly made"
        return (f"{self.folder} holds a {state} {self.what} made with other settings"
                + (f" ({'; '.join(changes)})" if changes else ""))

    def finished(self) -> StepRecord | None:
        """The published record, when the folder holds this step's finished work."""
        rec = self.record()
        return rec if rec is not None and rec.key == self.key and rec.state == "done" else None

    # -- writing -------------------------------------------------------------------------------
    def begin(self, on_stale: str = "refuse", superseded: str | os.PathLike | None = None,
              fresh_hint: str = "use another folder, or delete it to start over") -> StepRecord:
        """Open the folder for this step's work and return its record (``started``, or ``done`` if finished).

        ``on_stale``: ``"refuse"`` raises `StaleStepError` naming the changed settings; ``"set_aside"`` moves the
        folder to ``superseded`` (a folder) first; ``"replace"`` deletes it (for work as cheap to redo as an
        evaluation). ``fresh_hint``: what the user can do, for the refusal."""
        reason = self.stale_reason()
        if reason is not None:
            if on_stale == "refuse":
                raise StaleStepError(f"{reason}; {fresh_hint}")
            if on_stale == "replace":
                logger.info("%s; replacing it", reason)
                shutil.rmtree(self.folder)
            elif on_stale == "set_aside" and superseded is not None:
                set_aside(self.folder, Path(superseded), reason)
            else:
                raise ValueError(f"on_stale must be 'refuse', 'replace' or 'set_aside' with a superseded folder, "
                                 f"got {on_stale!r}")
        rec = self.record()
        if rec is None:
            rec = StepRecord(key=self.key, settings=self.settings, upstream=self.upstream, run_id=uuid.uuid4().hex[:12])
            atomic_write_json(self.folder / STEP_FILE, rec.to_dict())
        return rec

    def publish(self, result: Mapping[str, Any]) -> StepRecord:
        """Mark the step done with ``result`` (one atomic write). A folder with no record yet (just written whole,
        e.g. by an atomic folder write) gets one."""
        rec = self.record()
        if rec is None:
            rec = StepRecord(key=self.key, settings=self.settings, upstream=self.upstream, run_id=uuid.uuid4().hex[:12])
        elif rec.key != self.key:
            raise RuntimeError(f"{self.folder}: publish() under other settings than the folder's record")
        rec.state, rec.result = "done", canonical(dict(result))
        atomic_write_json(self.folder / STEP_FILE, rec.to_dict())
        return rec

    def finished_or_cleared(self, superseded: str | os.PathLike) -> StepRecord | None:
        """For a folder written whole by one call (a checkpoint, an export): the published record while it is
        current; otherwise the folder (stale, or left unfinished) is moved to ``superseded`` and None returned, for
        the caller to write the folder again and `publish`."""
        done = self.finished()
        if done is None and self.folder.exists():
            set_aside(self.folder, Path(superseded), self.stale_reason() or f"{self.folder} was not finished")
        return done

    def reopen(self) -> None:
        """Mark a finished step as started again (its result no longer counts), keeping its run id."""
        rec = self.record()
        if rec is not None and rec.key == self.key and rec.state == "done":
            rec.state, rec.result = "started", None
            atomic_write_json(self.folder / STEP_FILE, rec.to_dict())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with FolderLock(self.folder):
            yield


def set_aside(folder: Path, superseded: Path, reason: str = "") -> Path:
    """Move ``folder`` into ``superseded/`` under a unique name (never deleted); returns where it went. A folder
    beside ``superseded/`` (in the same run folder) is named by its path there (``final--hybrid-...``)."""
    superseded.mkdir(parents=True, exist_ok=True)
    try:
        name = folder.resolve().relative_to(superseded.resolve().parent).as_posix().replace("/", "--")
    except ValueError:
        name = folder.name
    dest = superseded / f"{name}-{uuid.uuid4().hex[:8]}"
    os.replace(folder, dest)
    logger.warning("%s%s; moved to %s", reason or str(folder), "" if reason else " set aside", dest)
    return dest


__all__ = [
    "STEP_FILE",
    "SUPERSEDED_DIR",
    "FolderLock",
    "FolderLockedError",
    "StaleStepError",
    "Step",
    "StepRecord",
    "canonical",
    "describe_changes",
    "set_aside",
    "settings_key",
]
