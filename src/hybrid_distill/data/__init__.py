"""Data pipeline for distillation: text sources, token packing with an on-disk cache, and batch loading.

Typical use::

    from hybrid_distill.data import build_token_dataset

    ds = build_token_dataset("default", tokenizer, seq_len=512, cache_dir="cache/tokens",
                             require_sequences=global_batch_size)
    for step, batch in zip(range(start, total), ds.batches("train", global_batch_size, seed=0,
                                                            start_step=start, rank=rank, world_size=world)):
        ...  # batch: LongTensor[global_batch_size // world, 512]

Held-out data (``ds.eval_batches("heldout")``) is packed from documents held out by content hash,
so it is the same text at every ``seq_len``, ``max_tokens`` and seed (see ``packing``).
"""

from .config import DataConfig, add_data_flags, data_config_from_flags
from .loader import PackedDataset, TokenBatches, TokenBatchSampler, split_indices
from .packing import (
    HELDOUT_RULE,
    build_token_dataset,
    default_cache_dir,
    heldout_hash,
    heldout_units,
    resolve_bos,
    tokenizer_fingerprint,
)
from .sources import DataSourceError, ResolvedSource, default_corpus_path, iter_texts, read_haystack, resolve_source

__all__ = [
    "HELDOUT_RULE",
    "DataSourceError",
    "DataConfig",
    "PackedDataset",
    "ResolvedSource",
    "TokenBatchSampler",
    "TokenBatches",
    "add_data_flags",
    "build_token_dataset",
    "data_config_from_flags",
    "default_cache_dir",
    "default_corpus_path",
    "heldout_hash",
    "heldout_units",
    "iter_texts",
    "read_haystack",
    "resolve_bos",
    "resolve_source",
    "split_indices",
    "tokenizer_fingerprint",
]
