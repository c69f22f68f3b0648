"""The `hybrid-distill` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def cmd_convert(args) -> int:
    """Build a student from a teacher (attention-weight transfer) and save it as an HF checkpoint."""
    from .checkpoint import save_student
    from .surgery import build_student, load_teacher, resolve_mixers

    teacher = load_teacher(args.teacher)
    mixers = resolve_mixers(teacher.config.num_hidden_layers, args.mixers, args.softmax_layers, args.linear)
    options = json.loads(args.mixer_options) if args.mixer_options else None
    student = build_student(teacher, mixers, options)
    tokenizer = None
    if not args.teacher.startswith("tiny:"):
        from transformers import AutoTokenizer

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
    from .checkpoint import verify_checkpoint

    config = verify_checkpoint(args.checkpoint)
    mixers = config.get("mixers")
    if mixers is None:
        print(f"{args.checkpoint}: a {config.get('model_type')} model (not a hybrid student), {config.get('num_hidden_layers')} layers")
        return 0
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


def cmd_distill(args) -> int:
    """Distill a student (Stage 1/2/3) into a run directory; resumes an interrupted run."""
    from .distill import run_distill_from_args

    result = run_distill_from_args(args)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items()}, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .distill import add_distill_arguments
    from .evaluation.suite import add_eval_arguments, run_eval_from_args

    parser = argparse.ArgumentParser(prog="hybrid-distill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="teacher -> hybrid student checkpoint (weight transfer, no training)")
    p.add_argument("--teacher", required=True, help="HF path / hub id, or tiny:<variant> for a built-in test teacher")
    p.add_argument("--out", required=True, help="output directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--mixers", help="comma-separated mixer per layer (softmax, gdn, gla, swa)")
    group.add_argument("--softmax-layers", help="comma-separated 0-based layers to keep softmax; others --linear")
    p.add_argument("--linear", default="gdn", help="linear mixer for non-softmax layers (default gdn)")
    p.add_argument("--mixer-options", help='JSON, e.g. \'{"gdn_use_short_conv": true}\'')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("distill", help="run one distillation stage (1: attention alignment, 2: KL, 3: fine-tune)")
    add_distill_arguments(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="recall suite / NIAH grid / perplexity and KL of a model; JSON + Markdown report")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval_from_args)

    p = sub.add_parser("inspect", help="show a checkpoint's layer layout")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"hybrid-distill {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
