"""The `hybrid-distill` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from .checkpoint import CheckpointError, save_student, verify_checkpoint
from .config import ConfigError, parse_json
from .cuda_allocator import prefer_expandable_segments
from .distill.recipe import add_distill_arguments, run_distill_from_args
from .errors import TIME_LIMIT_EXIT_CODE, HybridDistillError, TimeLimitReached
from .evaluation.compare import compare_results
from .evaluation.lm_eval_bridge import add_lm_eval_arguments, run_lm_eval_from_args
from .evaluation.suite import add_eval_arguments, run_eval_from_args
from .export import export_student
from .fileio import DISK_FULL_ERRNOS, check_output_folder
from .pipeline import RunConfig, plan_run, run_pipeline, write_report
from .pipeline.budget import SAFETY_FACTOR, time_limit_seconds
from .pipeline.endpoint import DEFAULT_BASELINES
from .pipeline.outcome import outcome, write_outcome
from .pipeline.plan import plan_markdown
from .pipeline.run import STAGES
from .selection.recipe import (
    add_replay_arguments,
    add_select_arguments,
    run_replay_from_args,
    run_select_from_args,
)
from .surgery import build_student, load_teacher, resolve_mixers


def cmd_convert(args) -> int:
    """Build a student from a teacher (attention-weight transfer) and save it as an HF checkpoint."""
    teacher = load_teacher(args.teacher)
    mixers = resolve_mixers(teacher.config.num_hidden_layers, args.mixers, args.softmax_layers, args.linear)
    options = args.mixer_options
    student = build_student(teacher, mixers, options)
    tokenizer = None
    if not args.teacher.startswith("tiny:"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        except (OSError, ValueError):
            print(f"note: no tokenizer found at {args.teacher}; saving the model only", file=sys.stderr)
    save_student(student, args.out, tokenizer=tokenizer)
    print(f"saved {describe_layout(student.config)} to {args.out}")
    return 0


def describe_layout(config) -> str:
    counts = Counter(config.mixers)
    parts = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return f"{config.num_hidden_layers}-layer {config.model_type} student ({parts})"


def cmd_inspect(args) -> int:
    """Print a checkpoint's layer layout, mixer options and teacher."""
    config = verify_checkpoint(args.checkpoint)
    mixers = config.get("mixers")
    if mixers is None:
        print(f"{args.checkpoint}: a {config.get('model_type')} model (not a hybrid student), {config.get('num_hidden_layers')} layers")
        return 0
    layers = config.get("num_hidden_layers")
    if not isinstance(mixers, list) or (layers is not None and len(mixers) != layers):
        raise CheckpointError(f"{args.checkpoint}/config.json is inconsistent: its mixers {mixers!r} do not list one mixer "
                         f"for each of its {layers} layers")
    info = {
        "model_type": config["model_type"],
        "teacher": config.get("teacher", {}),
        "num_layers": len(mixers),
        "softmax_layers": [i for i, m in enumerate(mixers) if m == "softmax"],
        "mixer_counts": dict(Counter(mixers)),
        "mixer_options": config.get("mixer_options", {}),
    }
    if args.json:
        print(json.dumps({**info, "mixers": mixers}, indent=2))
        return 0
    symbols = {"softmax": "S", "gdn": "g", "gla": "l", "swa": "w"}
    print(f"{args.checkpoint}: {info['model_type']} from {info['teacher'].get('name_or_path') or info['teacher'].get('model_type')}")
    print("layers: " + "".join(symbols.get(m, "?") for m in mixers) + "   (S softmax, g gdn, l gla, w swa)")
    print(f"softmax layers: {info['softmax_layers']}  counts: {info['mixer_counts']}")
    print("mixer options: " + ", ".join(f"{k}={v}" for k, v in info["mixer_options"].items()))
    return 0


def cmd_export(args) -> int:
    """Write a student as a stock Hugging Face model that loads (and serves) without remote code."""
    result = export_student(args.student_dir, args.out_dir, format=args.format, approximate=args.approximate,
                            dtype=args.dtype, tokenizer=args.tokenizer)
    print(result.summary())
    return 0


def cmd_distill(args) -> int:
    """Distill a student (Stage 1/2/3) into a run directory; resumes an interrupted run."""
    result = run_distill_from_args(args)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items()}, indent=2, default=str))
    return 0


def refuse_torchrun(command: str) -> None:
    """``run`` and ``select`` drive whole stages themselves (one process; candidates fan out through executors)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise HybridDistillError(
            f"`hybrid-distill {command}` runs as one process (layer-scoring candidates fan out to GPUs through its "
            "executors: local, ray, slurm); start it without torchrun. Under torchrun, use `hybrid-distill distill` "
            "for one sharded stage at a time"
        )


def cmd_run(args) -> int:
    """Run the whole pipeline from a YAML config (skipping finished stages), or print its plan."""
    if not args.dry_run:
        refuse_torchrun("run")
    config = RunConfig.from_file(args.config, overrides={"run_dir": args.run_dir})
    if args.dry_run:
        print(plan_markdown(plan_run(config)))
        return 0
    check_output_folder(config.run_dir, "run_dir")
    stages = None if args.stages is None else tuple(s.strip() for s in args.stages.split(",") if s.strip())
    try:
        state = run_pipeline(config, progress=not args.no_progress, time_limit=args.time_limit,
                             **({} if stages is None else {"stages": stages}))
    except TimeLimitReached as stop:
        print(f"hybrid-distill run: {stop}", file=sys.stderr)
        return TIME_LIMIT_EXIT_CODE
    print(f"done: {config.run_dir}/report.md" if "report" in state["stages"] else f"done: {config.run_dir}")
    return 0


def cmd_select(args) -> int:
    """Score layers with one selector and write its selection.json (+ plots)."""
    refuse_torchrun("select")
    return run_select_from_args(args)


def cmd_compare(args) -> int:
    """Put several `hybrid-distill eval` results side by side (comparison.md / .json / .png)."""
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    comp = compare_results(args.results, args.out, names=names)
    print((Path(args.out) / "comparison.md").read_text())
    for path in comp["files"].values():
        print(path)
    return 0


def cmd_report(args) -> int:
    """Rebuild report.md / report.html of a run directory."""
    for path in write_report(args.run_dir):
        print(path)
    return 0


def cmd_outcome(args) -> int:
    """The outcome over run folders (one per distillation seed): outcome.md and outcome.json in --out."""
    check_output_folder(args.out, "--out")
    result = outcome(args.run_dirs, primary=args.primary, baselines=args.baselines, budgets=args.budgets,
                     tasks=args.tasks, lengths=args.lengths, resamples=args.resamples, seed=args.seed)
    print(result.summary())
    for path in write_outcome(result, args.out):
        print(path)
    return 0


def comma_list(text: str) -> list[str]:
    """A comma-separated option's values (argparse names the flag when there are none)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one value, comma-separated")
    return values


def comma_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def parse_time_limit(text: str) -> float:
    """``--time-limit``'s value: seconds > 0 (argparse names the flag in its error)."""
    try:
        return time_limit_seconds(text, "--time-limit")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(err.reason) from None


RUN_EXIT_CODES = (f"exit status: 0 done; 2 an error (bad settings or files, out of memory, disk full); "
                  f"{TIME_LIMIT_EXIT_CODE} stopped at --time-limit (EX_TEMPFAIL: run the same command again to "
                  "continue); 130 interrupted")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-distill", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print the full traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole pipeline from a YAML config ('default': the embedded offline demo)",
                       epilog=RUN_EXIT_CODES)
    p.add_argument("config", help="YAML run config, or 'default'")
    p.add_argument("--run-dir", default=None, help="overrides the config's run_dir")
    p.add_argument("--dry-run", action="store_true", help="print the stages, token budgets and a compute estimate")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--time-limit", type=parse_time_limit, default=None, metavar="SECONDS",
                   help="stop before a unit of work (a stage's training, a candidate family, a final hybrid with its "
                        "evaluation, an evaluation) that is not estimated to finish within SECONDS of the command's "
                        f"start (its estimate from this run's measured times, x {SAFETY_FACTOR}), and checkpoint "
                        f"training still running then; exits with {TIME_LIMIT_EXIT_CODE}; running it again continues. "
                        "Not a setting (--dry-run ignores it)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild a run's report.md / report.html")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("convert", help="teacher -> hybrid student checkpoint (weight transfer, no training)")
    p.add_argument("--teacher", required=True, help="HF path / hub id, or tiny:<variant> for a built-in test teacher")
    p.add_argument("--out", required=True, help="output directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--mixers", help="comma-separated mixer per layer (softmax, gdn, gla, swa)")
    group.add_argument("--softmax-layers", help="comma-separated 0-based layers to keep softmax; others --linear")
    p.add_argument("--linear", default="gdn", help="linear mixer for non-softmax layers (default gdn)")
    p.add_argument("--mixer-options", type=parse_json, help='JSON, e.g. \'{"gdn_use_short_conv": true}\'')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("distill", help="run one distillation stage (1: attention alignment, 2: KL, 3: fine-tune)")
    add_distill_arguments(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("select", help="choose the softmax layers (GA-S2 or a baseline selector) for given budgets")
    add_select_arguments(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("replay", help="what early stopping / racing would have cost and chosen, from a full selection run")
    add_replay_arguments(p)
    p.set_defaults(func=run_replay_from_args)

    p = sub.add_parser("eval", help="recall suite / NIAH grid / perplexity and KL of a model; JSON + Markdown report")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval_from_args)

    p = sub.add_parser("compare", help="several eval results side by side: Markdown table, JSON and bar plots")
    p.add_argument("results", nargs="+", help="folders written by `hybrid-distill eval` (each holds results.json)")
    p.add_argument("--out", default="eval/compare", help="output folder (default: eval/compare)")
    p.add_argument("--names", help="comma-separated column names (default: each run's model name)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("outcome", help="does selection beat the other placements: the paper's table with intervals, "
                                       "the endpoint per budget, selection diagnostics, over run folders")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="`hybrid-distill run` folders, one per distillation "
                   "seed (paired by position)")
    p.add_argument("--out", required=True, help="folder for outcome.md and outcome.json")
    p.add_argument("--primary", default="ga-s2", help="the selector compared with every other row (default ga-s2)")
    p.add_argument("--baselines", type=comma_list, default=list(DEFAULT_BASELINES),
                   help=f"selectors the best baseline is taken from (default {','.join(DEFAULT_BASELINES)})")
    p.add_argument("--budgets", type=comma_list, default=None,
                   help="budget labels, counts or ratios, e.g. 2,4,8 (default: every budget the selections have)")
    p.add_argument("--tasks", type=comma_list, default=None,
                   help="recall tasks (default: those every run folder's evaluations share)")
    p.add_argument("--lengths", type=comma_ints, default=None,
                   help="context lengths (default: those every run folder's evaluations share)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="the resampling seed (default 0)")
    p.set_defaults(func=cmd_outcome)

    p = sub.add_parser("lm-eval", help="evaluate a model with lm-evaluation-harness tasks (needs hybrid-distill[lmeval])")
    add_lm_eval_arguments(p)
    p.set_defaults(func=run_lm_eval_from_args)

    p = sub.add_parser("export", help="student -> stock Hugging Face checkpoint (Qwen3.5 text) that loads without remote code")
    p.add_argument("student_dir")
    p.add_argument("out_dir", help="output folder (replaced as a whole; new, empty or an earlier export)")
    p.add_argument("--format", default="qwen3_5", choices=["qwen3_5"])
    p.add_argument("--approximate", action="store_true",
                   help="export what cannot be exported exactly anyway, and report the measured logit error")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="of the weights (default: the student's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path / hub id when STUDENT_DIR holds none")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="show a checkpoint's layer layout")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    return parser


# Errors that report a problem with the input, files or environment: one line, no traceback (unless --debug).
USER_ERRORS = (HybridDistillError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class ConsoleHandler(logging.Handler):
    """Writes log records to the ``sys.stderr`` of the moment, one message a line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 (logging's own policy: report, never raise)
            self.handleError(record)


def show_package_messages() -> None:
    """Show this package's messages from INFO up on the console (a run resumed and from where, a stage skipped, a
    checkpoint fallen back from, warnings), by the first process only under torchrun."""
    log = logging.getLogger(__package__)
    if int(os.environ.get("RANK", "0")) == 0 and not any(isinstance(h, ConsoleHandler) for h in log.handlers):
        log.addHandler(ConsoleHandler())
        log.setLevel(logging.INFO)


def resume_hint(args) -> str:
    """How to continue an interrupted command, for the commands that resume."""
    if args.command not in ("run", "distill", "select"):
        return ""
    where = getattr(args, "run_dir", None) or getattr(args, "config", None)
    return f"; run the same command again to resume{f' ({where})' if where else ''}"


def main(argv: list[str] | None = None) -> int:
    prefer_expandable_segments()  # before any command initializes CUDA
    args = build_parser().parse_args(argv)
    show_package_messages()
    if getattr(args, "no_progress", False) or getattr(args, "cfg_progress", None) is False:
        hf_logging.disable_progress_bar()  # transformers' own bars (loading / writing weights) too
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"hybrid-distill {args.command}: interrupted{resume_hint(args)}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        print(f"hybrid-distill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"hybrid-distill {args.command}: error: the disk is full: writing {err.filename or 'a file'} failed "
              f"({err.strerror}); free some space{resume_hint(args) or ' and run the same command again'}",
              file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as err:  # the message says what to change and where the run resumes
        if args.debug:
            traceback.print_exc()
        print(f"hybrid-distill {args.command}: out of memory: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
