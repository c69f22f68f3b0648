"""``hybrid-distill distill``: one distillation stage from the command line.

Builds the teacher, the student (new from the teacher, or an existing checkpoint), the data and the
`DistillConfig` from the options, then runs `distill` into ``--run-dir``. The run folder records the teacher's
weights fingerprint and the data's identity with its settings, so a re-run with another teacher or other data
is refused (naming both) instead of resuming or returning the earlier run's result.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint import load_student
from ..config import ConfigError, parse_json
from ..data import add_data_flags, data_config_from_flags
from ..fileio import check_output_folder
from ..surgery import (
    build_student,
    check_student_fits_teacher,
    load_teacher,
    load_tokenizer,
    model_identity,
    resolve_mixers,
)
from . import distributed as hd_dist
from .config import add_distill_config_flags, distill_config_from_flags
from .trainer import DistillResult, distill


def add_distill_arguments(parser) -> None:
    """Options of `run_distill_from_args` (model/data/run-dir ones plus one per `DistillConfig` field)."""
    g = parser.add_argument_group("models")
    g.add_argument("--teacher", required=True, help="HF path / hub id, or tiny:<variant> for a built-in test teacher")
    g.add_argument("--run-dir", required=True, help="run directory (checkpoints, metrics, final model)")
    g.add_argument("--student", default=None, help="existing student checkpoint to train (e.g. a Stage-1 result)")
    layout = g.add_mutually_exclusive_group()
    layout.add_argument("--mixers", default=None, help="comma-separated mixer per layer (softmax, gdn, gla, swa)")
    layout.add_argument("--softmax-layers", default=None, help="0-based layers kept softmax; the rest --linear")
    g.add_argument("--linear", default="gdn", help="linear mixer for non-softmax layers (default gdn)")
    g.add_argument("--mixer-options", default=None, type=parse_json, help="JSON mixer options")
    g.add_argument(
        "--init-from", default=None, help="student checkpoint whose matching mixers initialize the new student"
    )
    g.add_argument(
        "--tokenizer", default=None, help="tokenizer path (default: the teacher's; tiny teachers: tiny_tokenizer)"
    )
    add_data_flags(parser)
    add_distill_config_flags(parser)


def run_distill_from_args(args: Any) -> DistillResult:
    """Build teacher, student, data and `DistillConfig` from `add_distill_arguments` options and run `distill`.

    ``args``: an ``argparse.Namespace`` (or dict) with the options of `add_distill_arguments`.
    """
    ns = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    config = distill_config_from_flags(ns)
    spec = data_config_from_flags(ns)  # bad data options fail before the models load
    check_output_folder(ns["run_dir"], "--run-dir")
    if ns.get("student"):
        ignored = [flag for flag, key in (("--mixers", "mixers"), ("--softmax-layers", "softmax_layers"),
                                          ("--mixer-options", "mixer_options"), ("--init-from", "init_from"))
                   if ns.get(key)] + (["--linear"] if ns.get("linear") not in (None, "gdn") else [])
        if ignored:
            raise ConfigError(f"--student trains an existing checkpoint as it is; {', '.join(ignored)} would be ignored. "
                             "Leave them out, or build a new student (no --student; --init-from reuses its mixers)")
    ctx = hd_dist.init_distributed(config.device)
    teacher = load_teacher(ns["teacher"])
    tokenizer = load_tokenizer(ns["teacher"], ns.get("tokenizer"), teacher.config.vocab_size)
    identity = {"teacher": model_identity(ns["teacher"]), "data": spec.identity()}

    torch.manual_seed(config.seed)  # new mixer parameters are initialized from the seed
    if ns.get("student"):
        student = load_student(ns["student"])
        check_student_fits_teacher(student.config, teacher.config, f"--student {ns['student']}", f"--teacher {ns['teacher']}")
    else:
        mixers = resolve_mixers(
            teacher.config.num_hidden_layers, ns.get("mixers"), ns.get("softmax_layers"), ns.get("linear") or "gdn"
        )
        options = ns.get("mixer_options")
        init_from = load_student(ns["init_from"]) if ns.get("init_from") else None
        student = build_student(teacher, mixers, options, init_from=init_from)
        del init_from
    student.float()

    config = config.replace(seq_len=config.data_seq_len)

    def load_data():
        return spec.load(tokenizer, config.seq_len, seed=config.seed, require_sequences=config.global_batch_size)

    data = load_data() if ctx.is_main else None  # tokenize once; the other ranks then load the cache
    hd_dist.barrier()
    data = data if data is not None else load_data()
    return distill(student, teacher, data, config, ns["run_dir"], tokenizer=tokenizer, identity=identity)


__all__ = ["add_distill_arguments", "run_distill_from_args"]
