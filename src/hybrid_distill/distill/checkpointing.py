"""Checkpoints of a distillation run, written atomically and read without unpickling code; the final model.

One checkpoint is a folder ``checkpoints/step_N/`` (`hybrid_distill.layout.TrainLayout`)::

    model.pt            the student's weights (Stage 1: the trained mixers only)    tensors
    optimizer.pt        AdamW's state, keyed by parameter name                        tensors and plain data
    state.json          step, tokens, elapsed time, the step's settings key, schedule, data position
    rng_rank<r>.json    each process's Python / NumPy / torch RNG states

The ``.pt`` files load with ``torch.load(weights_only=True)`` and the rest is JSON, so a run folder received
from someone else cannot run code when resumed: a file holding anything else is refused, naming it
(`UnsafeFileError`). A checkpoint is written into a temporary sibling folder and renamed into place
(`hybrid_distill.fileio.publish_directory`); only folders with ``state.json`` count. Under torchrun rank 0 creates
and publishes the folder, and every rank writes its own RNG file into it. A checkpoint found damaged is set aside
(`set_aside_damaged`) so that the run resumes from the one before it.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..artifacts import StaleStepError, describe_changes
from ..checkpoint import CheckpointError, save_student
from ..fileio import (
    jsonable,
    naming,
    publish_directory,
    restore_interrupted_replace,
    temporary_directory_for,
)
from ..layout import TrainLayout
from . import distributed as hd_dist

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
FRESH_START = "use a new run_dir, or restore those values"

_STEP_NAME = re.compile(r"step_(\d+)")
_LEFTOVER = re.compile(r"\.(.+)\.(tmp|old)-.*")  # fileio's temporary and set-aside siblings of a folder


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.json"


class UnsafeFileError(CheckpointError):
    """A checkpoint file holds objects other than tensors and plain data (loading it would run their code)."""


# ----------------------------------------------------------------------------------------------
# Listing


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run (folders with ``state.json``), oldest first."""
    root = TrainLayout(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_NAME.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint folder (``step_N``) holds."""
    return int(_STEP_NAME.fullmatch(ckpt.name).group(1))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def remove_interrupted_writes(run_dir: str | Path) -> None:
    """Clean up after a killed writer: put back a checkpoint or final model whose replace was cut between its two
    renames, and remove half-written temporary folders (a full model copy each, at real sizes)."""
    layout = TrainLayout(run_dir)
    for folder in (layout.checkpoints, layout.root):
        if not folder.is_dir():
            continue
        for leftover in list(folder.iterdir()):
            m = _LEFTOVER.fullmatch(leftover.name)
            if m is None or not (m.group(1) == layout.final.name or _STEP_NAME.fullmatch(m.group(1))):
                continue
            if m.group(2) == "old":
                restore_interrupted_replace(folder / m.group(1))
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# RNG states as JSON


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states as JSON data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def decode_rng_state(data: Any) -> dict[str, Any]:
    """The states `rng_state` wrote, as the RNGs take them; KeyError, TypeError or ValueError when ``data`` is not
    such a record."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a mapping, got {type(data).__name__}")
    version, internal, gauss = data["python"]
    if not isinstance(version, int) or not all(isinstance(v, int) for v in internal):
        raise TypeError("the Python state must be a version number and integers")
    name, keys, pos, has_gauss, cached = data["numpy"]
    state = {
        "python": (version, tuple(internal), gauss),
        "numpy": (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
        "torch": _bytes_tensor(data["torch"]),
    }
    if "cuda" in data:
        state["cuda"] = [_bytes_tensor(s) for s in data["cuda"]]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states `decode_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(run_dir: str | Path, ctx: hd_dist.DistContext, step: int, model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any], state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the newest ``keep_last``. Every process calls it;
    ``model_state`` / ``optim_state`` / ``state`` are written by rank 0."""
    layout = TrainLayout(run_dir)
    final = layout.checkpoint(step)
    tmp = hd_dist.broadcast_object(str(temporary_directory_for(final)) if ctx.is_main else None)
    tmp = Path(tmp)
    try:
        _write_text(tmp / rng_file(ctx.rank), json.dumps(rng_state()))
        if ctx.is_main:
            save_tensors(model_state, tmp / MODEL_FILE)
            save_tensors(optim_state, tmp / OPTIMIZER_FILE)
            _write_text(tmp / STATE_FILE, json.dumps(jsonable(state), indent=1))
    except BaseException:
        if ctx.is_main:  # e.g. a full disk: no half-written checkpoint stays behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    hd_dist.barrier()
    if ctx.is_main:
        publish_directory(tmp, final)  # fsyncs every file (all ranks') before the rename
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    hd_dist.barrier()
    return final


def save_tensors(obj: Any, path: Path) -> None:
    """``torch.save`` through an open file, so that a failed write (a full disk) is an OSError naming ``path``."""
    with naming(path), open(path, "wb") as f:
        torch.save(obj, f)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8); an OSError names ``path``."""
    with naming(path), open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------
# Reading


def read_json_file(path: Path, what: str) -> Any:
    """The JSON in ``path``; CheckpointError naming the file when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {what} is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); {what} is damaged or was altered") from None


def load_tensor_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only. A file holding other objects (which
    unpickling would construct, running their code) is refused with an `UnsafeFileError` naming it; a missing or
    unreadable one is a CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        reason = f"it refers to {found.group(1)}" if found else str(err).splitlines()[0]
        raise UnsafeFileError(
            f"Refusing to load {path}: it holds objects other than tensors and plain data, which loading would "
            f"construct and so run their code ({reason}). Checkpoints written by hybrid-distill never do; this file "
            f"was altered or made elsewhere. Delete {path.parent} and resume from an earlier checkpoint, or use a new "
            "run_dir"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).split(". ")[0].splitlines()[0]
        raise CheckpointError(f"{path} could not be read ({type(err).__name__}: {first}): the file is damaged") from None


def set_aside_damaged(ckpt: Path) -> Path:
    """Rename a damaged checkpoint folder out of the run's checkpoints (kept, for the user to inspect or delete), so
    that the run resumes from, and reports, the one before it."""
    dest = ckpt.with_name(f"{ckpt.name}.damaged-{uuid.uuid4().hex[:8]}")
    os.replace(ckpt, dest)
    return dest


@dataclass
class CheckpointContent:
    """What one process reads of a checkpoint (tensors only where it loads them)."""

    path: Path
    state: dict[str, Any]
    rng: dict[str, Any] | None
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def read_checkpoint(ckpt: Path, rank: int, tensors: bool, step_key: str, settings: dict[str, Any]) -> CheckpointContent:
    """Read checkpoint ``ckpt`` for process ``rank`` (``tensors``: also the model and optimizer files), refusing one
    written under another settings key (StaleStepError naming the changes) or any file that is not plain data."""
    what = f"checkpoint {ckpt}"
    state = read_json_file(ckpt / STATE_FILE, what)
    if not isinstance(state, dict) or not {"step", "tokens", "elapsed", "key"} <= set(state):
        raise CheckpointError(f"{ckpt / STATE_FILE} is not a checkpoint state of this version of hybrid-distill; "
                              f"{FRESH_START}")
    if state["key"] != step_key:
        changes = describe_changes(state.get("settings", {}), settings)
        raise StaleStepError(f"Refusing to resume {ckpt}: it was written under other settings"
                             + (f" ({'; '.join(changes)})" if changes else "") + f"; {FRESH_START}")
    rng = None
    if (ckpt / rng_file(rank)).is_file():  # absent when the world size grew since it was written
        try:
            rng = decode_rng_state(read_json_file(ckpt / rng_file(rank), what))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{ckpt / rng_file(rank)} is not an RNG state ({type(err).__name__}: {err})") from None
    model = load_tensor_file(ckpt / MODEL_FILE) if tensors else {}
    optimizer = load_tensor_file(ckpt / OPTIMIZER_FILE) if tensors else {}
    return CheckpointContent(ckpt, state, rng, model, optimizer)


# ----------------------------------------------------------------------------------------------
# The final model


def unwrapped_class(model: nn.Module) -> type:
    """The model's own class under FSDP2's wrapper class."""
    cls = type(model)
    if issubclass(cls, FSDPModule):
        return next(b for b in cls.__mro__[1:] if not issubclass(b, FSDPModule) and issubclass(b, nn.Module))
    return cls


def save_final_model(student: nn.Module, path: Path, ctx: hd_dist.DistContext, tokenizer=None,
                     dtype: torch.dtype | None = None) -> None:
    """The student (+ ``tokenizer``) as a Hugging Face checkpoint, written atomically (gathered to rank 0 when
    sharded), its floating-point weights in ``dtype`` when given. Every process calls it."""
    if not hd_dist.is_sharded(student):
        if ctx.is_main:
            save_student(student, path, tokenizer=tokenizer, dtype=dtype)
        hd_dist.barrier()
        return
    state = hd_dist.gather_model_state(student)
    if ctx.is_main:
        cls = unwrapped_class(student)
        with torch.device("meta"):
            plain = cls(student.config)
        missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
        tied = {"lm_head.weight"} if getattr(student.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(
                f"gathered state does not fit {cls.__name__}: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        plain.tie_weights()
        save_student(plain, path, tokenizer=tokenizer, dtype=dtype)
    hd_dist.barrier()


def load_final_weights(student: nn.Module, path: Path) -> None:
    """Copy a finished run's final weights (safetensors) into ``student`` (unsharded)."""
    index = path / "model.safetensors.index.json"
    files = (sorted(set(read_json_file(index, f"the final model {path}")["weight_map"].values()))
             if index.is_file() else ["model.safetensors"])
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(student.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"final weights of {path} do not fit the student: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


__all__ = [
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "CheckpointContent",
    "UnsafeFileError",
    "checkpoint_dirs",
    "decode_rng_state",
    "latest_checkpoint",
    "load_final_weights",
    "load_tensor_file",
    "read_checkpoint",
    "read_json_file",
    "remove_interrupted_writes",
    "rng_file",
    "rng_state",
    "save_checkpoint",
    "save_final_model",
    "save_tensors",
    "set_aside_damaged",
    "set_rng_state",
    "unwrapped_class",
]
