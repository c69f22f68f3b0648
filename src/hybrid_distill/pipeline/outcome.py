"""The outcome of a layer-selection experiment over pipeline run folders, one per distillation seed: does the
primary selector's hybrid keep more recall than the other placements?

Per budget: the paper's table (each selector's final hybrid, each random set, the teacher and the all-linear
student: recall per task, its average, the evaluation's held-out KL, and the primary minus that row with a 95%
paired-bootstrap interval, `hybrid_distill.evaluation.stats.paired_difference`, over the samples and the seeds both
have) and the endpoint comparison at that budget (`hybrid_distill.pipeline.endpoint.endpoint`: the best baseline,
Uniform, the random sets, Spearman of held-out KL and recall). Then what the selections record (`selection.json`:
early stopping, the noise floor, degenerate scores), how far layer rankings agree across seeds and across
candidate start points, and a summary that applies the pre-registered decision rule to the numbers.
``hybrid-distill outcome RUN_DIR [RUN_DIR ...] --out DIR`` writes it as ``DIR/outcome.md`` and ``DIR/outcome.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from ..evaluation.compare import flat_metrics
from ..evaluation.stats import (
    PairedDifference,
    SampleKey,
    StatsError,
    mean_score,
    paired_difference,
    sample_scores,
    spearman,
)
from ..fileio import atomic_write_json, atomic_write_text, read_json
from ..layout import RunLayout
from ..selection import rules
from ..selection.result import SelectionResult
from .endpoint import DEFAULT_BASELINES, EndpointResult, endpoint
from .models import hybrid_name

OUTCOME_MD, OUTCOME_JSON = "outcome.md", "outcome.json"

# The rule the reproduction pre-registered for its endpoint (docs/reproduction.md), applied to every difference
# "primary minus X" that the summary states.
DECISION_RULE = ("a difference {primary} − X whose 95% paired-bootstrap interval lies above 0 supports the claim "
                 "that {primary} keeps more recall than X, one below 0 contradicts it, any other is undecided")
VERDICTS = {"a > b": "supported", "a < b": "contradicted", "undecided": "undecided"}  # PairedDifference.verdict


@dataclass
class RunInfo:
    """One run folder: its position in the pairing over seeds and the ``seed`` its run config records."""

    path: str
    seed: int | None


@dataclass
class OutcomeRow:
    """One row of a budget's table: a selector's hybrid (``kind`` ``selector``; ``random`` for one random set),
    the teacher or the all-linear student, over the run folders that have it evaluated."""

    name: str
    kind: str
    models: list[str | None]  # per run folder; None where it has no evaluated model for this row
    layers: list[list[int] | None]  # softmax layers per run folder (None for the teacher and all-linear rows)
    per_task: dict[str, float]  # mean recall per task over lengths, samples and runs
    recall: float  # mean over runs of the mean sample score (the endpoint's recall)
    kl: float | None  # mean over runs of the evaluation's held-out KL
    versus_primary: PairedDifference | None = None  # primary minus this row, over the runs both have

    @property
    def runs(self) -> int:
        return sum(m is not None for m in self.models)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "versus_primary"}
        out["versus_primary"] = self.versus_primary.to_dict() if self.versus_primary else None
        return out


@dataclass
class BudgetOutcome:
    """One budget: the table's rows, the endpoint comparison, and what has no row or no cell (row -> reasons)."""

    label: str
    k: int
    rows: list[OutcomeRow]
    endpoint: EndpointResult
    missing: dict[str, list[str]] = field(default_factory=dict)

    def row(self, name: str) -> OutcomeRow | None:
        return next((r for r in self.rows if r.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "k": self.k, "rows": [r.to_dict() for r in self.rows],
                "endpoint": self.endpoint.to_dict(), "missing": self.missing}


@dataclass
class BudgetDiagnostics:
    """What one selection records for one budget: where early stopping fired (``early_stop``: ``off``, ``not
    fired``, ``fired``; None for a selector without candidates), the noise floor at the snapshot its set came from,
    and whether the set's boundary lies beyond the null band (`BudgetSet.resolved`)."""

    label: str
    k: int
    layers: list[list[int]]
    early_stop: str | None
    stop_snapshot: int | None
    stop_tokens: int | None
    snr: float | None
    null_std: float | None
    resolved: bool | None


@dataclass
class SelectionDiagnostics:
    run: int  # index into OutcomeResult.runs
    selector: str
    source: str
    candidate_start: str | None
    degenerate: str | None
    failures: list[str]
    tokens_spent: int | None
    saved_fraction: float | None
    budgets: list[BudgetDiagnostics]


@dataclass
class Agreement:
    """Two selections compared: Spearman of their layer scores (``layers`` shared layers; None when either is
    constant or fewer than 2 layers are shared) and the Jaccard index of their chosen sets per budget label."""

    selector_a: str
    run_a: int
    selector_b: str
    run_b: int
    spearman: float | None
    layers: int
    jaccard: dict[str, float]


@dataclass
class OutcomeResult:
    """The outcome over the run folders: one `BudgetOutcome` per budget (ordered by K), the selections'
    diagnostics, ranking agreement across seeds and start points, and what was left out."""

    runs: list[RunInfo]
    primary: str
    baselines: list[str]
    tasks: list[str]
    lengths: list[int]
    num_layers: int
    resamples: int
    seed: int
    budgets: list[BudgetOutcome]
    diagnostics: list[SelectionDiagnostics]
    seed_agreement: list[Agreement]
    start_agreement: list[Agreement]
    missing: list[str]  # selectors a run folder names but holds no selection for; recall tasks left out

    def budget(self, label: str) -> BudgetOutcome:
        return next(b for b in self.budgets if b.label == label)

    def summary(self) -> str:
        """One paragraph: the decision rule, then per budget the primary's recall and its differences to the best
        baseline and Uniform with their verdicts, and its standing among the random sets."""
        p = self.primary
        parts = [f"Decision rule (the reproduction's pre-registered one): {DECISION_RULE.format(primary=p)}."]
        for b in self.budgets:
            e = b.endpoint
            own = e.outcomes.get(p)
            if own is None:
                parts.append(f"At K = {b.k}: no comparison ({p}: {e.missing.get(p, 'no outcome')}).")
                continue
            text = f"At K = {b.k} ({e.seeds} seed(s)), {p} recall {own.recall:.3f}"
            if e.versus_best is not None:
                text += (f"; {p} minus the best baseline ({e.best_baseline}, {e.outcomes[e.best_baseline].recall:.3f})"
                         f" = {_interval(e.versus_best)}: {VERDICTS[e.versus_best.verdict]}")
            else:
                text += "; no baseline evaluated in every run folder"
            if e.versus_uniform is not None and e.best_baseline != "uniform":
                text += (f"; minus uniform ({e.outcomes['uniform'].recall:.3f}) = {_interval(e.versus_uniform)}: "
                         f"{VERDICTS[e.versus_uniform.verdict]}")
            if own.random_percentile is not None:
                text += (f"; it beats {own.random_percentile:.0f}% of the {len(e.random_recall)} random sets (ties "
                         f"half; their recall {min(e.random_recall):.3f}–{max(e.random_recall):.3f})")
            parts.append(text + ".")
        first = self.budgets[0] if self.budgets else None
        ends = [r for r in (first.rows if first else []) if r.kind in ("teacher", "all-linear")]
        if ends:
            text = "; ".join(f"{r.name} recall {r.recall:.3f}" for r in ends)
            parts.append(text[0].upper() + text[1:] + ".")
        gaps = sum(len(v) for b in self.budgets for v in b.missing.values()) + len(self.missing)
        if gaps:
            parts.append(f"{gaps} missing piece(s) are listed below.")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("budgets", "diagnostics", "seed_agreement",
                                                                    "start_agreement", "runs")}
        out["runs"] = [r.__dict__ for r in self.runs]
        out["decision_rule"] = DECISION_RULE.format(primary=self.primary)
        out["summary"] = self.summary()
        out["budgets"] = [b.to_dict() for b in self.budgets]
        out["diagnostics"] = [{**d.__dict__, "budgets": [x.__dict__ for x in d.budgets]} for d in self.diagnostics]
        out["seed_agreement"] = [a.__dict__ for a in self.seed_agreement]
        out["start_agreement"] = [a.__dict__ for a in self.start_agreement]
        return out

    def markdown(self) -> str:
        runs = "; ".join(f"#{i + 1} `{r.path}`" + (f" (seed {r.seed})" if r.seed is not None else "")
                         for i, r in enumerate(self.runs))
        lines = [f"# Outcome: {self.primary} against the other layer placements", "",
                 f"Run folders (one per distillation seed, paired by position): {runs}.",
                 (f"Recall: the mean score over {len(self.tasks)} task(s) ({', '.join(self.tasks)}) at "
                  f"{', '.join(map(str, self.lengths))} tokens, averaged over the run folders. Intervals: 95% "
                  f"percentile intervals of {self.resamples} paired-bootstrap resamples (samples resampled within each "
                  f"task × length cell, run folders resampled too; resampling seed {self.seed})."), "",
                 "## Summary", "", self.summary(), ""]
        for b in self.budgets:
            lines += _budget_markdown(self, b)
        lines += _diagnostics_markdown(self)
        if self.missing:
            lines += ["## Left out", ""] + [f"- {m}" for m in self.missing] + [""]
        return "\n".join(lines)


def _interval(d: PairedDifference) -> str:
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def _layers(row: OutcomeRow, num_layers: int) -> str:
    if row.kind == "teacher":
        return f"all {num_layers}"
    if row.kind == "all-linear":
        return "none"
    return "; ".join(f"`{s}`" if s is not None else "–" for s in row.layers)


def _budget_markdown(res: OutcomeResult, b: BudgetOutcome) -> list[str]:
    p, e = res.primary, b.endpoint
    lines = [f"## K = {b.k} of {res.num_layers} (budget {b.label})", "",
             "| model | softmax layers (per run folder) | runs | " + " | ".join(res.tasks)
             + f" | average | held-out KL | {p} − model [95% CI] |",
             "|---|---|---:|" + "---:|" * len(res.tasks) + "---:|---:|---:|"]
    for r in b.rows:
        diff = _interval(r.versus_primary) if r.versus_primary else "–"
        kl = f"{r.kl:.4f}" if r.kl is not None else "–"
        tasks = " | ".join(f"{r.per_task[t]:.3f}" if t in r.per_task else "–" for t in res.tasks)
        lines.append(f"| {r.name} | {_layers(r, res.num_layers)} | {r.runs} | {tasks} | {r.recall:.3f} | {kl} | {diff} |")
    lines += ["", (f"**Endpoint at K = {b.k}** (`endpoint()`: selectors evaluated in every run folder; the best "
                   f"baseline is the one of {', '.join(res.baselines)} with the highest recall that is not "
                   "degenerate):"), ""]
    for label, d in ((f"{p} − best baseline ({e.best_baseline})", e.versus_best), (f"{p} − uniform", e.versus_uniform)):
        if d is not None:
            lines.append(f"- {label}: {_interval(d)} over {d.samples} samples × {d.seeds} run(s): "
                         f"**{VERDICTS[d.verdict]}**")
    if e.versus_best is None:
        lines.append(f"- {p} − best baseline: no comparison ({p} or every baseline lacks an outcome)")
    if e.random_recall:
        r = e.random_recall
        lines.append(f"- Random sets ({len(r)}): recall {min(r):.3f} – {max(r):.3f}, mean {sum(r) / len(r):.3f}")
        ranked = sorted(e.outcomes.values(), key=lambda o: -o.recall)
        lines.append("- Share of the random sets each selector beats (ties half): "
                     + ", ".join(f"{o.selector} {o.random_percentile:.0f}%" for o in ranked))
    if e.spearman_kl_recall is not None:
        rho = "undefined (constant)" if math.isnan(e.spearman_kl_recall) else f"{e.spearman_kl_recall:+.2f}"
        lines.append(f"- Spearman(final held-out KL, recall) over {e.hybrids_correlated} final hybrids: {rho}")
    lines += [f"- Not in the endpoint: {name} ({why})" for name, why in e.missing.items()]
    if b.missing:
        lines += ["", "Missing from the table:", ""]
        lines += [f"- {name}: {'; '.join(why)}" for name, why in b.missing.items()]
    return lines + [""]


def _diagnostics_markdown(res: OutcomeResult) -> list[str]:
    lines = ["## Selection diagnostics", "",
             ("Learned selectors, per budget: where the rolling-Jaccard early stop fired, the noise floor "
              "(signal-to-noise: spread of the layers' held-out KLs / the null candidates' standard deviation) at the "
              "snapshot the set came from, and whether the K-th and (K+1)-th layers lie more than 2 null standard "
              "deviations apart."), "",
             ("| run | selector | candidate start | budget | softmax layers | early stop | signal-to-noise (null std) "
              "| top-K vs null band | candidate tokens (saved) |"), "|---|---|---|---|---|---|---|---|---|"]
    band = {True: "beyond", False: "**inside: not a finding**", None: "– (no null candidates)"}
    for d in res.diagnostics:
        if d.degenerate or not any(x.early_stop is not None for x in d.budgets):
            continue
        tokens = f"{d.tokens_spent:,}" + (f" ({d.saved_fraction:.0%})" if d.saved_fraction is not None else "") \
            if d.tokens_spent is not None else "–"
        for x in d.budgets:
            stop = {"off": "off", "not fired": "not fired", "fired": f"snapshot {x.stop_snapshot}"
                    + (f" ({x.stop_tokens:,} tokens)" if x.stop_tokens is not None else "")}[x.early_stop]
            snr = "–" if x.snr is None else f"{x.snr:.1f}" + (f" ({x.null_std:.3g})" if x.null_std is not None else "")
            lines.append(f"| #{d.run + 1} | {d.selector} | {d.candidate_start or '–'} | {x.label} | "
                         f"{'; '.join(f'`{s}`' for s in x.layers)} | {stop} | {snr} | {band[x.resolved]} | {tokens} |")
    lines.append("")
    lines += [f"- Degenerate: {d.selector} in run #{d.run + 1}: {d.degenerate}" for d in res.diagnostics if d.degenerate]
    lines += [f"- Failed candidates: {d.selector} in run #{d.run + 1}: {', '.join(d.failures)}"
              for d in res.diagnostics if d.failures]
    for title, items in (("Ranking agreement across run folders (seeds)", res.seed_agreement),
                         ("Ranking agreement across candidate start points (same run folder)", res.start_agreement)):
        if not items:
            continue
        labels = list(dict.fromkeys(label for a in items for label in a.jaccard))
        lines += ["", f"### {title}", "",
                  "| selections | Spearman of layer scores (layers) | " + " | ".join(f"Jaccard {x}" for x in labels) + " |",
                  "|---|---:|" + "---:|" * len(labels)]
        for a in items:
            rho = "–" if a.spearman is None else f"{a.spearman:+.2f}"
            cells = " | ".join(f"{a.jaccard[x]:.2f}" if x in a.jaccard else "–" for x in labels)
            lines.append(f"| {a.selector_a} #{a.run_a + 1} vs {a.selector_b} #{a.run_b + 1} | {rho} ({a.layers}) | {cells} |")
    return lines + [""]


@dataclass
class _Run:
    """A run folder as read once: its selections, evaluations and the recall cells every evaluation covers."""

    path: Path
    seed: int | None
    linear: str
    selectors: list[str]
    selections: dict[str, SelectionResult]
    results: dict[str, dict]  # model -> results.json
    cells: set[tuple[str, int]]  # (task, length) every evaluation with recall predictions covers
    any_cells: set[tuple[str, int]]  # ... that any evaluation covers


def _ordered(names: Sequence[str], primary: str) -> list[str]:
    """``names`` without repeats, the primary first and ``random`` last."""
    names = list(dict.fromkeys(names))
    return [n for n in names if n == primary] + [n for n in names if n not in (primary, "random")] + \
        [n for n in names if n == "random"]


def _read_run(path: Path, primary: str, missing: list[str]) -> _Run:
    layout = RunLayout(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")
    config = (read_json(layout.state) or {}).get("config") or {}
    named = (config.get("selection") or {}).get("selectors")
    found = sorted(p.parent.name for p in layout.selection.root.glob("*/selection.json"))
    selectors = _ordered(named or found, primary)
    selections = {}
    for s in selectors:
        file = layout.selection.selection_file(s)
        if file.is_file():
            selections[s] = SelectionResult.load(file)
        else:
            missing.append(f"{s}: {path} names it but holds no {file}")
    if not selections:
        raise StatsError(f"{path} holds no selection ({layout.selection.root}/<selector>/selection.json): give the "
                         "run_dir of a `hybrid-distill run` whose selection stage has finished")
    results = {p.parent.name: read_json(p) for p in sorted(layout.evals.glob("*/results.json"))}
    covered = [c for c in ({(t, n) for t, n, _ in sample_scores(r)} for r in results.values()) if c]
    if not covered:
        raise StatsError(f"{path} holds no evaluation with recall predictions ({layout.evals}/<model>/results.json): "
                         "nothing in it can be compared")
    return _Run(path, config.get("seed"), (config.get("student") or {}).get("linear", "gdn"), selectors, selections,
                results, set.intersection(*covered), set.union(*covered))


def _agreed(runs: list[_Run], values: list[set], what: str, flag: str) -> list:
    """The values every run folder's evaluations share, when they all have the same ones; else an error naming
    what each lacks."""
    shared = set.intersection(*values)
    if all(v == shared for v in values):
        return sorted(shared)
    union = set.union(*values)
    lacks = "; ".join(f"{r.path} lacks {', '.join(map(str, sorted(union - v)))}" for r, v in zip(runs, values)
                      if union - v)
    hint = f"they share {', '.join(map(str, sorted(shared)))}: give those with {flag}" if shared else "they share none"
    raise StatsError(f"the run folders' evaluations differ in their recall {what}: {lacks}; {hint}")


def _tasks_and_lengths(runs: list[_Run], tasks: Sequence[str] | None, lengths: Sequence[int] | None,
                       missing: list[str]) -> tuple[list[str], list[int]]:
    """The tasks and lengths asked for, checked against each run folder; by default the lengths every evaluation
    shares and the tasks evaluated at each of them (a task some lengths lack is left out and listed)."""
    lengths = [int(n) for n in lengths] if lengths else _agreed(runs, [{n for _, n in r.cells} for r in runs],
                                                                "lengths", "--lengths")
    if not tasks:
        grids = [{t for t, _ in r.cells if all((t, n) in r.cells for n in lengths)} for r in runs]
        tasks = _agreed(runs, grids, "tasks", "--tasks")
        partial = sorted({t for r in runs for t, _ in r.cells} - set(tasks))
        if partial:
            missing.append(f"task(s) {', '.join(partial)}: not evaluated at every length "
                           f"({', '.join(map(str, lengths))}) by every evaluation; left out")
    for r in runs:
        lacking = [f"{t}@{n}" for t in tasks for n in lengths if (t, n) not in r.any_cells]
        if lacking:
            have = ", ".join(f"{t}@{n}" for t, n in sorted(r.any_cells))
            raise StatsError(f"{r.path}: no evaluation there covers {', '.join(lacking)} (its evaluations cover {have}); "
                             "choose tasks and lengths every run folder has with --tasks / --lengths")
    return list(tasks), lengths


def _budget_labels(runs: list[_Run], budgets: Sequence[str] | None, num_layers: int) -> list[tuple[str, int]]:
    """(label, K) of each budget asked for (a label, count or ratio; default: every budget a selection has),
    ordered by K."""
    found: dict[str, int] = {}
    for r in runs:
        for sel in r.selections.values():
            for label, entry in sel.budgets.items():
                found.setdefault(label, entry.k)
    if not found:
        raise StatsError("nothing comparable: no selection in " + ", ".join(str(r.path) for r in runs)
                         + " chose a layer set (every selector degenerate?)")
    if budgets is None:
        chosen = found
    else:
        chosen = {}
        for b in budgets:
            if b in found:
                chosen[b] = found[b]
                continue
            k = rules.resolve_budget(b, num_layers)
            labels = {label: kk for label, kk in found.items() if kk == k}
            if not labels:
                have = ", ".join(f"{label} (K={kk})" for label, kk in found.items())
                raise StatsError(f"no selection in the run folders has budget {b} (K={k}); they have {have}")
            chosen.update(labels)
    return sorted(chosen.items(), key=lambda item: item[1])


def _scored(run: _Run, index: int, model: str, tasks: list[str], lengths: list[int],
            why: list[str]) -> tuple[dict[SampleKey, float], float | None] | None:
    """The model's per-sample scores on every (task, length) asked for and its held-out KL, or None with the
    reason added to ``why``."""
    results = run.results.get(model)
    if results is None:
        why.append(f"not evaluated in run #{index + 1} (no {RunLayout(run.path).eval(model)}/results.json)")
        return None
    scores = sample_scores(results, tasks, lengths)
    lacking = sorted({(t, int(n)) for t in tasks for n in lengths} - {(t, n) for t, n, _ in scores})
    if lacking:
        why.append(f"eval/{model} in run #{index + 1} has no predictions for "
                   + ", ".join(f"{t}@{n}" for t, n in lacking))
        return None
    return scores, flat_metrics(results).get("quality/kl")


def _row(name: str, kind: str, entries: list, layers: list, tasks: list[str]) -> OutcomeRow:
    """A row from its per-run entries ((model, scores, kl) or None)."""
    scores = [e[1] for e in entries if e is not None]
    kls = [e[2] for e in entries if e is not None and e[2] is not None]
    per_task = {t: mean_score([{k: v for k, v in s.items() if k[0] == t} for s in scores]) for t in tasks}
    return OutcomeRow(name, kind, [e[0] if e is not None else None for e in entries], layers, per_task,
                      mean_score(scores), sum(kls) / len(kls) if kls else None)


def _budget(runs: list[_Run], selectors: list[str], label: str, k: int, tasks: list[str], lengths: list[int],
            primary: str, baselines: Sequence[str], resamples: int, seed: int) -> BudgetOutcome:
    missing: dict[str, list[str]] = {}
    found: dict[str, tuple[str, list]] = {}  # row name -> (kind, [per-run (model, scores, kl) or None])
    layers: dict[str, list] = {}
    n = len(runs)

    def add(name: str, kind: str, i: int, model: str, chosen: list[int] | None) -> None:
        why = missing.setdefault(name, [])
        got = _scored(runs[i], i, model, tasks, lengths, why)
        found.setdefault(name, (kind, [None] * n))[1][i] = (model, *got) if got is not None else None
        layers.setdefault(name, [None] * n)[i] = chosen

    for i, run in enumerate(runs):
        for selector in selectors:
            sel = run.selections.get(selector)
            entry = sel.budgets.get(label) if sel is not None else None
            if entry is None:
                why = "no selection" if sel is None else (f"degenerate: {sel.degenerate}" if sel.degenerate
                                                           else f"no set at budget {label}")
                missing.setdefault(selector, []).append(f"{why} in run #{i + 1}")
                continue
            for j, chosen in enumerate(entry.sets):
                name = selector if len(entry.sets) == 1 else f"{selector} #{j + 1}"
                kind = "random" if selector == "random" else "selector"
                add(name, kind, i, hybrid_name(sorted(chosen), run.linear), sorted(chosen))
        for name, kind in (("teacher", "teacher"), (f"all-{run.linear}", "all-linear")):
            add(name, kind, i, name, None)
    place = {"teacher": len(selectors), "all-linear": len(selectors) + 1}

    def order(item: tuple[str, tuple[str, list]]) -> int:  # the selectors' order, then the teacher, all-linear
        name, (kind, _) = item
        return place[kind] if kind in place else selectors.index(name.split(" #")[0])

    rows = [_row(name, kind, entries, layers[name] if kind in ("selector", "random") else [None] * n, tasks)
            for name, (kind, entries) in sorted(found.items(), key=order) if any(e is not None for e in entries)]
    own = found.get(primary, (None, [None] * n))[1]
    for row in rows:
        if row.name == primary:
            continue
        theirs = found[row.name][1]
        both = [i for i in range(n) if own[i] is not None and theirs[i] is not None]
        if both:
            row.versus_primary = paired_difference([own[i][1] for i in both], [theirs[i][1] for i in both],
                                                   resamples=resamples, seed=seed)
    result = endpoint([r.path for r in runs], label, tasks, lengths, primary=primary,
                      baselines=baselines, resamples=resamples, seed=seed)
    return BudgetOutcome(label, k, rows, result, {name: why for name, why in missing.items() if why})


def _diagnostics(i: int, selector: str, sel: SelectionResult, labels: set[str]) -> SelectionDiagnostics:
    learned = bool(sel.candidates)
    stop = sel.early_stop or {}
    floors = sel.noise_floor or []
    out = []
    for label, entry in sel.budgets.items():
        if label not in labels:
            continue
        at = entry.stop_snapshot
        floor = (floors[min(at, len(floors) - 1)] if at is not None else floors[-1]) if floors else {}
        state = None if not learned else "off" if not stop.get("enabled") else "not fired" if at is None else "fired"
        out.append(BudgetDiagnostics(label, entry.k, entry.sets, state, at,
                                     (stop.get("stop_tokens") or {}).get(str(entry.k)) if at is not None else None,
                                     floor.get("snr"), floor.get("null_std"), entry.resolved))
    tokens = sel.tokens or {}
    return SelectionDiagnostics(i, selector, sel.source, sel.candidate_start, sel.degenerate,
                                [f"{kind}-{layer}: {err}" for kind, c in sel.candidates.items()
                                 for layer, err in c.failures.items()],
                                tokens.get("spent"), tokens.get("saved_fraction"), out)


def _agreement(a: SelectionResult, ia: int, b: SelectionResult, ib: int, labels: set[str]) -> Agreement:
    sa = {k: v for k, v in (a.scores or {}).items() if v is not None}
    sb = {k: v for k, v in (b.scores or {}).items() if v is not None}
    shared = sorted(set(sa) & set(sb))
    rho = spearman([sa[k] for k in shared], [sb[k] for k in shared]) if len(shared) >= 2 else None
    jaccard = {label: rules.jaccard(e.layers, b.budgets[label].layers) for label, e in a.budgets.items()
               if label in labels and label in b.budgets}
    return Agreement(a.selector, ia, b.selector, ib, None if rho is None or math.isnan(rho) else rho, len(shared),
                     jaccard)


def outcome(run_dirs: Sequence[str | Path], *, primary: str = "ga-s2", baselines: Sequence[str] = DEFAULT_BASELINES,
            budgets: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
            lengths: Sequence[int] | None = None, resamples: int = 10_000, seed: int = 0) -> OutcomeResult:
    """The outcome over ``run_dirs`` (one per distillation seed, paired by position). ``budgets``: labels, counts
    or ratios (default: every budget a selection has); ``tasks`` / ``lengths``: default those every run folder's
    evaluations cover, which must then be the same in each."""
    if not run_dirs:
        raise StatsError("no run folders given")
    if resamples < 1:
        raise StatsError(f"resamples must be at least 1, got {resamples}")
    missing: list[str] = []
    runs = [_read_run(Path(d), primary, missing) for d in run_dirs]
    layer_counts = {r.path: {s.num_layers for s in r.selections.values()} for r in runs}
    if len(set.union(*layer_counts.values())) != 1:
        raise StatsError("the run folders' selections are of models with different layer counts: "
                         + "; ".join(f"{p}: {sorted(c)}" for p, c in layer_counts.items()))
    num_layers = next(iter(next(iter(layer_counts.values()))))
    tasks, lengths = _tasks_and_lengths(runs, tasks, lengths, missing)
    labels = _budget_labels(runs, budgets, num_layers)
    selectors = _ordered([s for r in runs for s in r.selectors], primary)
    baselines = [b for b in baselines if b in selectors]  # the endpoint's choice is among those the runs have
    outcomes = [_budget(runs, selectors, label, k, tasks, lengths, primary, baselines, resamples, seed)
                for label, k in labels]
    if not any(r.kind in ("selector", "random") for b in outcomes for r in b.rows):
        raise StatsError("nothing comparable: no selector's hybrid is evaluated in the run folders ("
                         + "; ".join(f"K={b.k} {name}: {', '.join(why)}" for b in outcomes
                                     for name, why in b.missing.items()) + ")")
    chosen = {label for label, _ in labels}
    diagnostics = [_diagnostics(i, s, sel, chosen) for i, r in enumerate(runs) for s, sel in r.selections.items()]
    seed_agreement = [_agreement(ra.selections[s], ia, rb.selections[s], ib, chosen) for s in selectors
                      for (ia, ra), (ib, rb) in combinations(enumerate(runs), 2)
                      if s in ra.selections and s in rb.selections
                      and ra.selections[s].scores and rb.selections[s].scores]
    base = primary.split("@")[0]
    start_agreement = [_agreement(r.selections[a], i, r.selections[b], i, chosen) for i, r in enumerate(runs)
                       for a, b in combinations([s for s in selectors if s.split("@")[0] == base], 2)
                       if a in r.selections and b in r.selections
                       and r.selections[a].scores and r.selections[b].scores]
    return OutcomeResult([RunInfo(str(r.path), r.seed) for r in runs], primary, list(baselines), tasks, lengths,
                         num_layers, resamples, seed, outcomes, diagnostics, seed_agreement, start_agreement, missing)


def write_outcome(result: OutcomeResult, out_dir: str | Path) -> list[Path]:
    """``out_dir/outcome.md`` and ``out_dir/outcome.json``, each written atomically."""
    out_dir = Path(out_dir)
    return [atomic_write_text(out_dir / OUTCOME_MD, result.markdown()),
            atomic_write_json(out_dir / OUTCOME_JSON, result.to_dict())]


__all__ = ["Agreement", "BudgetDiagnostics", "BudgetOutcome", "OutcomeResult", "OutcomeRow", "RunInfo",
           "SelectionDiagnostics", "outcome", "write_outcome"]
