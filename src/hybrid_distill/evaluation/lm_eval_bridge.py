"""Evaluate a model through EleutherAI's lm-evaluation-harness (optional dependency).

``evaluate_with_lm_eval(model_or_dir, tasks, ...)`` wraps a model object (a saved hybrid student
loaded from its directory, any Hugging Face causal LM, or a model already in memory) in
``lm_eval.models.huggingface.HFLM(pretrained=<model object>, tokenizer=...)`` and runs
``lm_eval.simple_evaluate`` on it. Because HFLM gets *our* model object, a hybrid student runs
with its own forward (loglikelihood tasks) and its own ``generate`` with ``HybridCache``
(``generate_until`` tasks, e.g. RULER). Per-task metrics are written atomically to
``<out_dir>/lm_eval_results.json``.

Install with ``pip install 'hybrid-distill[lmeval]'``. lm-eval's built-in tasks (RULER, the
commonsense suites, ...) download their data sets (RULER also its tokenizer and essays), so they
need a machine that is online or whose Hugging Face cache already holds them. Your own tasks can
read local files offline: put their YAML in a folder given as ``include_path`` and either

* ``dataset_path: json`` + ``dataset_kwargs: {data_files: {test: /abs/path/data.jsonl}}``
  (lm-eval/``datasets`` resolve relative ``data_files`` against the *current directory*), or
* ``custom_dataset: !function hybrid_distill.evaluation.lm_eval_bridge.local_dataset`` +
  ``dataset_kwargs: {data_files: {test: data.jsonl}}`` (relative to the YAML's folder; see
  :func:`local_dataset`). ``tests/data/lm_eval_task/`` has two such tasks.

Command line (not yet a ``hybrid-distill`` sub-command)::

    python -m hybrid_distill.evaluation.lm_eval_bridge --model runs/student --tasks ruler \\
        --max-length 4096 --out eval/student-lm-eval
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..dtypes import cast_model
from ..errors import HybridDistillError
from ..fileio import atomic_write_text, jsonable
from .suite import MODEL_DTYPES, load_model, load_tokenizer

RESULTS_FILE = "lm_eval_results.json"

# The first sentence names the package extra; the parenthesis keeps the plain lm_eval command.
INSTALL_HINT = (
    "lm-evaluation-harness is not installed: pip install 'hybrid-distill[lmeval]' "
    '(= pip install "lm_eval[ruler]" accelerate, the Hugging Face backend). Note that its built-in '
    "tasks (RULER, the commonsense suites, etc.) download their data sets and tokenizers, so they need "
    "network access; for offline recall evaluation use hybrid_distill.evaluation.suite.evaluate_model "
    "(hybrid-distill eval), or give lm-eval tasks that read local files (see this module's docstring)."
)

OFFLINE_HINT = (
    "lm-eval's built-in tasks download their data sets from the Hugging Face Hub (RULER also its "
    "tokenizer and essays): run on a machine that is online (with HF_DATASETS_OFFLINE / HF_HUB_OFFLINE "
    "unset) or whose Hugging Face cache already holds the data, or point the task at local files "
    "(dataset_path: json with absolute dataset_kwargs.data_files, or custom_dataset: !function "
    "hybrid_distill.evaluation.lm_eval_bridge.local_dataset with data_files relative to the YAML)."
)

_NETWORK_ERROR_NAMES = {
    "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError", "TransportError",
    "RequestError", "HTTPError", "HTTPStatusError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
}


RULER_TASK_PREFIXES = ("ruler", "niah")  # lm-eval's RULER group, its niah_* and ruler_* tasks


class LmEvalUnavailable(HybridDistillError, ImportError):
    """lm_eval (or its Hugging Face backend) is not importable."""


class LmEvalTaskNotFound(HybridDistillError, LookupError):
    """A requested task / group / tag is not known to lm-eval (nor in ``include_path``)."""


class LmEvalDataUnavailable(HybridDistillError, RuntimeError):
    """A task's data could not be loaded (offline machine, missing local files, unreachable hub)."""


def require_lm_eval():
    """Import and return ``lm_eval`` (checking its HF backend too) or raise :class:`LmEvalUnavailable`."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate)
    except ImportError as err:
        raise LmEvalUnavailable(f"{INSTALL_HINT} (import error: {err})") from err
    return lm_eval


# ---------------------------------------------------------------------------------------
# Local data for YAML tasks


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".jsonl", ".ndjson"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # JSON lines under a .json name
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (or JSON lines)")
        return data
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"{path}: local_dataset reads .jsonl/.json/.csv/.tsv files, not {suffix or 'extension-less'} ones")


def local_dataset(data_files=None, config_source: str | None = None, **_ignored: Any):
    """``custom_dataset`` for lm-eval YAML tasks that read local JSON-lines / JSON / CSV files offline.

    In the task YAML::

        custom_dataset: !function hybrid_distill.evaluation.lm_eval_bridge.local_dataset
        dataset_kwargs:
          data_files: {test: my_task.jsonl}   # or a path / list of paths (split "train")
        test_split: test

    lm-eval calls it with the task's ``metadata`` (which holds ``config_source``, the task YAML's
    path) and ``dataset_kwargs``; relative paths resolve against that YAML's folder (else the
    current directory). Returns an in-memory ``datasets.DatasetDict`` (no download, no cache).
    """
    import datasets

    if data_files is None:
        raise ValueError("local_dataset needs dataset_kwargs.data_files in the task YAML")
    base = Path(config_source).parent if config_source and config_source != "inline" else Path.cwd()
    if isinstance(data_files, (str, os.PathLike, list, tuple)):
        data_files = {"train": data_files}
    splits = {}
    for split, files in dict(data_files).items():
        rows: list[dict[str, Any]] = []
        for file in [files] if isinstance(files, (str, os.PathLike)) else list(files):
            path = Path(file).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise FileNotFoundError(f"lm-eval task data file {str(path)!r} not found (relative data_files "
                                        f"resolve against the task YAML's folder {str(base)!r})")
            rows.extend(_read_rows(path))
        if not rows:
            raise ValueError(f"split {split!r} of {data_files} has no records")
        splits[str(split)] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------
# Tasks


def _offline_flags() -> str:
    flags = [k for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
             if os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")]
    return f" ({', '.join(flags)} set)" if flags else ""


def _is_data_error(err: BaseException) -> bool:
    """A network / missing-file failure anywhere in ``err``'s cause chain."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (OSError, TimeoutError)) or type(err).__name__ in _NETWORK_ERROR_NAMES:
            return True
        err = err.__cause__ or err.__context__
    return False


def _task_manager(include_path, include_defaults: bool, metadata: dict[str, Any] | None):
    """An lm-eval ``TaskManager`` whose ``load`` turns data-loading failures into :class:`LmEvalDataUnavailable`."""
    from lm_eval.tasks import TaskManager

    class _BridgeTaskManager(TaskManager):
        def load(self, task_list):
            try:
                return super().load(task_list)
            except Exception as err:
                if not _is_data_error(err):
                    raise
                names = [t if isinstance(t, str) else getattr(t, "task_name", None) or str(t)
                         for t in (task_list if isinstance(task_list, (list, tuple)) else [task_list])]
                raise LmEvalDataUnavailable(
                    f"could not load the data of lm-eval task(s) {names}{_offline_flags()}: "
                    f"{type(err).__name__}: {err}. {OFFLINE_HINT}"
                ) from err

    paths = None
    if include_path is not None:
        items = include_path if isinstance(include_path, (list, tuple)) else [include_path]
        paths = [str(Path(p).expanduser()) for p in items]
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"lm-eval include_path {missing} does not exist")
    return _BridgeTaskManager(include_path=paths, include_defaults=include_defaults, metadata=metadata)


def _check_tasks(task_list: Sequence[Any], manager) -> None:
    known = set(manager.all_tasks)
    for task in task_list:
        if not isinstance(task, str) or task in known:
            continue
        path = Path(task).expanduser()
        if path.suffix in (".yaml", ".yml") and path.is_file():
            continue
        close = difflib.get_close_matches(task, sorted(known), n=5, cutoff=0.6)
        where = f" (searched {manager.include_path} too)" if manager.include_path else ""
        raise LmEvalTaskNotFound(
            f"lm-eval has no task, group or tag named {task!r}{where}"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + "; give custom task folders with include_path= / --include-path, or a task YAML path"
        )


# ---------------------------------------------------------------------------------------
# Results


def task_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task or group: {metric: value}}`` from lm-eval's ``results`` / ``groups`` sections.

    lm-eval's keys are ``"<metric>,<filter>"``; the default filter ``,none`` is dropped
    (``acc``, ``acc_stderr``, ``exact_match,first_int``). Non-numeric values ("N/A") become None.
    """
    out: dict[str, dict[str, Any]] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            clean = {}
            for key, value in metrics.items():
                if key in ("alias", "samples", "name", "sample_len", "sample_count"):
                    continue
                name = key.removesuffix(",none")
                clean[name] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            out[task] = jsonable(clean)
    return out


def _model_name(model, given: str | None) -> str:
    if given:
        return given
    config = getattr(model, "config", None)
    return str(getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or type(model).__name__)


def write_results(out_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``<out_dir>/lm_eval_results.json`` atomically."""
    return atomic_write_text(Path(out_dir) / RESULTS_FILE, json.dumps(jsonable(record), indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------
# Evaluation


def _fit_context_to_ruler_prompts(lm_kwargs: dict[str, Any], metadata: Mapping[str, Any] | None) -> None:
    """Make HFLM's context hold the longest RULER prompt (``metadata["max_seq_lengths"]``).

    lm-eval cuts prompts longer than HFLM's ``max_length`` (minus the generation budget) from the
    left with only a log warning, and without ``max_length`` HFLM takes the model config's
    ``max_position_embeddings``, which may be shorter than the RULER lengths asked for.
    """
    lengths = (metadata or {}).get("max_seq_lengths") or []
    if isinstance(lengths, (int, str)):
        lengths = [lengths]
    if not lengths:
        return
    longest = max(int(n) for n in lengths)
    given = lm_kwargs.get("max_length")
    if given is None:
        lm_kwargs["max_length"] = longest
    elif int(given) < longest:
        raise ValueError(
            f"max_length={given} is shorter than the longest RULER sequence length ({longest}, metadata "
            f"max_seq_lengths={list(lengths)}): lm-eval would cut those prompts from the left and still score "
            f"them; pass max_length >= {longest} (--max-length) or shorter max_seq_lengths"
        )


def _resolve_dtype(dtype):
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        import torch

        return getattr(torch, dtype)
    return dtype


def evaluate_with_lm_eval(
    model,
    tasks: Sequence[str | dict] | str,
    *,
    tokenizer=None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = True,
    max_length: int | None = None,
    batch_size: int | str = 1,
    limit: float | None = None,
    num_fewshot: int | None = None,
    device: str | None = None,
    dtype=None,
    metadata: dict[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    hflm_kwargs: dict[str, Any] | None = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model`` and return lm-eval's results dict.

    ``model``: a loaded model (pass ``tokenizer=``), or a saved hybrid student / HF causal LM
    directory (or ``tiny:<variant>``), loaded with :func:`~.suite.load_model` on ``device``
    (default: cuda if available) in ``dtype`` with its own tokenizer unless ``tokenizer`` is given.
    A loaded model is moved to ``device`` when one is given (HFLM itself ignores ``device`` for
    model objects).

    ``tasks``: lm-eval task / group / tag names, task YAML paths, or config dicts;
    ``include_path``: folder(s) of your own task YAMLs; ``include_defaults=False`` skips indexing
    lm-eval's ~15k built-in tasks (seconds) when only ``include_path`` tasks are run.
    ``max_length``: context length HFLM allows (default: from the model config); RULER-family
    tasks get ``metadata={"max_seq_lengths": [max_length or 4096], "pretrained": <tokenizer path>}``
    unless ``metadata`` is given, and HFLM's context defaults to the longest of ``max_seq_lengths``
    (a shorter ``max_length`` is refused: lm-eval would cut the prompts from the left). ``limit`` / ``num_fewshot`` / ``batch_size`` (int or "auto")
    are lm-eval's; ``hflm_kwargs`` go to ``HFLM`` (``add_bos_token``, ``truncation``, ...) and
    other keyword arguments to ``lm_eval.simple_evaluate`` (``log_samples``, ``bootstrap_iters``,
    ``gen_kwargs``, ``apply_chat_template``, ...).

    Returns lm-eval's dict (``results["results"][task]["acc,none"]``, ``results["samples"]``
    with ``log_samples``) plus ``results["metrics"]`` = :func:`task_metrics`. With ``out_dir``
    writes ``lm_eval_results.json`` (model, tasks, metrics, lm-eval's results / n-shot / versions /
    config) atomically. Raises :class:`LmEvalUnavailable` (an ImportError) without lm_eval,
    :class:`LmEvalTaskNotFound` for unknown task names and :class:`LmEvalDataUnavailable` when a
    task's data cannot be loaded (offline machine / missing local files).
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    task_list = [tasks] if isinstance(tasks, (str, dict)) else list(tasks)
    if not task_list:
        raise ValueError("no lm-eval tasks given")
    dtype = _resolve_dtype(dtype)
    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        model_name = model_name or spec
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(spec, dtype=dtype, device=device)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(spec, None if tokenizer is None else str(tokenizer))
    else:
        if tokenizer is None:
            raise ValueError("pass tokenizer= when model is a loaded model")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(str(tokenizer), str(tokenizer))
        if dtype is not None:
            model = cast_model(model, dtype)
        if device is not None:
            model = model.to(device)
    model.eval()

    ruler_family = any(isinstance(t, str) and t.startswith(RULER_TASK_PREFIXES) for t in task_list)
    if metadata is None and ruler_family:
        metadata = {"max_seq_lengths": [int(max_length or 4096)]}
        name = getattr(tokenizer, "name_or_path", None)
        if name:
            metadata["pretrained"] = name
    # backend="causal": hybrid model types are not in transformers' causal-LM registry (lm-eval would warn and guess).
    lm_kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size,
                                 "backend": "causal"}
    if max_length is not None:
        lm_kwargs["max_length"] = int(max_length)
    lm_kwargs.update(hflm_kwargs or {})
    if ruler_family:
        _fit_context_to_ruler_prompts(lm_kwargs, metadata)
    manager = _task_manager(include_path, include_defaults, metadata)
    _check_tasks(task_list, manager)
    lm = HFLM(**lm_kwargs)

    kwargs: dict[str, Any] = {"model": lm, "tasks": task_list, "limit": limit, "task_manager": manager}
    if num_fewshot is not None:
        kwargs["num_fewshot"] = int(num_fewshot)
    kwargs.update(simple_evaluate_kwargs)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(**kwargs)
    elapsed = time.perf_counter() - start
    if results is None:  # non-zero rank of a distributed run
        return results
    results["metrics"] = task_metrics(results)
    if out_dir is not None:
        record = {
            "model": _model_name(model, model_name),
            "tasks": [t if isinstance(t, str) else t.get("task", str(t)) if isinstance(t, dict) else str(t)
                      for t in task_list],
            "lm_eval_version": getattr(lm_eval, "__version__", None),
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "device": str(next(model.parameters()).device),
            "elapsed_s": round(elapsed, 3),
            "metrics": results["metrics"],
        }
        for key in ("results", "groups", "group_subtasks", "n-shot", "n-samples", "versions", "higher_is_better",
                    "config"):
            if key in results:
                record[key] = results[key]
        write_results(out_dir, record)
    return results


# ---------------------------------------------------------------------------------------
# Command line


def add_lm_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of the lm-eval bridge (then ``parser.set_defaults(func=run_lm_eval_from_args)``)."""
    parser.add_argument("--model", required=True, help="saved student / HF causal LM dir, or tiny:<variant>")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks / groups / tags / YAML paths")
    parser.add_argument("--include-path", action="append", help="folder of custom task YAMLs (repeatable)")
    parser.add_argument("--no-default-tasks", action="store_true",
                        help="index only --include-path tasks (skips lm-eval's built-in task index)")
    parser.add_argument("--tokenizer", help="tokenizer path / hub id (default: the model's)")
    parser.add_argument("--max-length", type=int, help="context length (default: the model config's)")
    parser.add_argument("--batch-size", default="1", help="int or 'auto'")
    parser.add_argument("--limit", type=float, help="examples per task (<1: fraction)")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--device", help="e.g. cuda, cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, help="model dtype")
    parser.add_argument("--metadata", help="JSON dict passed to the tasks (e.g. RULER's max_seq_lengths)")
    parser.add_argument("--out", help="output directory (default: eval/<model name>-lm-eval)")
    return parser


def run_lm_eval_from_args(args: argparse.Namespace) -> int:
    """Run the bridge from parsed arguments; prints the per-task metrics and returns 0."""
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    batch_size: int | str = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    out = args.out or str(Path("eval") / (Path(args.model.replace("tiny:", "tiny-")).name + "-lm-eval"))
    results = evaluate_with_lm_eval(
        args.model,
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        tokenizer=args.tokenizer,
        include_path=args.include_path,
        include_defaults=not args.no_default_tasks,
        max_length=args.max_length,
        batch_size=batch_size,
        limit=limit,
        num_fewshot=args.num_fewshot,
        device=args.device,
        dtype=args.dtype,
        metadata=json.loads(args.metadata) if args.metadata else None,
        out_dir=out,
        model_name=args.model,
        log_samples=False,
    )
    for task, metrics in results["metrics"].items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if v is not None and "stderr" not in k)
        print(f"{task}: {shown}")
    print(f"wrote {Path(out) / RESULTS_FILE}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_lm_eval_arguments(argparse.ArgumentParser(
        prog="python -m hybrid_distill.evaluation.lm_eval_bridge",
        description="Evaluate a saved student (or any HF causal LM) with lm-evaluation-harness tasks."))
    return run_lm_eval_from_args(parser.parse_args(argv))


__all__ = [
    "INSTALL_HINT",
    "RESULTS_FILE",
    "LmEvalDataUnavailable",
    "LmEvalTaskNotFound",
    "LmEvalUnavailable",
    "add_lm_eval_arguments",
    "evaluate_with_lm_eval",
    "local_dataset",
    "main",
    "require_lm_eval",
    "run_lm_eval_from_args",
    "task_metrics",
    "write_results",
]


if __name__ == "__main__":
    raise SystemExit(main())
