"""Reading packed token caches: a map-style dataset and a deterministic, resumable, rank-sharded batch order."""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .sources import DataSourceError

# 2: separate training and held-out streams, held out by document content hash (packing.HELDOUT_RULE);
# version-1 caches (a seeded permutation of packed sequences) are rebuilt, never reused.
# 3: meta.json counts only the documents/tokens kept under max_tokens, and a held-out fallback that would hold
# out all the text read is an error, so version-2 caches of such splits are not reused.
# 4: a cache is a step (hybrid_distill.artifacts): its step.json, not meta.json, records that it is complete and
# of which key (meta.json has no "key"/"complete" any more), so version-3 caches are rebuilt, never reused.
FORMAT_VERSION = 4
SPLITS = ("train", "heldout", "all")


def split_indices(
    num_sequences: int, heldout_fraction: float = 0.01, seed: int = 0, heldout_sequences: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, heldout) indices of ``num_sequences`` independent rows, both sorted and disjoint.

    For in-memory data whose rows are independent samples (``TensorTokenDataset``). Packed token
    caches (`PackedDataset`) do not use it: a packed sequence holds pieces of neighbouring
    documents, so they hold out whole documents by content hash instead (see ``packing``).

    The held-out count is ``heldout_sequences`` if given, else ``round(n * heldout_fraction)``
    (at least 1 when the fraction is positive and n >= 2, and always leaving one training
    sequence). Which sequences are held out depends only on (n, count, seed). Sequences are
    packed, so a document cut across a held-out and a training sequence is partly in each.
    """
    n = int(num_sequences)
    if heldout_sequences is not None:
        k = int(heldout_sequences)
        if k < 0 or (k >= n and n > 0):
            raise ValueError(f"heldout_sequences={k} must be in [0, {n - 1}] for {n} sequences")
    else:
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        k = int(round(n * heldout_fraction))
        if heldout_fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        k = min(k, max(n - 1, 0))
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED])).permutation(n)
    heldout = np.sort(perm[:k]).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[heldout] = False
    return np.flatnonzero(mask).astype(np.int64), heldout


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class SplitBatchesMixin:
    """``batches`` / ``eval_batches`` for any dataset with ``indices(split)`` and ``get_batch(indices)``."""

    def batches(
        self,
        split: str,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_steps: int | None = None,
        shuffle: bool = True,
    ) -> TokenBatches:
        """Endless iterator of this rank's ``LongTensor[batch_size // world_size, seq_len]`` batches.

        ``batch_size`` is the *global* batch size; see ``TokenBatchSampler`` for the order.
        """
        sampler = TokenBatchSampler(
            self.indices(split), batch_size, seed=seed, epoch=epoch, start_step=start_step, rank=rank,
            world_size=world_size, max_steps=max_steps, shuffle=shuffle, split=split,
        )
        return TokenBatches(self, sampler)

    def eval_batches(
        self, split: str = "heldout", batch_size: int = 8, rank: int = 0, world_size: int = 1
    ) -> Iterator[torch.Tensor]:
        """One ordered pass over ``split`` (last batch may be short); rank r gets indices[r::world_size]."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        idx = self.indices(split)[rank::world_size]
        for s in range(0, len(idx), batch_size):
            yield self.get_batch(idx[s : s + batch_size])


class PackedDataset(SplitBatchesMixin, torch.utils.data.Dataset):
    """Fixed-length token sequences from a cache directory written by ``build_token_dataset``.

    ``ds[i]`` is a ``LongTensor[seq_len]``. The training sequences are ``[0, num_train)``; the
    held-out ones follow, packed separately from documents held out by content hash (see
    ``packing``), so no held-out text is in a training sequence and the same text is held out at
    every ``seq_len``. The split is fixed when the cache is built: ``heldout_fraction`` must be the
    one it was built with (or None); ``heldout_sequences=k`` keeps only the first ``k`` held-out
    sequences (the rest are in neither split; None: the count stored in ``meta.json``);
    ``seed`` is accepted for compatibility and does not change the split.
    Token shards are memory-mapped lazily, so the dataset pickles cheaply into DataLoader workers.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        heldout_fraction: float | None = None,
        heldout_sequences: int | None = None,
        seed: int | None = None,
    ):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a packed token dataset (no meta.json)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path}: cache format version {self.meta.get('version')} != {FORMAT_VERSION}; rebuild it"
            )
        self.seq_len = int(self.meta["seq_len"])
        self.num_sequences = int(self.meta["num_sequences"])
        self.dtype = np.dtype(self.meta["dtype"])
        self._shard_seqs = int(self.meta["shard_sequences"])
        self._shard_starts = [0]
        for shard in self.meta["shards"]:
            self._shard_starts.append(self._shard_starts[-1] + int(shard["num_sequences"]))
        if self._shard_starts[-1] != self.num_sequences:
            raise ValueError(f"{self.path}: shards hold {self._shard_starts[-1]} sequences, meta says {self.num_sequences}")
        self._arrays: list[np.ndarray] | None = None
        stored = self.meta["heldout"]
        if heldout_fraction is not None and float(heldout_fraction) != float(stored["fraction"]):
            raise ValueError(
                f"{self.path} holds out heldout_fraction={stored['fraction']} of its documents; the split is fixed when "
                f"the cache is built (it decides what is packed where). Build it with heldout_fraction={heldout_fraction} "
                f"(build_token_dataset keys caches by it) instead of re-splitting it on load"
            )
        if heldout_sequences is not None and int(heldout_sequences) < 0:
            raise ValueError(f"heldout_sequences must be >= 0, got {heldout_sequences}")
        num_train = int(self.meta["num_train"])
        first, available = int(stored["first"]), int(stored["stream_sequences"])
        if heldout_fraction is None and heldout_sequences is None and seed is None:
            count = int(stored["count"])
            sequences = stored["sequences"]
        else:
            sequences = heldout_sequences
            count = available if heldout_sequences is None else min(int(heldout_sequences), available)
        self.heldout_config = {
            "fraction": stored["fraction"], "sequences": sequences, "seed": stored["seed"] if seed is None else seed,
            "rule": stored["rule"],
        }
        self.train_indices = _readonly(np.arange(num_train, dtype=np.int64))
        self.heldout_indices = _readonly(np.arange(first, first + count, dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.seq_len

    def _shards(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [np.load(self.path / s["file"], mmap_mode="r") for s in self.meta["shards"]]
        return self._arrays

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = None  # memmaps would otherwise be pickled by value
        return state

    def __len__(self) -> int:
        return self.num_sequences

    def _row(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self.num_sequences
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence index {i} out of range for {self.num_sequences} sequences")
        k = bisect.bisect_right(self._shard_starts, i) - 1
        return self._shards()[k][i - self._shard_starts[k]]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._row(i).astype(np.int64))

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """``LongTensor[len(indices), seq_len]`` for the given sequence indices, in that order."""
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for j, i in enumerate(indices):
            out[j] = self._row(i)
        return torch.from_numpy(out)

    def indices(self, split: str) -> np.ndarray:
        """Sequence indices of ``split``: "train", "heldout" or "all"."""
        if split == "train":
            return self.train_indices
        if split == "heldout":
            return self.heldout_indices
        if split == "all":
            return np.arange(self.num_sequences, dtype=np.int64)
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")

    def __repr__(self) -> str:
        return (
            f"PackedDataset({str(self.path)!r}, sequences={self.num_sequences}, seq_len={self.seq_len}, "
            f"train={len(self.train_indices)}, heldout={len(self.heldout_indices)}, dtype={self.dtype})"
        )


class TokenBatchSampler:
    """Deterministic, resumable, rank-sharded order of global batches over ``indices``.

    Epoch ``e`` visits ``indices`` in a permutation seeded by (seed, e) and yields
    ``len(indices) // batch_size`` global batches (the remainder is skipped that epoch, a
    different remainder each epoch); then the next epoch starts automatically. ``step`` counts
    global batches from the start of ``epoch``, so ``start_step=k`` yields exactly what a fresh
    sampler yields after k batches, without touching any data. Each rank gets its contiguous
    slice ``[rank * b, (rank + 1) * b)`` of the global batch (``b = batch_size // world_size``),
    so the global batch at every step is the same for any ``world_size``.

    Iterating yields numpy index arrays, so it also works as a ``DataLoader(batch_sampler=...)``;
    with a prefetching DataLoader, resume from the trainer's step count rather than ``state_dict()``.
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_steps: int | None = None,
        shuffle: bool = True,
        split: str = "train",
    ):
        self.indices = np.asarray(indices, dtype=np.int64)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"global batch_size {batch_size} is not divisible by world_size {world_size}; "
                f"use a multiple of {world_size} (e.g. {math.ceil(batch_size / world_size) * world_size})"
            )
        if len(self.indices) < batch_size:
            raise ValueError(
                f"the {split!r} split has {len(self.indices)} sequences, fewer than one global batch of "
                f"{batch_size}; use more data, a shorter seq_len, a smaller batch or a smaller held-out split"
            )
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.batch_size, self.seed, self.epoch, self.step = batch_size, int(seed), int(epoch), int(start_step)
        self.rank, self.world_size, self.max_steps, self.shuffle, self.split = rank, world_size, max_steps, shuffle, split
        self.local_batch_size = batch_size // world_size
        self.steps_per_epoch = len(self.indices) // batch_size
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
                self._order = self.indices[rng.permutation(len(self.indices))]
            else:
                self._order = self.indices
            self._order_epoch = epoch
        return self._order  # type: ignore[return-value]

    @property
    def position(self) -> tuple[int, int]:
        """(absolute epoch, step within that epoch) of the next batch."""
        return self.epoch + self.step // self.steps_per_epoch, self.step % self.steps_per_epoch

    def global_batch(self, step: int) -> np.ndarray:
        """Indices of the whole global batch at ``step`` (counted from the start of ``epoch``)."""
        epoch = self.epoch + step // self.steps_per_epoch
        s = (step % self.steps_per_epoch) * self.batch_size
        return self._epoch_order(epoch)[s : s + self.batch_size]

    def __iter__(self) -> Iterator[np.ndarray]:
        while self.max_steps is None or self.step < self.max_steps:
            g = self.global_batch(self.step)
            self.step += 1
            yield g[self.rank * self.local_batch_size : (self.rank + 1) * self.local_batch_size]

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("endless sampler has no len(); pass max_steps")
        return max(self.max_steps - self.step, 0)

    def _data_id(self) -> str:
        return hashlib.sha256(self.indices.tobytes()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Position and the settings that must match to resume (world_size may change)."""
        return {
            "split": self.split, "seed": self.seed, "epoch": self.epoch, "step": self.step,
            "batch_size": self.batch_size, "shuffle": self.shuffle, "num_indices": len(self.indices),
            "indices_hash": self._data_id(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatched = [
            f"{k}: saved {state[k]!r} != current {cur!r}"
            for k, cur in (("batch_size", self.batch_size), ("shuffle", self.shuffle),
                           ("num_indices", len(self.indices)), ("indices_hash", self._data_id()))
            if k in state and state[k] != cur
        ]
        if mismatched:
            raise DataSourceError("cannot resume: the data order would differ (" + "; ".join(mismatched) + ")")
        self.seed, self.epoch, self.step = int(state["seed"]), int(state["epoch"]), int(state["step"])
        self._order_epoch = None


class TokenBatches:
    """Iterator of token batches (``LongTensor[local_batch_size, seq_len]``) driven by a ``TokenBatchSampler``."""

    def __init__(self, dataset: PackedDataset, sampler: TokenBatchSampler):
        self.dataset, self.sampler = dataset, sampler
        self._it: Iterator[np.ndarray] | None = None

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.sampler)
        return self.dataset.get_batch(next(self._it))

    @property
    def step(self) -> int:
        return self.sampler.step

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._it = None
