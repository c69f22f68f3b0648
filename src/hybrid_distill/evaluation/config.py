"""`EvalConfig`: what an evaluation measures (suites, tasks, lengths, samples, NIAH grid, quality, efficiency).

One set of defaults for `evaluate_model`, ``hybrid-distill eval`` and a run config's ``eval:`` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import (
    Config,
    Invalid,
    boolean,
    comma_list,
    integer,
    list_of,
    mapping,
    one_of,
    optional,
    parse_float,
    real,
    setting,
)
from ..tasks import TASKS

SUITES = ("recall", "niah", "quality", "efficiency")
# "all": what the model knows. Efficiency times the device and is asked for by name.
ALL_SUITES = ("recall", "niah", "quality")
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # --dtype / --efficiency-dtype / eval.efficiency_dtype
DEFAULT_NIAH_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)


def parse_suite(suite: Any) -> list[str]:
    """Suite parts from ``"recall,niah"`` or a list; ``"all"`` stands for `ALL_SUITES`. Unknown parts raise ValueError."""
    if not isinstance(suite, (str, list, tuple)) or (not isinstance(suite, str) and not all(isinstance(s, str) for s in suite)):
        raise ValueError(f"must be a name or a list of names among {list(SUITES)}")
    parts = [s.strip() for s in suite.split(",")] if isinstance(suite, str) else [str(s).strip() for s in suite]
    parts = [p for p in parts if p]
    parts = [q for p in parts for q in (ALL_SUITES if p == "all" else [p])]
    bad = [p for p in parts if p not in SUITES]
    if bad or not parts:
        raise ValueError(f"must name parts among {list(SUITES)} or 'all' (= {list(ALL_SUITES)}); unknown: {bad or parts}")
    return list(dict.fromkeys(parts))


def _suite(value: Any) -> list[str]:
    try:
        return parse_suite(value)
    except ValueError as err:
        raise Invalid(str(err)) from None


def _task_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid("must be a task name")
    return value


def _tasks(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    names = list_of(_task_name, what="task names")(value)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise Invalid(f"has unknown task(s) {unknown}; known: {sorted(TASKS)}")
    return names


def _depth(value: Any) -> float:
    return real(0.0, maximum=100.0)(value)


positive_ints = list_of(integer(1), what="positive integers, e.g. [4096, 16384]")


@dataclass
class EvalConfig(Config):
    """What `evaluate_model` measures. ``None`` for ``tasks`` means the default recall suite; for
    ``niah_lengths`` and ``efficiency_lengths``, ``lengths``."""

    error_root = "eval"

    suite: list[str] = setting(default_factory=lambda: ["recall", "quality"], check=_suite, parse=parse_suite,
                               help=f"suite parts among {list(SUITES)} ('all' = {list(ALL_SUITES)})")
    tasks: list[str] | None = setting(None, check=_tasks, parse=comma_list(str),
                                      help="recall tasks (default: the default recall suite)")
    lengths: list[int] = setting(default_factory=lambda: [1024, 4096], check=positive_ints,
                                 help="total lengths in tokens (prompt + answer)")
    num_samples: int = setting(20, check=integer(1), help="samples per task and length")
    task_options: dict[str, Any] = setting(default_factory=dict, check=mapping, flag=False,
                                           help="per-task generator options, e.g. {vt: {num_chains: 2}}")
    haystack: str | None = setting(None, help="haystack of the text tasks (corpus path, 'default:prose', ...)")
    niah_lengths: list[int] | None = setting(None, check=optional(positive_ints), help="NIAH lengths (default: lengths)")
    niah_depths: list[float] = setting(default_factory=lambda: list(DEFAULT_NIAH_DEPTHS),
                                       check=list_of(_depth, what="percentages in [0, 100]"), parse=comma_list(parse_float),
                                       help="needle depths in percent")
    niah_samples: int = setting(1, check=integer(1), help="samples per NIAH cell")
    seed: int = setting(0, check=integer(0), help="sample generation seed")
    batch_size: int = setting(8, check=integer(1), help="prompts per generate() call")
    quality_seq_len: int = setting(512, check=integer(2), help="tokens per held-out sequence (quality suite)")
    quality_sequences: int = setting(32, check=integer(1), help="held-out sequences scored (quality suite)")
    efficiency_lengths: list[int] | None = setting(None, check=optional(positive_ints),
                                                   help="efficiency: context lengths (default: lengths)")
    efficiency_batches: list[int] = setting(default_factory=lambda: [1, 8], check=positive_ints,
                                            help="efficiency: batch sizes")
    decode_steps: int = setting(32, check=integer(1), help="efficiency: timed greedy decode steps per point")
    compile_decode: bool = setting(False, check=boolean, help="efficiency: torch.compile the decode step (GPU)")
    prefill_rows: int | None = setting(None, check=optional(integer(1)),
                                       help="efficiency: prompt rows per prefill forward (bounds prefill memory)")
    efficiency_dtype: str | None = setting("bfloat16", check=optional(one_of(*MODEL_DTYPES)),
                                           help="efficiency: measure copies of model and teacher in this dtype (what is served)")

    @property
    def parts(self) -> list[str]:
        return self.suite

    @property
    def niah_grid_lengths(self) -> list[int]:
        return list(self.niah_lengths or self.lengths)

    @property
    def efficiency_contexts(self) -> list[int]:
        return list(self.efficiency_lengths or self.lengths)


__all__ = ["ALL_SUITES", "DEFAULT_NIAH_DEPTHS", "MODEL_DTYPES", "SUITES", "EvalConfig", "parse_suite"]
