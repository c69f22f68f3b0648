"""The run report: one Markdown page (``report.md``) and the same as static HTML (``report.html``).

Sections: settings, tokens and time per stage, layer importance and selected layers per selector and
budget (with the selection plots), evaluation of teacher vs all-linear vs each hybrid (tables and
comparison plot), and the saved models. Built only from files in the run directory, so
``hybrid-distill report RUN_DIR`` can rebuild it at any time.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..evaluation.compare import compare_results, flat_metrics
from ..fileio import atomic_write_text, read_json
from ..layout import RunLayout
from ..selection.result import SelectionResult
from .config import RunConfig
from .models import eval_models, hybrid_name

REPORT_DIR = "report"


def _fmt_tokens(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _fmt_time(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "–"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def _copy_plot(src: Path, report_dir: Path, name: str) -> str | None:
    if not src.is_file():
        return None
    dest = report_dir / name
    shutil.copyfile(src, dest)
    return f"{REPORT_DIR}/{name}"


def _selection_section(layout: RunLayout, report_dir: Path, selectors: list[str]) -> list[str]:
    lines = ["## Layer selection", ""]
    for selector in selectors:
        path = layout.selection.selection_file(selector)
        if not path.is_file():
            lines += [f"### {selector}", "", "_not run yet_", ""]
            continue
        sel = SelectionResult.load(path)
        lines += [f"### {selector}", ""]
        if sel.degenerate:
            lines += [f"**No ranking:** {sel.degenerate}. This baseline chose no layers.", ""]
            continue
        if sel.probe:
            start = f", candidates start from the all-linear student after {sel.candidate_start}" if sel.candidate_start else ""
            lines.append(f"Probe (mixer used while scoring): `{sel.probe}`{start}.")
        tok = sel.tokens or {}
        if tok:
            lines.append(
                f"Candidate tokens: {_fmt_tokens(tok.get('spent'))} of a full budget of {_fmt_tokens(tok.get('full_budget'))}"
                f" ({tok.get('saved_fraction', 0):.0%} saved by early stopping/racing)."
            )
        if (sel.early_stop or {}).get("enabled"):
            stops = ", ".join(f"K={k}: " + (f"snapshot {v} ({_fmt_tokens(sel.early_stop['stop_tokens'][k])} tokens)"
                                             if v is not None else "did not fire")
                              for k, v in sel.early_stop["stop_snapshot"].items())
            lines.append(f"Early stop (rolling Jaccard, appendix B), per budget: {stops}.")
        failed = [f"{kind}-{layer}" for kind, sc in sel.candidates.items() for layer in sc.failures]
        if failed:
            lines.append(f"**Failed candidates**: {', '.join(failed)}.")
        if sel.noise_floor:
            last = sel.noise_floor[-1]
            std = last["null_std"]
            lines.append(
                f"Noise floor ({len(sel.candidates['null'].kl)} null candidates, no layer restored, other data orders): "
                f"held-out KL {last['null_mean']:.4f}" + (f" ± {std:.4f}" if std is not None else "")
                + f"; spread of the layers' KLs {last['spread']:.4f}"
                + (f", signal-to-noise {last['snr']:.1f}" if last["snr"] is not None else "") + " (last snapshot).")
        if sel.ranking:
            lines.append(f"Ranking (most important first): `{sel.ranking}`.")
        lines += ["", "| budget | K | softmax layers | adjacency (random) | top-K beyond the noise floor |",
                  "|---|---:|---|---|---|"]
        for label, e in sel.budgets.items():
            sets = "; ".join(f"`{s}`" for s in e.sets)
            resolved = {True: "yes", False: "**no: inside the null band, not a finding**", None: "–"}[e.resolved]
            lines.append(f"| {label} | {e.k} | {sets} | {e.adjacency} ({e.expected_adjacency:.2f}) | {resolved} |")
        lines.append("")
        folder = layout.selection.selector(selector)
        for plot in ("importance", "selected_layers", "kl_ga"):
            rel = _copy_plot(folder / f"{plot}.png", report_dir, f"{selector}-{plot}.png")
            if rel:
                lines.append(f"![{selector} {plot}]({rel})")
        for png in sorted(folder.glob("stability_*.png"))[:2]:
            rel = _copy_plot(png, report_dir, f"{selector}-{png.name}")
            lines.append(f"![{selector} stability]({rel})")
        lines.append("")
    return lines


def _eval_section(run_dir: Path, report_dir: Path, models: dict[str, str]) -> list[str]:
    dirs = {name: run_dir / "eval" / name for name in models if (run_dir / "eval" / name / "results.json").is_file()}
    lines = ["## Evaluation", ""]
    if not dirs:
        return lines + ["_no evaluation results yet_", ""]
    comp = compare_results([str(d) for d in dirs.values()], report_dir / "comparison", names=list(dirs))
    # the comparison's metrics: averages over the cells every model was evaluated on
    per_model = {name: {k: vals[name] for k, vals in comp["metrics"].items() if vals.get(name) is not None} for name in dirs}
    headline = ["recall/overall", "recall/ruler", "niah/mean", "quality/perplexity", "quality/kl"]
    tasks = sorted({k for m in per_model.values() for k in m
                    if k.startswith("recall/") and "@" not in k and k not in headline})
    cols = [c for c in headline if any(c in m for m in per_model.values())] + tasks
    lines += ["| model | " + " | ".join(c.split("/", 1)[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in per_model.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    lines += ["", "recall/niah: fraction correct (RULER-style string match); overall: mean over recall tasks; "
              "ruler: mean over RULER's offline tasks; perplexity and kl (KL(teacher ‖ model) per token) "
              "on the text the run's data split held out from distillation.", ""]
    lines += [f"**Note:** {note}" for note in comp["notes"]] + ([""] if comp["notes"] else [])
    if comp["files"].get("plot"):
        lines.append(f"![recall by model]({REPORT_DIR}/comparison/{Path(comp['files']['plot']).name})")
    for name, d in dirs.items():
        if "niah" in ((read_json(d / "results.json") or {}).get("suites") or []) and (d / "niah.png").is_file():
            lines.append(f"![NIAH {name}]({_copy_plot(d / 'niah.png', report_dir, f'niah-{name}.png')})")
    efficiency = {name: res["efficiency"] for name, d in dirs.items() if (res := read_json(d / "results.json") or {}).get("efficiency")}
    if efficiency:
        lines += [""] + efficiency_table(efficiency)
    return lines + [""]


def efficiency_table(sections: dict[str, dict]) -> list[str]:
    """Decode tokens/s per (context, batch) of each model, with its speed-up and cache ratio against the
    teacher measured beside it in the same evaluation (``efficiency`` sections of results.json)."""

    def own_rows(eff):
        return {(r["context"], r["batch"]): r for r in eff["rows"] if r["model"] == eff.get("model") and not r.get("oom")}

    def baseline_rows(eff):
        base = eff.get("baseline")
        return {(r["context"], r["batch"]): r for r in eff["rows"] if base and r["model"] == base and not r.get("oom")}

    points = sorted({p for eff in sections.values() for p in own_rows(eff)})
    head = "| model | " + " | ".join(f"{c} × {b}: tok/s (× teacher), cache (/ teacher)" for c, b in points) + " |"
    lines = ["### Inference efficiency", "",
             "Decode tokens/s through `StaticDecoder`, and the cache; in brackets against the teacher measured beside "
             "each model in the same process.", "", head, "|---|" + "---:|" * len(points)]
    for name, eff in sections.items():
        own, base = own_rows(eff), baseline_rows(eff)
        cells = []
        for p in points:
            r, b = own.get(p), base.get(p)
            if r is None:
                cells.append("–")
                continue
            cell = f"{r['decode_tokens_per_s']:,.0f}"
            cell += f" ({r['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x)" if b else ""
            cell += f", {r['cache_gib']:.3g} GiB" + (f" ({r['cache_gib'] / b['cache_gib']:.0%})" if b and b["cache_gib"] else "")
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def selector_budget_table(run_dir: str | Path, selectors: list[str], metric: str = "recall/overall") -> dict[str, Any]:
    """``metric`` of the final hybrid each (selector, budget) chose, in the paper's layout (rows: selectors,
    columns: budgets): ``{"budgets": [labels], "rows": {selector: {label: {"layers", "model", "models", "value",
    "values"}}}}``.
    A budget with several sets (``random``) has the mean as ``value`` and every set's in ``values``."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    state = read_json(layout.state) or {}
    linear = ((state.get("config") or {}).get("student") or {}).get("linear", "gdn")
    labels: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    degenerate: dict[str, str] = {}
    for selector in selectors:
        path = layout.selection.selection_file(selector)
        if not path.is_file():
            continue
        sel = SelectionResult.load(path)
        if sel.degenerate:  # it chose nothing: its task does not rank layers on this teacher
            rows[selector], degenerate[selector] = {}, sel.degenerate
        for label, entry in sel.budgets.items():
            labels += [label] if label not in labels else []
            names = [hybrid_name(sorted(s), linear) for s in entry.sets]
            results = [read_json(layout.eval(name) / "results.json") for name in names]
            values = [flat_metrics(r).get(metric) if r else None for r in results]
            known = [v for v in values if v is not None]
            rows.setdefault(selector, {})[label] = {
                "layers": sorted(entry.layers), "model": names[0], "models": names, "values": values,
                "value": (sum(known) / len(known) if known else None) if len(values) > 1 else values[0]}
    return {"metric": metric, "budgets": labels, "rows": rows, "degenerate": degenerate}


def _selector_table_section(run_dir: Path, selectors: list[str]) -> list[str]:
    lines = []
    for metric, title in (("recall/overall", "recall"), ("niah/mean", "NIAH"), ("quality/kl", "held-out KL")):
        table = selector_budget_table(run_dir, selectors, metric)
        if not any(c["value"] is not None for r in table["rows"].values() for c in r.values()):
            continue
        random_row = table["rows"].get("random", {})
        lines += [f"### {title} by selector and budget", "", "| selector | " + " | ".join(table["budgets"]) + " |",
                  "|---|" + "---:|" * len(table["budgets"])]
        for selector, row in table["rows"].items():
            cells = []
            for b in table["budgets"]:
                cell = row.get(b)
                if cell is None:
                    cells.append("–")
                elif selector == "random":
                    known = [v for v in cell["values"] if v is not None]
                    spread = f" [{min(known):.3f}, {max(known):.3f}] of {len(known)} sets" if known else ""
                    cells.append(_fmt(cell["value"]) + spread)
                else:
                    rank = _null_percentile(cell["value"], (random_row.get(b) or {}).get("values"), lower_is_better=metric == "quality/kl")
                    cells.append(_fmt(cell["value"]) + f" `{cell['layers']}`" + (f" ({rank} of random sets)" if rank else ""))
            lines.append(f"| {selector} | " + " | ".join(cells) + " |")
        lines.append("")
        if table["degenerate"]:
            lines += [f"{selector}: no sets — {reason}" for selector, reason in table["degenerate"].items()] + [""]
    return lines


def _null_percentile(value: float | None, random_values: list | None, lower_is_better: bool) -> str | None:
    """Where ``value`` stands among the random sets' values: 'better than 2/3'."""
    known = [v for v in random_values or [] if v is not None]
    if value is None or not known:
        return None
    beaten = sum((value < v) if lower_is_better else (value > v) for v in known)
    return f"better than {beaten}/{len(known)}"


def _export_section(state: dict) -> list[str]:
    export = state["stages"].get("export") or {}
    if not export.get("models"):
        return []
    lines = ["## Exports", "", f"Every final hybrid as stock Hugging Face `{export['format']}` (loads without remote code; "
             "serving: docs/serving.md). Logit error: max |student − export| of fp32 logits on the export's check input.", "",
             "| model | folder | exact | dtype | max logit error (largest logit) |", "|---|---|---|---|---:|"]
    for name, e in export["models"].items():
        error = "–" if e.get("max_logit_error") is None else f"{e['max_logit_error']:.2g} ({e['max_logit']:.3g})"
        lines.append(f"| `{name}` | `{e['path']}` | {'yes' if e['exact'] else 'APPROXIMATE'} | {e['dtype']} | {error} |")
    return lines + [""]


def report_markdown(run_dir: str | Path, config=None) -> str:
    """The report as Markdown (plots copied into ``run_dir/report/``)."""
    import yaml

    run_dir = Path(run_dir)
    state = read_json(RunLayout(run_dir).state) or {"stages": {}}
    if config is None:
        if "config" not in state:
            raise FileNotFoundError(
                f"{run_dir} is not a hybrid-distill run directory (no {RunLayout(run_dir).state.name} with the run's config); "
                "give the run_dir of a `hybrid-distill run`"
            )

        config = RunConfig.from_dict(state["config"], check_paths=False)
    report_dir = run_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    layout = RunLayout(run_dir)
    title = config.report.title or f"hybrid-distill run: {config.teacher}"
    lines = [f"# {title}", "", f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from `{run_dir}`.", ""]
    lines += ["## Cost per stage", "",
              "Time: training or evaluation time summed over the stage's models, including those trained or evaluated by an "
              "earlier invocation (resumed, or before sets were added); the selection stage's is the wall time of the "
              "invocation that finished it.", "",
              "| stage | time | tokens |", "|---|---:|---:|"]
    total_t = total_tok = 0.0
    for stage, entry in state["stages"].items():
        if stage == "report":
            continue
        t, tok = entry.get("compute_time_s", entry.get("wall_time_s")), entry.get("tokens")
        total_t += t or 0
        total_tok += tok or 0
        lines.append(f"| {stage} | {_fmt_time(t)} | {_fmt_tokens(tok)} |")
    lines += [f"| **total** | {_fmt_time(total_t)} | {_fmt_tokens(total_tok)} |", ""]
    lines += _selection_section(layout, report_dir, config.selectors)
    final = (state["stages"].get("final") or {}).get("models") or {}
    if final:
        lines += ["## Final hybrids", "", "| model | softmax layers | chosen by | Stage-2 tokens | held-out |", "|---|---|---|---:|---|"]
        for name, m in final.items():
            chosen = ", ".join(f"{c['selector']} {c['budget']}" for c in m["chosen_by"])
            ev = ", ".join(f"{k} {_fmt(v)}" for k, v in (m.get("eval") or {}).items())
            lines.append(f"| `{name}` | `{m['layers']}` | {chosen} | {_fmt_tokens(m['tokens'])} | {ev} |")
        fs = config.final.stage2
        lines += ["", f"_held-out_: the trainer's end-of-stage measure, on at most {fs.eval_max_batches} batches of its "
                  f"held-out split (`final.stage2.eval_max_batches`); the Evaluation section scores "
                  f"{config.eval.quality_sequences} held-out sequences of {config.eval.quality_seq_len} tokens "
                  "(`eval.quality_sequences`, `eval.quality_seq_len`), so the two KLs differ by sample.", ""]
    lines += _export_section(state)
    models = eval_models(config, layout) if layout.selection.root.is_dir() else {}
    lines += _eval_section(run_dir, report_dir, models)
    lines += _selector_table_section(run_dir, config.selectors)
    lines += ["## Settings", "", "```yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def markdown_to_html(text: str, title: str) -> str:
    import markdown

    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
             "th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}code{background:#f5f5f5;padding:0 3px}")
    return f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>\n<body>\n{body}\n</body></html>\n"


def write_report(run_dir: str | Path, config=None) -> list[Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    text = report_markdown(run_dir, config)
    title = text.splitlines()[0].lstrip("# ")
    md = atomic_write_text(run_dir / "report.md", text)
    html = atomic_write_text(run_dir / "report.html", markdown_to_html(text, title))
    return [md, html]


__all__ = ["markdown_to_html", "report_markdown", "write_report"]
