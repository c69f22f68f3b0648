"""Synthetic in-context-recall documents mixed into a text stream.

A teacher pretrained on recall documents (as the shipped tiny teacher) only shows its recall
behaviour on prompts of that format; a student distilled on generic text alone never sees them.
`RecallMix` interleaves whole recall documents (prompt + answer prefix + a correct answer, made
by the recall task generators of `hybrid_distill.tasks` with the run's tokenizer, in the evaluation's
template family) into the documents of any source, so that about ``fraction`` of the characters are
recall documents. Generator seeds start at ``seed`` (default 10**6), far from the evaluation's sample seeds.

It is off by default: the paper distills on generic text only.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..tasks import TASKS, LengthError, generate_samples
from .sources import DataSourceError

# The shipped teacher's pretraining mixture (scripts/pretrain_teacher.yaml): task -> weight.
DEFAULT_RECALL_MIX = {
    "niah_single_1": 2,
    "niah_single_2": 1,
    "niah_single_3": 1,
    "niah_multikey_1": 1,
    "niah_multikey_2": 2,
    "niah_multikey_3": 1,
    "niah_multivalue": 1,
    "niah_multiquery": 1,
    "kv_retrieval": 3,
    "mqar": 2,
    "vt": 2,
}


@dataclass(frozen=True)
class RecallMix:
    """``fraction`` of the characters as recall documents of ``tasks`` (name -> weight)."""

    fraction: float
    tasks: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RECALL_MIX))
    seed: int = 1_000_000

    def __post_init__(self):
        if isinstance(self.fraction, bool) or not 0.0 < float(self.fraction) < 1.0:
            raise DataSourceError(f"data.recall_fraction must be in (0, 1), got {self.fraction!r}")
        if not self.tasks:
            raise DataSourceError("data.recall_tasks must name at least one task")
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise DataSourceError(f"unknown recall task(s) {unknown} in data.recall_tasks; known: {sorted(TASKS)}")
        if any(float(w) <= 0 for w in self.tasks.values()):
            raise DataSourceError(f"data.recall_tasks weights must be positive, got {self.tasks}")

    def fingerprint(self) -> dict[str, Any]:
        return {"fraction": float(self.fraction), "tasks": {k: float(v) for k, v in sorted(self.tasks.items())}, "seed": int(self.seed)}

    def documents(self, tokenizer, seq_len: int) -> Iterator[str]:
        """Endless, deterministic recall documents whose prompts take 3/8 to all but 16 of ``seq_len`` tokens."""
        for _, text in self.seeded_documents(tokenizer, seq_len):
            yield text

    def seeded_documents(self, tokenizer, seq_len: int) -> Iterator[tuple[int, str]]:
        """``(generator seed, document)`` pairs of `documents` (the seed identifies a document at every seq_len)."""
        names = sorted(self.tasks)
        weights = [float(self.tasks[n]) for n in names]
        low, high = max(16, seq_len * 3 // 8), max(17, seq_len - 16)
        i, failures = 0, 0
        while True:
            seed = int(self.seed) + i
            i += 1
            rng = random.Random(seed)
            task = rng.choices(names, weights)[0]
            prompt_tokens = rng.randint(low, high)
            try:
                sample = generate_samples(task, tokenizer, prompt_tokens + TASKS[task].max_new_tokens, 1, seed=seed)[0]
            except LengthError:  # the task needs a longer prompt than drawn: skip this seed
                failures += 1
                if failures >= 200 and failures > 0.9 * i:
                    raise DataSourceError(
                        f"recall tasks {names} do not fit prompts of {low}-{high} tokens (seq_len {seq_len}); "
                        f"use a longer seq_len or other data.recall_tasks"
                    ) from None
                continue
            yield seed, sample.input_text + sample.completion

    def check_fits(self, tokenizer, seq_len: int) -> None:
        """Raise `DataSourceError` unless the recall tasks make documents for ``seq_len``-token sequences."""
        next(self.seeded_documents(tokenizer, seq_len))

    def interleave(self, texts: Iterable[str], tokenizer, seq_len: int) -> Iterator[str]:
        """``texts`` with recall documents inserted so they make up about ``fraction`` of the characters."""
        for text, _ in self.interleave_tagged(texts, tokenizer, seq_len):
            yield text

    def interleave_tagged(self, texts: Iterable[str], tokenizer, seq_len: int) -> Iterator[tuple[str, int | None]]:
        """`interleave` as ``(text, None)`` for a source document and ``(text, generator seed)`` for a recall one."""
        recall = self.seeded_documents(tokenizer, seq_len)
        ratio = float(self.fraction) / (1.0 - float(self.fraction))
        text_chars = recall_chars = 0
        for text in texts:
            yield text, None
            text_chars += len(text)
            while recall_chars < ratio * text_chars:
                seed, doc = next(recall)
                recall_chars += len(doc)
                yield doc, seed


def recall_mix_from_fields(fraction: float, tasks: Any, seed: int | None) -> RecallMix | None:
    """A `RecallMix` from DataSpec fields (tasks: None, a list of names or a name -> weight mapping)."""
    if not fraction:
        return None
    options: dict[str, Any] = {}  # fields left out keep RecallMix's defaults
    if isinstance(tasks, dict):
        options["tasks"] = {str(k): float(v) for k, v in tasks.items()}
    elif isinstance(tasks, (list, tuple)):
        options["tasks"] = {str(t): 1.0 for t in tasks}
    elif tasks is not None:
        raise DataSourceError(f"data.recall_tasks must be a list of task names or a mapping name -> weight, got {tasks!r}")
    if seed is not None:
        options["seed"] = int(seed)
    return RecallMix(float(fraction), **options)
