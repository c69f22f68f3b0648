"""Scoring of recall predictions (fractions in [0, 1]; RULER reports them x100).

Every metric first normalises the prediction as RULER's ``postprocess_pred`` does: strip,
replace control characters (``\\x00``-``\\x1f``) by ``\\n``, strip again.

* ``string_match_all(pred, refs)``: fraction of ``refs`` occurring in ``pred`` as
  case-insensitive substrings (RULER's niah/vt/cwe/fwe metric).
* ``string_match_part(pred, refs)``: 1 if any ref occurs, else 0 (RULER's QA metric).
* ``first_int_exact(pred, refs)``: 1 if the first run of digits in ``pred`` equals a ref
  as an integer (``"17"`` does not match ``"7"``; ``"07"`` matches ``"7"``), else 0.
* ``mqar_accuracy(pred, refs)``: runs of digits in ``pred``, in order; position ``i`` is
  correct if it equals ``refs[i]`` as a string; fraction correct over ``len(refs)``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

_CTRL = re.compile(r"[\x00-\x1f]")
_INT = re.compile(r"\d+")


def postprocess_prediction(pred: str | None) -> str:
    """RULER's normalisation: strip, control characters -> ``\\n``, strip."""
    return _CTRL.sub("\n", (pred or "").strip()).strip()


def _refs(refs: str | Sequence[str]) -> list[str]:
    refs = [refs] if isinstance(refs, str) else [str(r) for r in refs]
    if not refs:
        raise ValueError("no reference answers")
    return refs


def string_match_all(pred: str, refs: str | Sequence[str]) -> float:
    """Fraction of refs found (case-insensitive substring) in the normalised prediction."""
    p = postprocess_prediction(pred).lower()
    refs = _refs(refs)
    return sum(r.lower() in p for r in refs) / len(refs)


def string_match_part(pred: str, refs: str | Sequence[str]) -> float:
    """1.0 if any ref is found (case-insensitive substring), else 0.0."""
    p = postprocess_prediction(pred).lower()
    return float(any(r.lower() in p for r in _refs(refs)))


def first_int_exact(pred: str, refs: str | Sequence[str]) -> float:
    """1.0 if the first integer (digit run) in the prediction equals one of the refs numerically."""
    m = _INT.search(postprocess_prediction(pred))
    if m is None:
        return 0.0
    got = int(m.group())
    return float(any(r.strip().isdigit() and int(r) == got for r in _refs(refs)))


def mqar_accuracy(pred: str, refs: str | Sequence[str]) -> float:
    """Per-query accuracy: the i-th digit run of the prediction must equal ``refs[i]``."""
    refs = _refs(refs)
    got = _INT.findall(postprocess_prediction(pred))
    return sum(i < len(got) and got[i] == r.strip() for i, r in enumerate(refs)) / len(refs)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "first_int_exact": first_int_exact,
    "mqar_accuracy": mqar_accuracy,
}


def score_sample(sample: Any, prediction: str) -> float:
    """Score ``prediction`` (generated text, without the answer prefix) with ``sample.metric``."""
    try:
        fn = METRICS[sample.metric]
    except KeyError:
        raise KeyError(f"unknown metric {sample.metric!r}; known: {sorted(METRICS)}") from None
    return fn(prediction, sample.answers)


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def aggregate(results: Iterable[Any], ruler_tasks: Iterable[str] = ()) -> dict[str, Any]:
    """Means over results given as ``(sample, score)`` pairs or mappings with task/length/score.

    Returns ``per_task_length[task][length]`` (mean over samples), ``per_task[task]`` (mean of
    its per-length means), ``per_length[length]`` (mean over tasks, as RULER averages tasks at
    each length), ``overall`` (mean of ``per_task``: every task weighs the same, also when it
    could not be built at some lengths), ``overall_samples`` (mean over all samples) and
    ``counts[task][length]``. With ``ruler_tasks``: ``ruler`` = the mean of ``per_task`` over
    those that ran (NaN if none did) and ``ruler_tasks`` = their names, so RULER's own tasks get
    an average of their own, apart from stand-ins such as prose haystacks.
    """
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if isinstance(r, Mapping):
            task, length, score = r["task"], r["length"], r["score"]
        else:
            sample, score = r
            task, length = sample.task, sample.length
        cells[task][int(length)].append(float(score))
    ptl = {t: {n: _mean(v) for n, v in sorted(by_len.items())} for t, by_len in sorted(cells.items())}
    lengths = sorted({n for by_len in ptl.values() for n in by_len})
    per_task = {t: _mean(by_len.values()) for t, by_len in ptl.items()}
    out = {
        "per_task_length": ptl,
        "per_task": per_task,
        "per_length": {n: _mean(by_len[n] for by_len in ptl.values() if n in by_len) for n in lengths},
        "overall": _mean(per_task.values()),
        "overall_samples": _mean(s for by_len in cells.values() for v in by_len.values() for s in v),
        "counts": {t: {n: len(v) for n, v in sorted(by_len.items())} for t, by_len in sorted(cells.items())},
    }
    ruler_ran = [t for t in per_task if t in set(ruler_tasks)]
    if ruler_tasks:
        out["ruler"] = _mean(per_task[t] for t in ruler_ran)
        out["ruler_tasks"] = ruler_ran
    return out
