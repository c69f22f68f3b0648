"""Language-modelling quality: held-out perplexity on a packed corpus and teacher-student KL.

Typical use::

    batches = heldout_batches(tokenizer, "default", seq_len=512, max_sequences=32)
    evaluate_quality(student, batches, teacher=teacher)
    # {"nll": ..., "perplexity": ..., "tokens": ..., "teacher_nll": ..., "teacher_perplexity": ..., "kl": ...}

The KL is :func:`hybrid_distill.distill.evaluate_kl` (mean token KL(teacher || student)).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..data import DataConfig
from ..data.sources import DataSourceError
from ..distill import evaluate_kl


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def unpack_batch(batch, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input ids [B, T] on ``device``, attention mask or None) of a batch given as a tensor or a dict."""
    if isinstance(batch, dict):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        ids, mask = batch, None
    if not torch.is_tensor(ids):
        ids = torch.as_tensor(ids)
    if ids.dim() != 2:
        raise ValueError(f"expected token batches of shape [B, T], got {tuple(ids.shape)}")
    ids = ids.to(device=device, dtype=torch.long)
    mask = mask.to(device) if mask is not None else None
    return ids, mask


@torch.no_grad()
def token_nll(model, batches: Iterable, chunk_size: int = 4096) -> tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) of ``model`` over ``batches``.

    Batches: LongTensors ``[B, T]`` or dicts with ``input_ids`` (+ ``attention_mask``; padded
    positions are neither inputs to predict nor targets). Token ``t`` predicts token ``t+1``.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids, mask = unpack_batch(batch, device)
            out = model(input_ids=ids, attention_mask=mask) if mask is not None else model(input_ids=ids)
            logits = out.logits[:, :-1]
            targets = ids[:, 1:]
            valid = torch.ones_like(targets, dtype=torch.bool) if mask is None else (mask[:, :-1].bool() & mask[:, 1:].bool())
            flat_logits = logits.reshape(-1, logits.shape[-1])
            flat_t = targets.reshape(-1)
            flat_v = valid.reshape(-1)
            for s in range(0, flat_t.numel(), chunk_size):
                lg = flat_logits[s : s + chunk_size].float()
                nll = F.cross_entropy(lg, flat_t[s : s + chunk_size], reduction="none")
                v = flat_v[s : s + chunk_size]
                total += float(nll[v].double().sum())
                count += int(v.sum())
    finally:
        model.train(was_training)
    return total, count


def perplexity(model, batches: Iterable) -> dict[str, float]:
    """Mean next-token NLL (nats), its exp (perplexity) and the token count over ``batches``."""
    total, count = token_nll(model, batches)
    nll = total / count if count else math.nan
    return {"nll": nll, "perplexity": math.exp(nll) if count else math.nan, "tokens": count}


def teacher_student_kl(student, teacher, batches: Iterable, tau: float = 1.0) -> float:
    """Mean token KL(teacher || student) (:func:`hybrid_distill.distill.evaluate_kl`)."""
    return float(evaluate_kl(student, teacher, batches, tau=tau))


def heldout_batches(
    tokenizer,
    corpus: Any = "default",
    *,
    seq_len: int = 512,
    batch_size: int = 4,
    max_sequences: int | None = 32,
    max_tokens: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    split: str = "heldout",
    **dataset_options: Any,
) -> list[torch.Tensor]:
    """Held-out ``[B, seq_len]`` batches of ``corpus`` packed with ``tokenizer`` (a list, reusable).

    ``corpus``: a `DataConfig` (a distillation run's data: its own held-out split, text field, recall
    mix), a dict of its fields, or any source of :func:`hybrid_distill.data.build_token_dataset`
    (``"default"``: the bundled corpus; ``max_tokens``, ``cache_dir`` and ``dataset_options`` apply).
    The dataset is cached under ``cache_dir`` (default: the package's token cache). At most
    ``max_sequences`` held-out sequences are used (``None``: all).
    """
    spec = as_data_spec(corpus, max_tokens=max_tokens, cache_dir=cache_dir, **dataset_options)
    options = {} if max_sequences is None else {"heldout_sequences": int(max_sequences)}
    ds = spec.load(tokenizer, seq_len, **options)
    out: list[torch.Tensor] = []
    seen = 0
    for batch in ds.eval_batches(split=split, batch_size=batch_size):
        if max_sequences is not None and seen + batch.shape[0] > max_sequences:
            batch = batch[: max_sequences - seen]
        if batch.shape[0] == 0:
            break
        out.append(batch)
        seen += batch.shape[0]
        if max_sequences is not None and seen >= max_sequences:
            break
    if not out:
        raise DataSourceError(f"corpus {spec.source!r} has no {split!r} sequences of {seq_len} tokens")
    return out


def as_data_spec(corpus: Any, **overrides: Any):
    """``corpus`` (a `DataConfig`, a dict of its fields or a source string) as a `DataConfig`; ``overrides``
    that are not None replace its fields."""
    import dataclasses

    if not isinstance(corpus, DataConfig):
        corpus = DataConfig.from_value(corpus if isinstance(corpus, dict) else str(corpus))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(corpus, **overrides) if overrides else corpus


def evaluate_quality(model, batches: Iterable, teacher=None, tau: float = 1.0) -> dict[str, float]:
    """Perplexity of ``model`` over ``batches``; with ``teacher`` also its perplexity and the KL."""
    batches = list(batches)
    res: dict[str, float] = dict(perplexity(model, batches))
    if teacher is not None:
        t = perplexity(teacher, batches)
        res.update(teacher_nll=t["nll"], teacher_perplexity=t["perplexity"])
        res["kl"] = teacher_student_kl(model, teacher, batches, tau=tau)
    return res


__all__ = ["evaluate_quality", "heldout_batches", "perplexity", "teacher_student_kl", "token_nll"]
