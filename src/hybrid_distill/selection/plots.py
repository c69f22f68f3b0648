"""PNG figures for layer selection (importance bars, selected layers per budget, stability, KL curves).

Each function draws with matplotlib's Agg canvas (no pyplot, no display, safe in worker processes),
writes the PNG atomically (temporary file in the same directory, then ``os.replace``) and returns its Path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write

__all__ = ["plot_importance", "plot_score_trajectories", "plot_selected_layers", "plot_stability"]

_SELECTED = "#d62728"
_OTHER = "#9ecae1"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def _x_values(count: int, tokens: Sequence[float] | None) -> tuple[list[float], str]:
    if tokens is None:
        return list(range(count)), "snapshot"
    if len(tokens) < count:
        raise ValueError(f"got {len(tokens)} token counts for {count} snapshots")
    return [float(t) for t in tokens[:count]], "tokens"


def plot_importance(
    scores: Mapping[int, float],
    path: str | os.PathLike,
    selected: Sequence[int] = (),
    title: str | None = None,
    ylabel: str = "importance",
) -> Path:
    """Bar per layer (NaN scores drawn as empty grey bars), ``selected`` layers highlighted."""
    layers = sorted(int(l) for l in scores)
    values = [float(scores[l]) for l in layers]
    chosen = {int(l) for l in selected}
    fig = _figure(max(6.0, 0.22 * len(layers) + 2.0), 3.2)
    ax = fig.add_subplot()
    heights = [v if math.isfinite(v) else 0.0 for v in values]
    colors = [_SELECTED if l in chosen else _OTHER for l in layers]
    bars = ax.bar(layers, heights, color=colors, edgecolor="none")
    for bar, v in zip(bars, values):
        if not math.isfinite(v):
            bar.set_facecolor("none")
            bar.set_edgecolor("grey")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if layers:
        ax.set_xlim(min(layers) - 0.6, max(layers) + 0.6)
    ax.set_title(title or (f"layer importance ({len(chosen)} selected in red)" if chosen else "layer importance"))
    return _save(fig, path)


def plot_selected_layers(
    sets_by_budget: Mapping[str, Sequence[int]],
    num_layers: int,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Paper Fig. 6 style: one row per budget label, a vertical tick at each selected layer index."""
    labels = list(sets_by_budget)
    fig = _figure(max(6.0, 0.2 * num_layers + 2.0), 0.45 * max(1, len(labels)) + 1.2)
    ax = fig.add_subplot()
    for row, label in enumerate(labels):
        layers = sorted(int(l) for l in sets_by_budget[label])
        ax.vlines(layers, row - 0.35, row + 0.35, color=_SELECTED, linewidth=2.0)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([f"{label} (K={len(sets_by_budget[label])})" for label in labels])
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(-0.5, num_layers - 0.5)
    ax.set_xticks(range(0, num_layers, max(1, num_layers // 18)))
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(f"layer index (0..{num_layers - 1})")
    ax.set_title(title or "selected softmax layers")
    return _save(fig, path)


def plot_stability(
    stats: Sequence[Mapping[str, Any]],
    k: int,
    path: str | os.PathLike,
    stop_index: int | None = None,
    tokens: Sequence[float] | None = None,
) -> Path:
    """Rolling mean pairwise Jaccard (left axis) and backbone / union sizes (right axis, full windows
    only) per snapshot from ``rules.rolling_jaccard_stats``; dashed lines at K-1 / K+1 and the stop."""
    xs, xlabel = _x_values(len(stats), tokens)
    jac = [math.nan if s.get("jaccard_mean") is None else float(s["jaccard_mean"]) for s in stats]
    full = [bool(s.get("full", s.get("jaccard_mean") is not None)) for s in stats]
    backbone = [len(s["backbone"]) if f else math.nan for s, f in zip(stats, full)]
    union = [len(s["union"]) if f else math.nan for s, f in zip(stats, full)]
    fig = _figure(7.0, 3.4)
    ax = fig.add_subplot()
    ax.plot(xs, jac, color="tab:blue", marker=".", label="rolling mean Jaccard")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("mean pairwise Jaccard", color="tab:blue")
    ax.set_xlabel(xlabel)
    right = ax.twinx()
    right.plot(xs, backbone, color="tab:green", drawstyle="steps-post", label="|backbone|")
    right.plot(xs, union, color="tab:orange", drawstyle="steps-post", label="|union|")
    for level in (k - 1, k + 1):
        right.axhline(level, color="grey", linestyle=":", linewidth=0.8)
    right.set_ylabel("layers")
    right.set_ylim(0, max([k + 2.0] + [u for u in union if math.isfinite(u)]) + 0.5)
    if stop_index is not None and 0 <= stop_index < len(xs):
        ax.axvline(xs[stop_index], color="black", linestyle="--", linewidth=1.0, label=f"early stop ({stop_index})")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    ax.set_title(f"top-K stability (K={k})")
    return _save(fig, path)


def plot_score_trajectories(
    kl_by_layer: Mapping[int, Sequence[float]],
    path: str | os.PathLike,
    tokens: Sequence[float] | None = None,
    null_band: Sequence[tuple[float, float, float]] | None = None,
) -> Path:
    """Held-out KL of each candidate over snapshots (shorter curves = candidates dropped by racing).
    ``null_band``: per snapshot (mean, low, high) of the null candidates, drawn as a grey band with its mean."""
    layers = sorted(int(l) for l in kl_by_layer)
    longest = max((len(kl_by_layer[l]) for l in layers), default=0)
    xs, xlabel = _x_values(longest, tokens)
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for i, layer in enumerate(layers):
        kls = [float(v) for v in kl_by_layer[layer]]
        color = cmap(i / max(1, len(layers) - 1))
        ax.plot(xs[: len(kls)], kls, color=color, linewidth=1.0, marker="." if len(kls) < 3 else None, label=str(layer))
    if null_band:
        xb = xs[: len(null_band)]
        ax.fill_between(xb, [b[1] for b in null_band], [b[2] for b in null_band], color="grey", alpha=0.3,
                        label="null ±2σ")
        ax.plot(xb, [b[0] for b in null_band], color="black", linewidth=1.0, linestyle="--", label="null mean")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out KL")
    ax.set_title("one-swap candidates: held-out KL" + (" (grey: noise floor of the null candidates)" if null_band else ""))
    if layers:
        ax.legend(title="layer", fontsize=6, title_fontsize=7, ncol=max(1, math.ceil(len(layers) / 12)),
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
