"""Side-by-side comparison of several ``evaluate_model`` runs (their ``results.json``).

``compare_results(["eval/teacher", "eval/student"], "eval/compare")`` writes
``comparison.md`` (one column per model), ``comparison.json`` and ``comparison.png``
(grouped bars: recall per task, NIAH mean) and returns the comparison dict.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..fileio import atomic_write, atomic_write_text
from .scoring import aggregate
from .suite import format_metric

logger = logging.getLogger(__name__)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """``results.json`` of a result directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"no results.json at {str(path)!r}")
    return json.loads(p.read_text())


def _recall_cells(res: dict[str, Any]) -> set[tuple[str, int]]:
    ptl = ((res.get("recall") or {}).get("aggregate") or {}).get("per_task_length", {})
    return {(task, int(n)) for task, by_len in ptl.items() for n in by_len}


def _niah_cells(res: dict[str, Any]) -> set[tuple[float, int]]:
    return {(float(r["depth"]), int(r["length"])) for r in (res.get("niah") or {}).get("table", [])}


def flat_metrics(res: dict[str, Any], recall_cells: set | None = None, niah_cells: set | None = None) -> dict[str, float]:
    """Flat metric name -> value for one run. With ``recall_cells`` / ``niah_cells`` ((task, length) /
    (depth, length) sets), the recall and NIAH averages cover only those cells; every cell of the run is
    still listed on its own."""
    m: dict[str, float] = {}
    agg = (res.get("recall") or {}).get("aggregate") or {}
    if recall_cells is not None and agg:
        cells = [{"task": t, "length": n, "score": v} for t, by_len in agg.get("per_task_length", {}).items()
                 for n, v in by_len.items() if (t, int(n)) in recall_cells]
        common = aggregate(cells, ruler_tasks=agg.get("ruler_tasks") or ())
        common["per_task_length"] = agg.get("per_task_length", {})
        agg = {**common, "overall": common["overall"] if cells else None}
    for task, by_len in agg.get("per_task_length", {}).items():
        for n, v in by_len.items():
            m[f"recall/{task}@{n}"] = v
    for task, v in agg.get("per_task", {}).items():
        m[f"recall/{task}"] = v
    for n, v in agg.get("per_length", {}).items():
        m[f"recall/mean@{n}"] = v
    if "overall" in agg:
        m["recall/overall"] = agg["overall"]
    if agg.get("ruler_tasks"):
        m["recall/ruler"] = agg["ruler"]
    niah = res.get("niah")
    if niah:
        for r in niah.get("table", []):
            m[f"niah/depth{float(r['depth']):g}@{r['length']}"] = r["score"]
        m["niah/mean"] = niah.get("mean")
        if niah_cells is not None:
            shared = [r["score"] for r in niah.get("table", []) if (float(r["depth"]), int(r["length"])) in niah_cells]
            m["niah/mean"] = sum(shared) / len(shared) if shared else None
    q = res.get("quality")
    if q:
        for k in ("perplexity", "nll", "teacher_perplexity", "kl"):
            if k in q:
                m[f"quality/{k}"] = q[k]
    eff = res.get("efficiency")
    if eff:
        for r in eff.get("rows", []):
            if r.get("model") != eff.get("model") or r.get("oom"):  # the run's own model, not its baseline
                continue
            at = f"@{r['context']}x{r['batch']}"
            for k, field in _EFFICIENCY_FIELDS.items():
                m[f"efficiency/{k}{at}"] = r.get(field)
    return m


# compared metric -> EfficiencyResult field
_EFFICIENCY_FIELDS = {"decode_tok_s": "decode_tokens_per_s", "prefill_ms": "prefill_ms", "cache_gib": "cache_gib",
                      "peak_gib": "peak_gib"}
_LOWER_BETTER = ("quality/perplexity", "quality/nll", "quality/kl", "quality/teacher_perplexity", "efficiency/prefill_ms",
                 "efficiency/cache_gib", "efficiency/peak_gib")


def _lower_is_better(metric: str) -> bool:
    return metric.split("@")[0] in _LOWER_BETTER


def _natural(key: str) -> list:
    """Sort key that orders numbers by value (``@4096`` before ``@16384``)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _digits(metric: str) -> int:
    if metric.startswith("quality"):
        return 4
    if metric.startswith(("efficiency/decode_tok_s", "efficiency/prefill_ms")):
        return 1
    if metric.startswith("efficiency/peak_gib"):
        return 2
    return 3


def _unique_names(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        name, k = n, 1
        while name in out or (name != n and name in names):
            k += 1
            name = f"{n} ({k})"
        out.append(name)
    return out


def _shared_cells(sets: list[set]) -> set | None:
    """The cells every run has, when the runs' cell sets differ (None when they are all the same)."""
    sets = [s for s in sets if s]
    if not sets or all(s == sets[0] for s in sets):
        return None
    return set.intersection(*sets)


def _setting_differences(runs: list[dict[str, Any]], names: list[str]) -> list[str]:
    keys = ("num_samples", "niah_samples", "seed")  # not "teacher": a teacher's own evaluation has none
    out = []
    for key in keys:
        values = {n: (r.get("config") or {}).get(key) for n, r in zip(names, runs)}
        if len({json.dumps(v) for v in values.values()}) > 1:
            out.append(f"{key} " + ", ".join(f"{n}: {v}" for n, v in values.items()))
    return out


def _plot(names: list[str], groups: list[str], values: dict[str, dict[str, float]], path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.0 + 0.9 * len(groups) * max(1, len(names)) * 0.5), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = [values[name].get(g) for g in groups]
        ys = [np.nan if y is None else float(y) for y in ys]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, ys, width, label=name)
    ax.set_xticks(x, [g.split("/", 1)[1] for g in groups], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title("Recall / NIAH by model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compare_results(
    result_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Compare runs: a Markdown table (metrics x models), a JSON copy and a grouped bar plot.

    ``names`` default to each run's ``model`` field. Metrics missing from a run show as "–".
    Returns ``{"models": [...], "metrics": {metric: {model: value}}, "files": {...}}``.
    """
    if not result_dirs:
        raise ConfigError("need at least one result directory")
    runs = [load_results(d) for d in result_dirs]
    names = _unique_names(list(names) if names else [str(r.get("model") or Path(d).name) for r, d in zip(runs, result_dirs)])
    if len(names) != len(runs):
        raise ConfigError("names must match result_dirs")
    recall_cells = _shared_cells([_recall_cells(r) for r in runs])
    niah_cells = _shared_cells([_niah_cells(r) for r in runs])
    per_model = {n: flat_metrics(r, recall_cells, niah_cells) for n, r in zip(names, runs)}
    notes = []
    if recall_cells is not None:
        notes.append(f"The runs measured recall on different (task, length) cells: every recall average here is over the "
                     f"{len(recall_cells)} cells all of them have; the other cells are listed but averaged in no column.")
    if niah_cells is not None:
        notes.append(f"The runs measured NIAH on different (depth, length) cells: niah/mean is over the "
                     f"{len(niah_cells)} cells all of them have.")
    differences = _setting_differences(runs, names)
    if differences:
        notes.append("Settings differ between the runs: " + "; ".join(differences) + ".")
    for note in notes:
        logger.warning("compare: %s", note)
    keys: list[str] = []
    for m in per_model.values():
        for k in m:
            if k not in keys:
                keys.append(k)
    order = {"recall": 0, "niah": 1, "quality": 2, "efficiency": 3}
    keys.sort(key=lambda k: (order.get(k.split("/")[0], 9), "@" in k and not k.startswith("efficiency"), _natural(k)))
    metrics = {k: {n: per_model[n].get(k) for n in names} for k in keys}

    lines = ["# Model comparison", "", "| metric | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for k in keys:
        vals = metrics[k]
        finite = [v for v in vals.values() if isinstance(v, (int, float)) and not math.isnan(v)]
        best = (min(finite) if _lower_is_better(k) else max(finite)) if len(finite) > 1 else None
        cells = []
        for n in names:
            v = vals[n]
            s = format_metric(float(v) if isinstance(v, (int, float)) else v, _digits(k))
            cells.append(f"**{s}**" if best is not None and v == best else s)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: best per row (lower is better for perplexity, NLL, KL, prefill time and memory; efficiency rows "
              "are `@context x batch`).", ""]
    lines += [f"**Note:** {note}" for note in notes] + ([""] if notes else [])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = [k for k in keys if (k.startswith("recall/") and "@" not in k and k not in ("recall/overall", "recall/ruler"))]
    groups += [k for k in ("recall/ruler", "recall/overall", "niah/mean") if k in keys]
    files = {"markdown": str(out / "comparison.md"), "json": str(out / "comparison.json")}
    if groups:
        atomic_write(out / "comparison.png", lambda tmp: _plot(names, groups, per_model, Path(tmp)))
        files["plot"] = str(out / "comparison.png")
        lines += ["![comparison](comparison.png)", ""]
    else:  # a plot of an earlier comparison in this folder would pass for this one's
        (out / "comparison.png").unlink(missing_ok=True)
    result = {"models": names, "sources": [str(d) for d in result_dirs], "metrics": metrics, "notes": notes,
              "files": files}
    atomic_write_text(out / "comparison.md", "\n".join(lines))
    atomic_write_text(out / "comparison.json", json.dumps(result, indent=1) + "\n")
    return result


__all__ = ["compare_results", "load_results"]
