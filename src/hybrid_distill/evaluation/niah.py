"""Needle-in-a-haystack grids (gkamradt style) and their Depth x Length heatmap.

For each (length, depth) cell the haystack is fitted to the exact total length (as in
:mod:`~hybrid_distill.tasks.base`: tokens(prompt + answer_prefix) +
max_new_tokens == length, special tokens excluded). The needle -- RULER's
``One of the special magic numbers for {key} is: {value}.`` -- goes to token position
``p = round(T * depth / 100)`` of the haystack (``T`` = its tokens without the needle),
moved back to the end of the sentence (haystack unit) in which ``p`` falls, so no sentence
is split. The question is RULER's single-needle NIAH question; a cell scores 1 if the
value appears in the generation (``string_match_all``).
"""

from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..data import read_haystack
from ..tasks.base import RANDOM_VALUES, Draft, RecallSample, UniqueValues, count_ci, count_tokens, fit_length, sample_seed
from ..tasks.haystack import resolve_haystack
from ..tasks.niah import NEEDLE, niah_question

TASK = "niah"
_MAX_ATTEMPTS = 20


def _token_starts(tokenizer: Any, text: str) -> list[int] | None:
    """Start character of every token (fast tokenizers), else None."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [s for s, _ in enc["offset_mapping"]]
    except Exception:
        return None


def _needle_unit(tokenizer: Any, units: Sequence[str], joiner: str, hay: str, target: int) -> int:
    """Largest ``b`` such that the first ``b`` units end at or before token ``target`` of ``hay``."""
    ends = [0]
    for i, u in enumerate(units):
        ends.append(ends[-1] + len(u) + (len(joiner) if i else 0))
    starts = _token_starts(tokenizer, hay)
    if starts is not None:
        pos = starts[target] if target < len(starts) else len(hay)
        return max(b for b in range(len(ends)) if ends[b] <= pos)
    lo, hi = 0, len(units)  # prefix token counts are monotone in b
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(tokenizer, hay[: ends[mid]]) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def niah_grid_samples(
    tokenizer: Any,
    lengths: Iterable[int],
    depths: Iterable[float],
    num_samples: int = 1,
    seed: int = 0,
    haystack: Any = None,
    max_new_tokens: int = 32,
    value_type: str = "numbers",
) -> list[RecallSample]:
    """Samples for every (length, depth percent, index); ``task="niah"``.

    ``haystack`` as in :func:`~hybrid_distill.data.read_haystack` (a corpus is read) and
    :func:`~hybrid_distill.tasks.haystack.resolve_haystack` (default: seeded pseudo-prose). Each sample depends only on
    ``(seed, length, index, depth)``. ``metadata``: ``depth``, ``target_token`` (p),
    ``haystack_tokens`` (T), ``needle_unit`` (units before the needle), ``needle``, ``key``.
    """
    hay = resolve_haystack(read_haystack(haystack), default="prose")
    out = []
    for length in lengths:
        for depth in depths:
            for i in range(num_samples):
                out.append(_grid_sample(tokenizer, int(length), float(depth), i, seed, hay, max_new_tokens, value_type))
    return out


def _grid_sample(tokenizer, length, depth, index, seed, hay, max_new_tokens, value_type) -> RecallSample:
    if not 0 <= depth <= 100:
        raise ValueError(f"depth must be a percent in [0, 100], got {depth}")
    budget = length - max_new_tokens
    for attempt in range(_MAX_ATTEMPTS):
        s = sample_seed(seed, TASK, length, index, depth, attempt)
        rng = random.Random(s)
        key = UniqueValues(rng, "words")()
        value = RANDOM_VALUES[value_type](rng)
        needle = NEEDLE.format(type_v=value_type, key=key, value=value)
        template, prefix = niah_question(value_type, key, plural=False)
        stream = hay.stream(rng.getrandbits(64))
        joiner = stream.joiner

        def build(n: int, pad: str) -> Draft:
            units = stream.take(n)
            text = joiner.join(units) + pad
            total = count_tokens(tokenizer, text)
            target = round(total * depth / 100)
            b = _needle_unit(tokenizer, units, joiner, text, target)
            context = joiner.join(units[:b] + [needle] + units[b:]) + pad
            meta = {"depth": depth, "target_token": target, "haystack_tokens": total, "needle_unit": b,
                    "needle": needle, "key": key, "value_type": value_type}
            return Draft(template.replace("{context}", context), prefix, [value], meta)

        fit = fit_length(tokenizer, build, budget, 0, stream.continuation, what=f"niah length {length}")
        low = fit.draft.text.lower()
        if count_ci(low, value) == 1 and count_ci(low, key) == 3:
            break
    else:
        raise RuntimeError(f"niah: no valid sample after {_MAX_ATTEMPTS} attempts")
    d = fit.draft
    meta = {**d.metadata, "seed": seed, "sample_seed": s, "attempt": attempt, "haystack": hay.name,
            "num_units": fit.units, "pad_chars": len(fit.pad), "input_tokens": fit.tokens,
            "total_tokens": fit.tokens + max_new_tokens, "length_exact": fit.exact}
    return RecallSample(TASK, length, index, d.prompt, d.answer_prefix, [value], max_new_tokens,
                        "string_match_all", meta)


def niah_table(results: Iterable[tuple[RecallSample, float]]) -> dict[tuple[float, int], float]:
    """Mean score per ``(depth, length)`` from ``(sample, score)`` pairs of a NIAH grid."""
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for sample, score in results:
        cells[(float(sample.metadata["depth"]), int(sample.length))].append(float(score))
    return {k: sum(v) / len(v) for k, v in sorted(cells.items())}


def plot_niah_heatmap(
    table: Mapping[tuple[float, int], float] | Mapping[float, Mapping[int, float]],
    path: str | os.PathLike,
    title: str = "Needle in a haystack",
) -> str:
    """Write a PNG heatmap: rows = depth percent (0 at top), columns = length, cell = accuracy.

    ``table``: ``{(depth, length): acc}`` (as from :func:`niah_table`) or ``{depth: {length: acc}}``.
    Uses matplotlib's Agg canvas directly (no pyplot, global backend untouched).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    flat: dict[tuple[float, int], float] = {}
    for k, v in table.items():
        if isinstance(v, Mapping):
            for length, acc in v.items():
                flat[(float(k), int(length))] = float(acc)
        else:
            flat[(float(k[0]), int(k[1]))] = float(v)
    if not flat:
        raise ValueError("empty NIAH table")
    depths = sorted({d for d, _ in flat})
    lengths = sorted({n for _, n in flat})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (d, n), acc in flat.items():
        grid[depths.index(d), lengths.index(n)] = acc

    fig = Figure(figsize=(max(4.0, 1.5 + 0.9 * len(lengths)), max(3.0, 1.5 + 0.45 * len(depths))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for r in range(len(depths)):
        for c in range(len(lengths)):
            if not math.isnan(grid[r, c]):
                ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("Length (tokens)")
    ax.set_ylabel("Depth (%)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="Accuracy")
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=120)
    return path
