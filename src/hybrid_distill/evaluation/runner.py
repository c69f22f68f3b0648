"""Run recall samples through a model's `generate()` (greedy, left-padded batches) and score them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .scoring import score_sample


@dataclass
class Prediction:
    task: str
    length: int
    index: int
    prediction: str
    answers: list[str]
    score: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _encode_left_padded(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    bos = tokenizer.bos_token_id
    if bos is not None:
        rows = [[bos] + r for r in rows]
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_batch(model, tokenizer, texts: Sequence[str], max_new_tokens: Sequence[int]) -> list[str]:
    """Greedy continuations of `texts` (BOS prepended when the tokenizer has one), each cut to its own
    `max_new_tokens[i]` and decoded without special tokens."""
    device = next(model.parameters()).device
    ids, mask = _encode_left_padded(tokenizer, texts, device)
    eos = tokenizer.eos_token_id
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max(max_new_tokens),
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        eos_token_id=eos,
    )
    new = out[:, ids.shape[1] :]
    return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, max_new_tokens)]


def recall_batches(samples: Sequence, batch_size: int) -> list[list[int]]:
    """Indices of `samples` in generation batches that never mix tasks or lengths.

    A sample's greedy output can depend on its batch in bf16 (padding changes the kernels' rounding),
    so batches are cut within each (task, length) group, in index order: a task's scores then do not
    depend on which other tasks are evaluated beside it, and a group's prompts (one token length) need no padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.task, s.length), []).append(i)
    batches = []
    for key in sorted(groups, key=lambda k: (str(k[0]), k[1])):
        members = sorted(groups[key], key=lambda i: samples[i].index)
        batches += [members[j : j + batch_size] for j in range(0, len(members), batch_size)]
    return batches


def run_samples(model, tokenizer, samples: Sequence, batch_size: int = 8, progress: bool = True) -> list[Prediction]:
    """Generate and score each sample (`prompt + answer_prefix` as input, its own `max_new_tokens`)."""
    model.eval()
    predictions: dict[int, Prediction] = {}
    bar = tqdm(total=len(samples), desc="recall eval", disable=not progress)
    for batch in recall_batches(samples, batch_size):
        chunk = [samples[i] for i in batch]
        texts = [s.prompt + s.answer_prefix for s in chunk]
        outputs = generate_batch(model, tokenizer, texts, [s.max_new_tokens for s in chunk])
        for i, sample, text in zip(batch, chunk, outputs):
            predictions[i] = Prediction(
                sample.task, sample.length, sample.index, text, list(sample.answers), float(score_sample(sample, text))
            )
        bar.update(len(chunk))
    bar.close()
    return [predictions[i] for i in range(len(samples))]
