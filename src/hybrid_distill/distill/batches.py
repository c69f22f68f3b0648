"""How the trainer draws its batches: in-memory token data (`TensorTokenDataset`), the resumable rank-local
training iterator, the held-out batches, and the split of one step's batch into micro-batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ..data.loader import SplitBatchesMixin, split_indices
from . import distributed as hd_dist
from .config import DistillConfig
from .stages import unpack_batch

logger = logging.getLogger(__name__)


class TensorTokenDataset(SplitBatchesMixin):
    """Token sequences held in memory ([N, T] LongTensor, optional padding mask) behaving like
    `hybrid_distill.data.PackedDataset`: deterministic, resumable, rank-sharded ``batches`` and
    ordered ``eval_batches`` over a held-out split of ``heldout_sequences`` rows."""

    def __init__(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        heldout_sequences: int = 0,
        seed: int = 0,
    ):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [num_sequences, seq_len], got {tuple(tokens.shape)}")
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError("attention_mask must have the shape of tokens")
        self.tokens, self.mask = tokens.long(), attention_mask
        self.seq_len = tokens.shape[1]
        train, heldout = split_indices(len(tokens), 0.0, seed, heldout_sequences)
        self.train_indices, self.heldout_indices = train, heldout

    def __len__(self) -> int:
        return len(self.tokens)

    def indices(self, split: str) -> np.ndarray:
        return {"train": self.train_indices, "heldout": self.heldout_indices, "all": np.arange(len(self.tokens))}[split]

    def get_batch(self, indices):
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if self.mask is None:
            return self.tokens[idx]
        return {"input_ids": self.tokens[idx], "attention_mask": self.mask[idx]}


def train_iterator(data, config: DistillConfig, ctx: hd_dist.DistContext, start_step: int,
                   saved_state: dict[str, Any] | None):
    """Rank-local batches of whole optimizer steps, positioned at ``start_step`` (``saved_state``: the iterator's
    own ``state_dict`` from the checkpoint, which also checks that the data order would be the same)."""
    if hasattr(data, "batches"):
        it = data.batches("train", config.global_batch_size, seed=config.seed, start_step=start_step,
                          rank=ctx.rank, world_size=ctx.world_size)
        if saved_state is not None and hasattr(it, "load_state_dict"):
            it.load_state_dict(saved_state)
        return it
    if not hasattr(data, "__next__"):
        raise TypeError(
            "data must be a PackedDataset-like object with .batches(...), a TensorTokenDataset, or an iterator "
            f"of rank-local [B, T] token batches; got {type(data).__name__}"
        )
    if start_step:
        if saved_state is not None and hasattr(data, "load_state_dict"):
            data.load_state_dict(saved_state)
        else:
            logger.warning("data iterator has no load_state_dict; skipping %d batches to resume", start_step)
            for _ in range(start_step):
                next(data)
    return data


def heldout_batches(data, eval_data: Iterable | Callable[[], Iterable] | None, config: DistillConfig,
                    ctx: hd_dist.DistContext, micro: int) -> list | None:
    """This rank's held-out batches (the same count on every rank, at most ``eval_max_batches``), from
    ``eval_data`` or the dataset's held-out split; None when there are none."""
    if eval_data is not None:
        batches = list(eval_data() if callable(eval_data) else eval_data)
    elif hasattr(data, "eval_batches") and len(getattr(data, "heldout_indices", [])) > 0:
        batches = list(data.eval_batches("heldout", config.eval_batch_size or micro, ctx.rank, ctx.world_size))
    else:
        return None
    n = hd_dist.all_reduce_min_int(min(len(batches), config.eval_max_batches), ctx.device)
    return batches[:n] if n > 0 else None


def infer_seq_len(data, config: DistillConfig) -> int:
    """The run's sequence length: ``config.seq_len``, which must match the data's own, else the data's."""
    seq_len = getattr(data, "seq_len", None)
    if config.seq_len is not None:
        if seq_len is not None and int(seq_len) != config.seq_len:
            raise ValueError(f"DistillConfig.seq_len={config.seq_len} but the data has seq_len={seq_len}")
        return config.seq_len
    if seq_len is None:
        raise ValueError("DistillConfig.seq_len must be set when the data has no seq_len attribute")
    return int(seq_len)


def micro_batches(batch, micro: int, accum: int, seq_len: int,
                  device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Split one rank-local step batch into ``accum`` micro-batches of ``micro`` sequences, on ``device``."""
    ids, mask = unpack_batch(batch, None)
    if ids.shape[0] != micro * accum:
        raise ValueError(
            f"got a batch of {ids.shape[0]} sequences; expected {micro * accum} per process "
            f"(micro_batch_size {micro} x {accum} micro-batches)"
        )
    if ids.shape[1] != seq_len:
        raise ValueError(f"got sequences of {ids.shape[1]} tokens; DistillConfig.seq_len is {seq_len}")
    out = []
    for j in range(accum):
        sl = slice(j * micro, (j + 1) * micro)
        out.append(unpack_batch({"input_ids": ids[sl], "attention_mask": None if mask is None else mask[sl]}, device))
    return out


__all__ = ["TensorTokenDataset", "heldout_batches", "infer_seq_len", "micro_batches", "train_iterator"]
