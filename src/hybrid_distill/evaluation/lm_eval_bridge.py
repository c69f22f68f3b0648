"""Evaluate a model through EleutherAI's lm-evaluation-harness (optional dependency).

``evaluate_with_lm_eval(model_or_path, tasks=["ruler"], max_length=4096)`` wraps the model in
``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tok, max_length=N)`` and calls
``lm_eval.simple_evaluate``. Needs ``pip install "lm_eval[ruler]"``; its tasks download their
data (network access). For offline recall evaluation use :func:`~.suite.evaluate_model`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    'lm-evaluation-harness is not installed: pip install "lm_eval[ruler]". Note that its tasks '
    "(RULER, etc.) download their data sets and tokenizers, so they need network access; for offline "
    "recall evaluation use hybrid_distill.evaluation.suite.evaluate_model (hybrid-distill eval)."
)


class LmEvalUnavailable(ImportError):
    """lm_eval is not importable."""


def require_lm_eval():
    """Import and return ``lm_eval`` or raise :class:`LmEvalUnavailable` with install instructions."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as err:
        raise LmEvalUnavailable(f"{INSTALL_HINT} (import error: {err})") from err
    return lm_eval


def evaluate_with_lm_eval(
    model,
    tasks: Sequence[str] | str,
    *,
    tokenizer=None,
    max_length: int = 4096,
    batch_size: int | str = 1,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    device: str | None = None,
    metadata: dict[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model`` (a loaded model, a saved student / HF dir, or ``tiny:<variant>``).

    ``metadata`` is passed to ``simple_evaluate`` (RULER reads ``max_seq_lengths`` and the
    tokenizer from it; default for RULER-family tasks: ``{"max_seq_lengths": [max_length]}``
    plus ``pretrained`` = the tokenizer's name/path). Returns lm-eval's ``results`` dict
    (``results["results"][task][metric]``); with ``out_dir`` also writes ``lm_eval_results.json``.
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from .suite import atomic_write_text, load_model, load_tokenizer

    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        model = load_model(spec, device=device)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    elif tokenizer is None:
        raise ValueError("pass tokenizer= when model is a loaded model")
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer), str(tokenizer))
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if metadata is None and any(t.startswith(("ruler", "niah")) for t in task_list):
        metadata = {"max_seq_lengths": [int(max_length)]}
        name = getattr(tokenizer, "name_or_path", None)
        if name:
            metadata["pretrained"] = name
    lm_kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "max_length": int(max_length),
                                 "batch_size": batch_size}
    if device is not None:
        lm_kwargs["device"] = device
    lm = HFLM(**lm_kwargs)
    kwargs: dict[str, Any] = dict(model=lm, tasks=task_list, limit=limit, **simple_evaluate_kwargs)
    if num_fewshot is not None:
        kwargs["num_fewshot"] = num_fewshot
    if metadata is not None:
        kwargs["metadata"] = metadata
    results = lm_eval.simple_evaluate(**kwargs)
    if out_dir is not None and results is not None:
        keep = {k: results[k] for k in ("results", "versions", "n-shot", "config") if k in results}
        atomic_write_text(Path(out_dir) / "lm_eval_results.json", json.dumps(keep, indent=1, default=str) + "\n")
    return results


__all__ = ["INSTALL_HINT", "LmEvalUnavailable", "evaluate_with_lm_eval", "require_lm_eval"]
