"""One-call evaluation of a model: recall tasks, NIAH grid, LM quality and inference efficiency ->
results.json + summary.md.

::

    evaluate_model(model, tokenizer, "eval/student", suite=["recall", "niah", "quality"],
                   lengths=(1024, 4096), num_samples=20, teacher=teacher)

CLI (``hybrid-distill eval``): :func:`add_eval_arguments` + :func:`run_eval_from_args`.

``results.json``: ``{"model", "suites", "config", "recall": {"predictions", "aggregate",
"skipped"}, "niah": {"predictions", "table", "mean"}, "quality": {...}, "efficiency": {"rows",
"baseline", "fits", ...}, "timings"}`` (only the parts that ran). Files are written atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_student
from ..config import add_flags, flag_values
from ..data import add_data_flags, data_config_from_flags, read_haystack
from ..fileio import atomic_write, atomic_write_text, jsonable, read_json
from ..surgery import (
    load_teacher,
    load_tokenizer,  # re-exported for the CLI and the lm-eval bridge
)
from ..tasks import (
    DEFAULT_RECALL_TASKS,
    RULER_OFFLINE_TASKS,
    LengthError,
    generate_samples,
)
from .config import MODEL_DTYPES, SUITES, EvalConfig
from .efficiency import (
    EfficiencyResult,
    efficiency_markdown,
    plot_efficiency,
    run_efficiency,
)
from .niah import niah_grid_samples, niah_table, plot_niah_heatmap
from .quality import as_data_spec, evaluate_quality, heldout_batches
from .runner import run_samples
from .scoring import aggregate

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------
# Evaluation


def evaluation_seconds(results: dict) -> float:
    """Time an evaluation spent on its suites (recall, NIAH, quality), from its ``results.json`` content."""
    return sum((results.get("timings") or {}).values())


def _model_name(model, given: str | None) -> str:
    if given:
        return given
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else type(model).__name__


def format_metric(x: Any, digits: int = 3) -> str:
    """A metric for a Markdown table: ``digits`` decimals for floats, "–" for missing or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


# Samples depend only on the tokenizer and the generation arguments: made once per tokenizer object
# when one process evaluates many models (a pipeline's teacher, all-linear student and hybrids).
_SAMPLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_samples(tokenizer, key: tuple, make, *args, **kwargs):
    """``make(*args, **kwargs)``, remembered under ``key`` for ``tokenizer`` (not with a caller's haystack)."""
    if kwargs.get("haystack") is not None:
        return make(*args, **kwargs)
    try:
        per_tokenizer = _SAMPLES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        return make(*args, **kwargs)
    if key not in per_tokenizer:
        per_tokenizer[key] = make(*args, **kwargs)
    return per_tokenizer[key]


def _prediction_record(sample, pred) -> dict[str, Any]:
    rec = pred.to_dict()
    rec["metric"] = sample.metric
    rec["max_new_tokens"] = sample.max_new_tokens
    rec["metadata"] = jsonable(sample.metadata)
    return rec


def run_recall(model, tokenizer, tasks: Sequence[str], lengths: Sequence[int], num_samples: int, *, seed: int = 0,
               batch_size: int = 8, haystack: Any = None, task_options: dict | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Generate, run and score ``num_samples`` samples per (task, length); lengths too short for a
    task are skipped (listed under ``skipped``)."""
    samples, skipped = [], []
    for task in tasks:
        opts = dict((task_options or {}).get(task, {}))
        for length in lengths:
            try:
                key = ("recall", task, int(length), num_samples, seed, repr(sorted(opts.items())))
                samples += _cached_samples(tokenizer, key, generate_samples, task, tokenizer, int(length), num_samples,
                                           seed=seed, haystack=read_haystack(haystack), **opts)
            except LengthError as err:
                skipped.append({"task": task, "length": int(length), "reason": str(err)})
    preds = run_samples(model, tokenizer, samples, batch_size=batch_size, progress=progress) if samples else []
    records = [_prediction_record(s, p) for s, p in zip(samples, preds)]
    agg = aggregate(records, ruler_tasks=RULER_OFFLINE_TASKS) if records else {}
    return {"predictions": records, "aggregate": agg, "skipped": skipped}


def cached_niah_samples(tokenizer, lengths: Sequence[int], depths: Sequence[float], num_samples: int, *, seed: int = 0,
                 haystack: Any = None, max_new_tokens: int = 32) -> list:
    """The NIAH grid's samples, made once per tokenizer and settings (`_cached_samples`)."""
    key = ("niah", tuple(lengths), tuple(depths), num_samples, seed, max_new_tokens)
    return _cached_samples(tokenizer, key, niah_grid_samples, tokenizer, lengths, depths, num_samples=num_samples,
                           seed=seed, haystack=haystack, max_new_tokens=max_new_tokens)


def run_niah(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], num_samples: int, *, seed: int = 0,
             batch_size: int = 8, haystack: Any = None, max_new_tokens: int = 32,
             progress: bool = False) -> dict[str, Any]:
    """NIAH grid over ``lengths`` x ``depths`` (``num_samples`` each): predictions, per-cell table, mean."""
    samples = cached_niah_samples(tokenizer, lengths, depths, num_samples, seed=seed, haystack=haystack,
                                  max_new_tokens=max_new_tokens)
    preds = run_samples(model, tokenizer, samples, batch_size=batch_size, progress=progress)
    table = niah_table((s, p.score) for s, p in zip(samples, preds))
    records = [_prediction_record(s, p) for s, p in zip(samples, preds)]
    for r, s in zip(records, samples):
        r["depth"] = float(s.metadata["depth"])
    return {
        "predictions": records,
        "table": [{"depth": d, "length": n, "score": v} for (d, n), v in table.items()],
        "mean": sum(table.values()) / len(table) if table else math.nan,
    }


def evaluate_model(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    config: EvalConfig | None = None,
    *,
    teacher=None,
    corpus: Any = "default",
    cache_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    progress: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """Run the suites of ``config`` (an `EvalConfig`; ``fields`` build one, or replace some of its fields) and
    write ``out_dir/results.json``, ``out_dir/summary.md`` (and ``niah.png`` for NIAH, ``efficiency.png`` for
    efficiency).

    recall: ``tasks`` (default ``DEFAULT_RECALL_TASKS``) x ``lengths``, ``num_samples`` each.
    niah: ``niah_lengths`` (default ``lengths``) x ``niah_depths``, ``niah_samples`` per cell. quality:
    held-out perplexity on ``corpus`` (a source, or a `DataConfig` such as a distillation run's data, whose
    held-out split it then uses; ``quality_sequences`` sequences of ``quality_seq_len`` tokens) and, with
    ``teacher``, the teacher's perplexity and KL(teacher || model). efficiency: prefill latency, decode time
    per step, cache and peak memory (`run_efficiency`) at ``efficiency_lengths`` x ``efficiency_batches``,
    with ``teacher`` measured beside the model as the baseline of speed-ups.
    Returns the results dict (as written to results.json).
    """
    config = (config or EvalConfig()).replace(**fields) if fields else (config or EvalConfig())
    suite, lengths, seed, batch_size, haystack = config.suite, config.lengths, config.seed, config.batch_size, config.haystack
    num_samples, niah_depths, niah_samples = config.num_samples, config.niah_depths, config.niah_samples
    parts = list(suite)
    if "quality" in parts:
        data_spec = as_data_spec(corpus, cache_dir=cache_dir)
    tasks = list(config.tasks or DEFAULT_RECALL_TASKS)
    niah_lengths = config.niah_grid_lengths
    if "niah" in parts:  # its samples first, so a length too short fails before hours of other suites
        cached_niah_samples(tokenizer, niah_lengths, niah_depths, niah_samples, seed=seed, haystack=haystack)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lost = sorted(set((read_json(out / "results.json") or {}).get("suites") or []) - set(parts))
    if lost:
        logger.warning("%s holds results of suite(s) %s that this evaluation replaces; give --out another folder to "
                       "keep both", out, ", ".join(lost))
    for part, plot in (("niah", "niah.png"), ("efficiency", "efficiency.png")):
        if part not in parts:  # an earlier evaluation's plot in this folder would pass for this one's
            (out / plot).unlink(missing_ok=True)
    results: dict[str, Any] = {
        "model": _model_name(model, model_name),
        "suites": parts,
        "config": {
            "tasks": tasks if "recall" in parts else None,
            "lengths": lengths,
            "num_samples": num_samples,
            "niah_lengths": niah_lengths if "niah" in parts else None,
            "niah_depths": [float(d) for d in niah_depths] if "niah" in parts else None,
            "niah_samples": niah_samples,
            "seed": seed,
            "batch_size": batch_size,
            "corpus": data_spec.source if "quality" in parts else None,
            "data": data_spec.to_dict() if "quality" in parts else None,
            "teacher": _model_name(teacher, None) if teacher is not None else None,
            "efficiency_lengths": config.efficiency_contexts if "efficiency" in parts else None,
            "efficiency_batches": config.efficiency_batches if "efficiency" in parts else None,
        },
        "timings": {},
    }

    def save_partial() -> None:
        """results.json after each suite (``partial``: the suites still to run), so a failure keeps finished work."""
        todo = [p for p in parts if p not in results]
        atomic_write_text(out / "results.json", json.dumps(jsonable({**results, "partial": todo}), indent=1) + "\n")

    if "recall" in parts:
        t0 = time.perf_counter()
        results["recall"] = run_recall(model, tokenizer, tasks, lengths, num_samples, seed=seed, batch_size=batch_size,
                                       haystack=haystack, task_options=config.task_options, progress=progress)
        results["timings"]["recall_s"] = time.perf_counter() - t0
        save_partial()
    if "niah" in parts:
        t0 = time.perf_counter()
        results["niah"] = run_niah(model, tokenizer, niah_lengths, niah_depths, niah_samples, seed=seed,
                                   batch_size=batch_size, haystack=haystack, progress=progress)
        results["timings"]["niah_s"] = time.perf_counter() - t0
        save_partial()
    if "quality" in parts:
        t0 = time.perf_counter()
        batches = heldout_batches(tokenizer, data_spec, seq_len=config.quality_seq_len, batch_size=max(1, batch_size // 2),
                                  max_sequences=config.quality_sequences)
        q = evaluate_quality(model, batches, teacher=teacher)
        q.update(corpus=data_spec.source, heldout_fraction=data_spec.heldout_fraction, seq_len=config.quality_seq_len,
                 sequences=sum(b.shape[0] for b in batches))
        results["quality"] = q
        results["timings"]["quality_s"] = time.perf_counter() - t0
        save_partial()
    if "efficiency" in parts:
        t0 = time.perf_counter()
        results["efficiency"] = run_efficiency(
            model, results["config"]["efficiency_lengths"], results["config"]["efficiency_batches"], teacher=teacher,
            model_name=results["model"] if results["model"] != "teacher" else "model", decode_steps=config.decode_steps,
            compile=config.compile_decode, prefill_rows=config.prefill_rows, dtype=config.efficiency_dtype, progress=progress,
        )
        results["timings"]["efficiency_s"] = time.perf_counter() - t0

    results = jsonable(results)
    if "niah" in parts and results["niah"]["table"]:
        table = {(r["depth"], r["length"]): r["score"] for r in results["niah"]["table"]}
        atomic_write(out / "niah.png", lambda tmp: plot_niah_heatmap(table, tmp, title=f"NIAH: {results['model']}"))
    if "efficiency" in parts:
        eff = results["efficiency"]
        rows = [EfficiencyResult.from_dict(r) for r in eff["rows"]]
        batch = max(results["config"]["efficiency_batches"])
        atomic_write(out / "efficiency.png", lambda tmp: plot_efficiency(rows, tmp, batch=batch, baseline=eff["baseline"]))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, sort_keys=False) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(results))
    return results


# ---------------------------------------------------------------------------------------
# Markdown


def recall_table_markdown(agg: dict[str, Any]) -> str:
    """Task x length table (+ per-task mean column and per-length mean row) from an ``aggregate`` dict."""
    ptl = agg.get("per_task_length", {})
    lengths = sorted({int(n) for by_len in ptl.values() for n in by_len})
    head = "| task | " + " | ".join(str(n) for n in lengths) + " | mean |"
    rows = [head, "|" + "---|" * (len(lengths) + 2)]
    for task, by_len in ptl.items():
        by_len = {int(k): v for k, v in by_len.items()}
        cells = [format_metric(by_len.get(n)) for n in lengths]
        rows.append(f"| {task} | " + " | ".join(cells) + f" | {format_metric(agg['per_task'].get(task))} |")
    per_len = {int(k): v for k, v in agg.get("per_length", {}).items()}
    rows.append("| **mean** | " + " | ".join(format_metric(per_len.get(n)) for n in lengths) + f" | {format_metric(agg.get('overall'))} |")
    return "\n".join(rows)


def niah_table_markdown(table: list[dict[str, Any]]) -> str:
    depths = sorted({float(r["depth"]) for r in table})
    lengths = sorted({int(r["length"]) for r in table})
    cell = {(float(r["depth"]), int(r["length"])): r["score"] for r in table}
    rows = ["| depth % | " + " | ".join(str(n) for n in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
    for d in depths:
        rows.append(f"| {d:g} | " + " | ".join(format_metric(cell.get((d, n))) for n in lengths) + " |")
    return "\n".join(rows)


def summary_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Evaluation: {results.get('model')}", ""]
    cfg = results.get("config", {})
    lines.append(f"Suites: {', '.join(results.get('suites', []))}; seed {cfg.get('seed')}.")
    lines.append("")
    if "recall" in results:
        rec = results["recall"]
        lines += ["## Recall", "",
                  f"Mean score per task and length ({cfg.get('num_samples')} samples per cell).", ""]
        if rec.get("aggregate"):
            lines += [recall_table_markdown(rec["aggregate"]), ""]
            agg = rec["aggregate"]
            lines += [f"Overall (mean over tasks, each the mean of its lengths): **{format_metric(agg.get('overall'))}**", ""]
            if agg.get("ruler_tasks"):
                lines += [f"RULER's offline tasks ({', '.join(agg['ruler_tasks'])}): **{format_metric(agg.get('ruler'))}**; "
                          "the other tasks are stand-ins (prose haystacks) or not RULER's.", ""]
        else:
            lines += ["No samples were run.", ""]
        for s in rec.get("skipped", []):
            lines.append(f"- skipped {s['task']} at {s['length']}: {s['reason']}")
        if rec.get("skipped"):
            lines.append("")
    if "niah" in results:
        n = results["niah"]
        lines += ["## Needle in a haystack", "", niah_table_markdown(n["table"]) if n["table"] else "No cells.", "",
                  f"Mean over cells: **{format_metric(n.get('mean'))}**", "", "![NIAH heatmap](niah.png)", ""]
    if "quality" in results:
        q = results["quality"]
        lines += ["## Language-model quality", "",
                  f"Held-out `{q.get('corpus')}`{_heldout_share(q)}: {q.get('sequences')} sequences x {q.get('seq_len')} tokens "
                  f"({q.get('tokens')} predicted tokens).", "",
                  "| metric | value |", "|---|---|",
                  f"| NLL (nats/token) | {format_metric(q.get('nll'), 4)} |",
                  f"| perplexity | {format_metric(q.get('perplexity'), 3)} |"]
        if "kl" in q:
            lines += [f"| teacher NLL | {format_metric(q.get('teacher_nll'), 4)} |",
                      f"| teacher perplexity | {format_metric(q.get('teacher_perplexity'), 3)} |",
                      f"| KL(teacher ‖ model) (nats/token) | {format_metric(q.get('kl'), 5)} |"]
        lines.append("")
    if "efficiency" in results:
        eff = results["efficiency"]
        lines += ["## Inference efficiency", "",
                  f"{eff.get('device')}, {eff.get('dtype')}: prefill of random prompts, then {eff.get('decode_steps')} "
                  "greedy decode steps through `StaticDecoder` (static KV buffers, the linear mixers' own kernels"
                  + (", compiled step" if eff.get("compile") else "") + "); min read = the least bytes a step must read."
                  + (f" Speed-ups against the {eff['baseline']}, measured in the same process." if eff.get("baseline") else ""),
                  "", efficiency_markdown(eff), "![efficiency](efficiency.png)", ""]
    t = results.get("timings", {})
    if t:
        lines += ["Timings: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items()), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Loading and CLI


def load_model(spec: str, dtype=None, device=None):
    """A model from ``tiny:<variant>`` (random tiny teacher), a saved hybrid student or any HF causal LM dir."""
    # By config.json alone: a teacher may be stored as pytorch_model.bin, which the student loader refuses.
    config_file, model_type = Path(spec) / "config.json", ""
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
        model_type = str(config.get("model_type", "")) if isinstance(config, dict) else ""
    if model_type.startswith("hybrid_"):
        model = load_student(spec, dtype=dtype, device=device)
    else:
        model = load_teacher(spec, dtype=dtype, device=device)
    return model.eval()


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``hybrid-distill eval`` (then ``parser.set_defaults(func=run_eval_from_args)``)."""
    parser.add_argument("--model", required=True, help="saved student / HF causal LM dir, or tiny:<variant>")
    parser.add_argument("--out", help="output directory (default: eval/<last three parts of the model path>)")
    parser.add_argument("--teacher", help="teacher (path or tiny:<variant>): KL in the quality suite, baseline of efficiency")
    parser.add_argument("--tokenizer", help="tokenizer path / hub id, or 'tiny' (default: the model's)")
    parser.add_argument("--config", default=None, help="YAML/JSON file of EvalConfig fields (flags given override it)")
    parser.add_argument("--device", help="e.g. cuda, cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, help="model dtype")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    add_flags(parser, EvalConfig, prefix="eval_", title="evaluation (EvalConfig fields)")
    add_data_flags(parser, aliases={"source": ("--corpus",), "cache_dir": ("--cache-dir",)},
                   title="quality suite: the held-out text (use the distillation run's data options to score on its held-out split)")
    return parser


def _heldout_share(quality: dict) -> str:
    share = quality.get("heldout_fraction")
    return "" if share is None else f" (the {share:.3g} of its text held out by content hash)"


def default_eval_name(model_spec: str) -> str:
    """Folder name for a model's results: its last path parts joined, so that runs/a/stage2/final and
    runs/a/final/models/x do not both land in eval/final."""
    if model_spec.startswith("tiny:"):
        return model_spec.replace("tiny:", "tiny-")
    parts = [p for p in Path(model_spec).expanduser().resolve().parts if p not in ("/", "\\")]
    return "-".join(parts[-3:]) or "model"


def run_eval_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``hybrid-distill eval``; prints the summary and returns 0."""
    ns = vars(args)
    flags = flag_values(ns, EvalConfig, prefix="eval_")
    config = EvalConfig.from_file(args.config, **flags) if args.config else EvalConfig.from_dict(flags)
    data = data_config_from_flags(ns)  # bad options fail before any model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    model = load_model(args.model, dtype=dtype, device=device)
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    teacher = load_model(args.teacher, dtype=dtype, device=device) if args.teacher else None
    out = args.out or str(Path("eval") / default_eval_name(args.model))
    results = evaluate_model(model, tokenizer, out, config, teacher=teacher, corpus=data, model_name=args.model,
                             progress=args.progress)
    print(summary_markdown(results))
    print(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'summary.md'}", file=sys.stderr)
    return 0


__all__ = [
    "SUITES",
    "add_eval_arguments",
    "atomic_write_text",
    "evaluate_model",
    "load_model",
    "load_tokenizer",
    "niah_table_markdown",
    "recall_table_markdown",
    "run_eval_from_args",
    "run_niah",
    "run_recall",
    "summary_markdown",
]
