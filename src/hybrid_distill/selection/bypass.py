"""Layer-bypass baseline selectors (paper §4.2 "Baselines", Appendix A Table 5).

*Layer bypass* applies an identity residual across a block's token-mixing sublayer: the
attention (or linear mixer) output is replaced by zeros, so the block computes
``h = x + 0`` and then its MLP as usual (``h + mlp(norm(h))``). It is a forward hook on
``layers[i].self_attn`` (:func:`bypass_mixer`), so it works for the Hugging Face Llama /
Qwen2 / Qwen3 / Mistral teachers and for hybrid students (any mixer), with padding and under
``generate()`` (the bypassed layer may still write its KV cache / recurrent state; its output
is discarded, so that state is never read into the residual stream).

A selector scores every layer by the damage its bypass does (higher = more important; ties
are broken downstream by the lower layer index):

* ``act-mse`` -- :func:`act_mse_scores`: mean squared error between the final hidden states
  (``last_hidden_state`` of the decoder stack, i.e. AFTER the final norm, before ``lm_head``)
  of the bypassed and the intact model, averaged over hidden units and non-padded tokens.
* ``lm-ppl`` -- :func:`lm_ppl_scores`: perplexity(bypassed) - perplexity(intact) on held-out
  batches (:func:`hybrid_distill.evaluation.quality.token_nll`).
* ``kv`` / ``ar`` / ``ar-mh`` / ``vt`` / ``cwe`` -- :func:`task_scores` on the recall task
  ``TASK_SELECTORS[selector]``: accuracy drop under greedy generation (seeded samples of
  :func:`hybrid_distill.tasks.generate_samples`, scored by
  :func:`hybrid_distill.evaluation.runner.run_samples`), plus a continuous tie-breaker, the
  increase of the teacher-forced NLL of the gold answer (see :func:`task_scores`).

Output (plain, JSON-serialisable dicts; layer keys are ints, ``json`` writes them as strings):

* :func:`act_mse_scores` / :func:`lm_ppl_scores` return ``{layer: score}``; with
  ``return_details=True`` a :class:`BypassSelectorResult`.
* :func:`task_scores` returns a :class:`BypassSelectorResult`::

    {"scores":   {layer: score},
     "details":  {layer: {"accuracy", "accuracy_drop", "answer_nll", "answer_nll_increase", "score"}},
     "baseline": {"accuracy", "answer_nll"},
     "task", "length", "num_samples", "seed", "tiebreak_weight", "score_formula"}

All functions run under ``torch.no_grad()`` with the model in eval mode and restore its
training flag afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..evaluation.quality import token_nll, unpack_batch
from ..evaluation.runner import run_samples
from ..tasks import generate_samples
from .registry import TASK_SELECTORS

__all__ = [
    "TASK_SELECTORS",
    "BypassSelectorResult",
    "act_mse_scores",
    "bypass_mixer",
    "decoder_layers",
    "lm_ppl_scores",
    "task_scores",
]


# weight of the NLL tie-breaker in task scores (capped further so that accuracy always dominates)
TIEBREAK_WEIGHT = 1e-3


class BypassSelectorResult(TypedDict, total=False):
    """``scores``: {layer: importance}; ``details``: {layer: {...}}; ``baseline``: the intact model."""

    scores: dict[int, float]
    details: dict[int, dict[str, float]]
    baseline: dict[str, float]


# ---------------------------------------------------------------------------------------
# The bypass itself


def _decoder_stack(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(module owning the decoder layers, the layers): ``model.model`` for causal LMs, or ``model``."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, (nn.ModuleList, list, tuple)) and len(layers) > 0:
            return owner, layers
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: expected a causal LM with "
        "`model.model.layers` (Llama/Qwen2/Qwen3/Mistral and hybrid students) or a decoder with `.layers`"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (``model.model.layers``); ``ValueError`` if the model has none."""
    return _decoder_stack(model)[1]


def _layer_indices(model: nn.Module, layers: int | Sequence[int] | None) -> list[int]:
    n = len(decoder_layers(model))
    if layers is None:
        return list(range(n))
    idx = [int(layers)] if isinstance(layers, int) else [int(i) for i in layers]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a model with {n} layers (0-based)")
    return list(dict.fromkeys(idx))


def _zero_mixer_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the mixer's output (first element) becomes zeros; the structure is kept."""
    if torch.is_tensor(output):
        return torch.zeros_like(output)
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return type(output)([torch.zeros_like(output[0]), *output[1:]])
    raise TypeError(f"cannot bypass {type(module).__name__}: its output is a {type(output).__name__}, "
                    "expected a tensor or a tuple whose first element is the mixer output")


@contextmanager
def bypass_mixer(model: nn.Module, layer_idx: int | Sequence[int]) -> Iterator[nn.Module]:
    """Within the context, the token-mixing sublayer (``self_attn``) of layer(s) ``layer_idx``
    outputs zeros, i.e. the block's attention residual is the identity. The hooks are removed on
    exit, also when the body raises."""
    layers = decoder_layers(model)
    handles = []
    try:
        for i in _layer_indices(model, layer_idx):
            mixer = getattr(layers[i], "self_attn", None)
            if not isinstance(mixer, nn.Module):
                raise ValueError(f"decoder layer {i} ({type(layers[i]).__name__}) has no `self_attn` module")
            handles.append(mixer.register_forward_hook(_zero_mixer_output))
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------
# Model-signal selectors


def _final_hidden(stack: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    out = stack(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def act_mse_scores(
    model: nn.Module,
    batches: Iterable,
    layers: Sequence[int] | None = None,
    progress: bool = False,
    return_details: bool = False,
) -> dict[int, float] | BypassSelectorResult:
    """Act-MSE: per layer, the mean over non-padded tokens and hidden units of
    ``(h_bypassed - h)^2``, where ``h`` is the decoder stack's ``last_hidden_state`` (after the
    final norm, before ``lm_head``). Batches: ``[B, T]`` LongTensors or dicts with ``input_ids``
    (+ ``attention_mask``), as :func:`hybrid_distill.evaluation.quality.token_nll` takes them."""
    idx = _layer_indices(model, layers)
    stack, _ = _decoder_stack(model)
    device = _device_of(model)
    sums = {i: 0.0 for i in idx}
    count = 0
    with _eval_mode(model):
        for batch in tqdm(list(batches), desc="act-mse", disable=not progress):
            ids, mask = unpack_batch(batch, device)
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            n = int(valid.sum())
            if n == 0:
                continue
            base = _final_hidden(stack, ids, mask).float()
            for i in idx:
                with bypass_mixer(model, i):
                    h = _final_hidden(stack, ids, mask).float()
                sums[i] += float((h - base).pow(2).mean(-1)[valid].double().sum())
            count += n
    if count == 0:
        raise ValueError("act_mse_scores: the batches contain no (non-padded) tokens")
    scores = {i: sums[i] / count for i in idx}
    if not return_details:
        return scores
    return {"scores": scores, "details": {i: {"mse": scores[i]} for i in idx},
            "baseline": {"tokens": count}, "signal": "final hidden state (after the final norm)"}


def _ppl(total: float, count: int) -> tuple[float, float]:
    nll = total / count
    return nll, (math.exp(nll) if nll < 700 else math.inf)


def lm_ppl_scores(
    model: nn.Module,
    batches: Iterable,
    layers: Sequence[int] | None = None,
    progress: bool = False,
    return_details: bool = False,
) -> dict[int, float] | BypassSelectorResult:
    """LM-PPL: per layer, perplexity(bypassed) - perplexity(intact) on ``batches`` (next-token
    NLL over non-padded tokens, :func:`hybrid_distill.evaluation.quality.token_nll`)."""
    idx = _layer_indices(model, layers)
    batches = list(batches)
    with _eval_mode(model):
        total, count = token_nll(model, batches)
        if count == 0:
            raise ValueError("lm_ppl_scores: the batches contain no predicted tokens")
        base_nll, base_ppl = _ppl(total, count)
        details: dict[int, dict[str, float]] = {}
        for i in tqdm(idx, desc="lm-ppl", disable=not progress):
            with bypass_mixer(model, i):
                t, c = token_nll(model, batches)
            nll, ppl = _ppl(t, c)
            details[i] = {"nll": nll, "perplexity": ppl, "perplexity_increase": ppl - base_ppl}
    scores = {i: d["perplexity_increase"] for i, d in details.items()}
    if not return_details:
        return scores
    return {"scores": scores, "details": details,
            "baseline": {"nll": base_nll, "perplexity": base_ppl, "tokens": count}}


# ---------------------------------------------------------------------------------------
# Task-guided selectors


def _gold_continuation(sample: Any) -> str:
    """The text a correct greedy answer would start with (after ``prompt + answer_prefix``)."""
    sep = "" if sample.answer_prefix[-1:].isspace() else " "
    joiner = " " if sample.metric == "mqar_accuracy" else ", "
    return sep + joiner.join(str(a) for a in sample.answers)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _answer_batches(tokenizer: Any, samples: Sequence[Any], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Left-padded ``(ids, mask, position_ids, target_lengths)`` batches of
    BOS (if any) + prompt + answer_prefix + gold answer, tokenized as generation sees them
    (prompt and answer separately)."""
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = []
    for s in range(0, len(samples), batch_size):
        rows, tlens = [], []
        for sample in samples[s : s + batch_size]:
            prompt = ([bos] if bos is not None else []) + _encode(tokenizer, sample.prompt + sample.answer_prefix)
            target = _encode(tokenizer, _gold_continuation(sample))
            rows.append(prompt + target)
            tlens.append(len(target))
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, length - len(r) :] = torch.tensor(r)
            mask[i, length - len(r) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out.append((ids, mask, pos, torch.tensor(tlens)))
    return out


def _answer_nll(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> float:
    """Mean over samples of the mean teacher-forced NLL (nats/token) of the gold answer tokens."""
    device = _device_of(model)
    per_sample: list[float] = []
    for ids, mask, pos, tlens in batches:
        keep = int(tlens.max()) + 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                    use_cache=False, logits_to_keep=keep)
        logits = out.logits[:, -keep:].float()
        T = ids.shape[1]
        for i, t in enumerate(tlens.tolist()):
            lg = logits[i, keep - 1 - t : keep - 1]
            tgt = ids[i, T - t :].to(device)
            per_sample.append(float(F.cross_entropy(lg, tgt, reduction="mean")))
    return sum(per_sample) / len(per_sample)


def _accuracy(model: nn.Module, tokenizer: Any, samples: Sequence[Any], batch_size: int) -> float:
    preds = run_samples(model, tokenizer, samples, batch_size=batch_size, progress=False)
    return sum(p.score for p in preds) / len(preds)


def _tiebreak_weight(samples: Sequence[Any]) -> float:
    """``min(1e-3, 1 / (2 N m))``: below half the resolution of a mean accuracy over the samples."""
    m = math.lcm(*(max(1, len(s.answers)) for s in samples))
    return min(TIEBREAK_WEIGHT, 1.0 / (2 * len(samples) * m))


def task_scores(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    length: int,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    progress: bool = False,
    **task_options: Any,
) -> BypassSelectorResult:
    """Task-guided bypass selector (KV / AR / AR-MH / VT / CWE; ``task`` is a recall task name or a
    key of :data:`TASK_SELECTORS`).

    ``num_samples`` seeded samples of ``task`` at ``length`` tokens are run through greedy
    generation (:func:`~hybrid_distill.evaluation.runner.run_samples`) with the intact model and
    with each layer bypassed. Per layer::

        accuracy_drop       = accuracy(intact) - accuracy(bypassed)
        answer_nll_increase = answer_nll(bypassed) - answer_nll(intact)
        score               = accuracy_drop + w * tanh(answer_nll_increase)

    ``answer_nll`` is the teacher-forced NLL (nats/token, averaged per sample, then over samples)
    of the gold answer (``answer_prefix`` + " " + the answers joined) given the prompt: one
    forward per batch, no generation. It separates layers where the accuracies tie (small or weak
    models often score 0 everywhere). ``w = min(1e-3, 1 / (2 N m))`` with ``N`` samples and ``m``
    the least common multiple of the samples' answer counts: any accuracy difference is a multiple
    of ``1 / (N m)`` and ``|w tanh(.)| < 1 / (2 N m)``, so rankings follow accuracy first and the
    NLL only breaks ties. ``task_options`` go to :func:`~hybrid_distill.tasks.generate_samples`.
    """
    task = TASK_SELECTORS.get(task, task)
    idx = _layer_indices(model, layers)
    samples = generate_samples(task, tokenizer, length, num_samples, seed=seed, **task_options)
    if not samples:
        raise ValueError("task_scores needs num_samples >= 1")
    weight = _tiebreak_weight(samples)
    nll_batches = _answer_batches(tokenizer, samples, batch_size)
    with _eval_mode(model):
        base_acc = _accuracy(model, tokenizer, samples, batch_size)
        base_nll = _answer_nll(model, nll_batches)
        details: dict[int, dict[str, float]] = {}
        for i in tqdm(idx, desc=f"bypass {task}", disable=not progress):
            with bypass_mixer(model, i):
                acc = _accuracy(model, tokenizer, samples, batch_size)
                nll = _answer_nll(model, nll_batches)
            drop, inc = base_acc - acc, nll - base_nll
            details[i] = {"accuracy": acc, "accuracy_drop": drop, "answer_nll": nll, "answer_nll_increase": inc,
                          "score": drop + weight * math.tanh(inc)}
    return {
        "scores": {i: d["score"] for i, d in details.items()},
        "details": details,
        "baseline": {"accuracy": base_acc, "answer_nll": base_nll},
        "task": task,
        "length": int(length),
        "num_samples": len(samples),
        "seed": int(seed),
        "tiebreak_weight": weight,
        "score_formula": "accuracy_drop + tiebreak_weight * tanh(answer_nll_increase)",
    }
