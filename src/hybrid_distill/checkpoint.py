"""Saving and loading hybrid students as Hugging Face checkpoints: atomic writes, verified reads."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from . import modeling  # noqa: F401  (registers the hybrid model types with the Auto classes)
from .errors import HybridDistillError
from .fileio import atomic_directory_write, interrupted_replace_copies


class CheckpointError(HybridDistillError, RuntimeError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def save_student(model: PreTrainedModel, path: str | Path, tokenizer=None, model_card: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write `model` (+ tokenizer, README model card) to `path` atomically as safetensors with remote code;
    ``dtype``: the floating-point weights cast to it in the file (the model in memory is left as it is)."""
    path = Path(path)
    state = None if dtype is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with atomic_directory_write(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
    return path


def _safetensors_header(file: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file; CheckpointError when it cannot be read."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length exceeds the file size")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"Corrupt weight file {file}: {err}. Re-save or re-download the checkpoint.") from err
    return header_len, header


def _tensor_ranges(file: Path, header: dict) -> list[tuple[int, int]]:
    """(start, end) data offsets of each tensor in ``header``."""
    try:
        return [tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"Corrupt weight file {file}: malformed header ({type(err).__name__}: {err}). "
                              "Re-save or re-download the checkpoint.") from err


def check_safetensors_file(file: Path) -> None:
    size = file.stat().st_size
    header_len, header = _safetensors_header(file)
    end = max((stop for _, stop in _tensor_ranges(file, header)), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(
            f"Corrupt weight file {file}: expected {8 + header_len + end} bytes, found {size} (truncated or "
            "partially written). Re-save or re-download the checkpoint."
        )


def weights_fingerprint(path: str | Path, samples: int = 16, sample_bytes: int = 1 << 16, tensor_bytes: int = 64) -> str:
    """A cheap identity of a checkpoint's weights: each ``*.safetensors`` file's name, size and header,
    ``samples`` evenly spaced slices of its data (~1 MiB per file), and ``tensor_bytes`` from the start,
    middle and end of every tensor. Retraining changes every weight, and a change of any one whole
    tensor changes its samples, so a checkpoint overwritten in place gets a different fingerprint."""
    h = hashlib.blake2b(digest_size=12)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(path)!r} has no .safetensors weight files")
    for file in files:
        size = file.stat().st_size
        header_len, header = _safetensors_header(file)
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            h.update(f.read(8 + header_len))
            for i in range(samples):
                f.seek(max(0, (size - sample_bytes) * i // max(1, samples - 1)))
                h.update(f.read(sample_bytes))
            for start, stop in sorted(_tensor_ranges(file, header)):
                for at in (start, (start + stop - tensor_bytes) // 2, stop - tensor_bytes):
                    f.seek(8 + header_len + max(start, at))
                    h.update(f.read(min(tensor_bytes, stop - start)))
    return h.hexdigest()


def verify_checkpoint(path: str | Path) -> dict:
    """Check that a checkpoint directory is complete and readable; returns its config dict."""
    path = Path(path)
    if not path.is_dir():
        set_aside = interrupted_replace_copies(path) if path.parent.is_dir() else []
        hint = (f" A replace of it was interrupted; the previous checkpoint is at {str(set_aside[0])!r} (rename it back, "
                "or write the checkpoint again, which restores it first)." if set_aside else "")
        raise CheckpointError(f"Checkpoint directory {str(path)!r} does not exist.{hint}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json; it is not a Hugging Face checkpoint directory.")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} holds a JSON {type(config).__name__}, not a model config object.")
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index_file} is not a valid weight index ({type(err).__name__}: {err}).") from err
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{str(path)!r} has no model.safetensors or model.safetensors.index.json.")
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise CheckpointError(f"Checkpoint {str(path)!r} is missing weight shard(s) {missing}.")
    for shard in shards:
        check_safetensors_file(path / shard)
    return config


def load_student(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None):
    """Load a saved hybrid student (verifying the files first) in eval mode."""
    config = verify_checkpoint(path)
    if not str(config.get("model_type", "")).startswith("hybrid_"):
        raise CheckpointError(
            f"{str(path)!r} holds a {config.get('model_type')!r} model, not a hybrid student; "
            "load teachers with hybrid_distill.surgery.load_teacher."
        )
    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto", output_loading_info=True)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = [key for key, *_ in info.get("mismatched_keys") or ()]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{str(path)!r}: the weights do not fit the model its config.json describes (missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}, wrong shape {mismatched[:6]}); a weight file or the config (e.g. its "
            "mixers list) was changed or mixed up. Re-save the checkpoint."
        )
    if device is not None:
        model.to(device)
    return model.eval()
