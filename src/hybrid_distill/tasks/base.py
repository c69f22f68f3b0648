"""Shared plumbing of the recall tasks: samples, seeds, length fitting, random values, task specs.

Every sample is a :class:`RecallSample`; the model input is ``prompt + answer_prefix``
(encoded with ``add_special_tokens=False`` plus whatever special tokens the caller adds),
greedy generation of at most ``max_new_tokens`` tokens, scored with ``metric``
(see :mod:`hybrid_distill.evaluation.scoring`).

Length (as in RULER, input + generated tokens)::

    count_tokens(tok, prompt + answer_prefix) + max_new_tokens == length

``count_tokens`` counts *without* special tokens, so a caller that prepends BOS feeds
``length + 1`` positions. How the exact count is reached (:func:`fit_length`):

1. The haystack grows in whole *units* (sentences, needle lines, dictionary entries,
   key-value pairs, list words); the largest unit count whose prompt fits the budget
   ``length - max_new_tokens`` is found by binary search (needle/insert positions are
   fractions of the unit count, so they move with it).
2. The remaining gap (less than one unit) is filled by appending a character prefix of the
   *natural continuation* at the end of the haystack -- the next units of the same stream,
   cut mid-unit as RULER cuts its essays (``fwe``: more ``....`` noise words) -- choosing
   the prefix length (binary search, then a local scan) whose total is exact. If no prefix hits
   (a merge skipping the count), it retries from one unit fewer, then with generic fillers
   (``" ."``, ``" a"``, ...).
3. Failing all of that (not seen with byte-level BPE tokenizers) the closest shorter
   sample is returned with ``metadata["length_exact"] = False`` and a warning.

Training documents need no exact length: :func:`fit_length_approx` estimates the tokens per
unit from smaller builds, builds near the budget and corrects the unit count from that build's
measured tokens: about 2 prompts' worth of text tokenized per sample instead of 10-20; its
prompts have at most the budget and at least ``1 - APPROX_TOLERANCE`` of it where the units
are small enough.

The continuation never adds an answer: each task validates the final text (answers occur
exactly as often as intended, keys do not collide, aggregation counts are strict) and
redraws the sample (``attempt`` + 1 in the seed) if it does not.

Seeding: each sample uses ``random.Random(sample_seed(seed, task, length, index, attempt))``
(SHA-256 of the tuple; the ``train`` template family appends its name to the tuple); the
global RNG is never touched.
"""

from __future__ import annotations

import hashlib
import random
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .haystack import ADJECTIVES, NOUNS, Haystack

# Template families: "eval" is the evaluation's wording (RULER's where the task is RULER's), "train" a second
# wording of every task for training documents that share no template text with the evaluation.
TEMPLATE_FAMILIES = ("eval", "train")


@dataclass
class RecallSample:
    """One recall prompt. Model input: ``prompt + answer_prefix``; generate ``max_new_tokens``."""

    task: str
    length: int  # target: tokens(prompt + answer_prefix) + max_new_tokens
    index: int
    prompt: str
    answer_prefix: str
    answers: list[str]
    max_new_tokens: int
    metric: str  # a key of scoring.METRICS
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def input_text(self) -> str:
        return self.prompt + self.answer_prefix

    @property
    def completion(self) -> str:
        """A continuation of ``input_text`` that scores 1.0, written as a model would (training documents)."""
        sep = "" if self.answer_prefix.endswith((" ", "\n")) else " "
        if self.metric == "mqar_accuracy":
            body = " ".join(self.answers)
        elif self.metric == "first_int_exact":
            body = self.answers[0]
        elif self.metadata.get("base_task", self.task) == "vt":
            body = ", ".join(self.answers)
        else:
            body = ", ".join(self.answers) + "."
        return sep + body

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecallSample:
        return cls(**d)


class LengthError(ValueError):
    """The target length is too short for the task's fixed parts."""


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` without special tokens (no BOS/EOS).

    Works with Hugging Face tokenizers (``encode(text, add_special_tokens=False)``) and raw
    ``tokenizers.Tokenizer`` objects. All lengths in this package are counted this way.
    """
    try:
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    except TypeError:
        ids = tokenizer.encode(text, add_special_tokens=False)
    if hasattr(ids, "ids"):
        ids = ids.ids
    return len(ids)


def sample_seed(seed: int, task: str, length: int, index: int, *extra: Any) -> int:
    """64-bit seed from the tuple (SHA-256 of its repr), independent of the global RNG."""
    key = repr((int(seed), str(task), int(length), int(index)) + tuple(extra)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


# ---------------------------------------------------------------------------------------
# Length fitting


@dataclass
class Draft:
    """A sample's text before its length is final: ``build(units, pad)`` makes one."""

    prompt: str
    answer_prefix: str
    answers: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.prompt + self.answer_prefix


Build = Callable[[int, str], Draft]  # (number of haystack units, pad text) -> draft

# generic pads tried when the natural continuation cannot hit the count exactly
_FILLERS = (" ." * 200, " a" * 200, " -" * 200, "\n" * 100, " " * 50 + "." * 200)


@dataclass
class Fit:
    draft: Draft
    units: int
    pad: str
    tokens: int  # of prompt + answer_prefix
    exact: bool


class _Costs:
    """Token counts of ``build(n, pad).text``, each measured once."""

    def __init__(self, tokenizer: Any, build: Build):
        self.tokenizer, self.build = tokenizer, build
        self.memo: dict[tuple[int, str], int] = {}

    def __call__(self, n: int, pad: str = "") -> int:
        key = (n, pad)
        if key not in self.memo:
            self.memo[key] = count_tokens(self.tokenizer, self.build(n, pad).text)
        return self.memo[key]

    def minimum(self, n_min: int, budget: int, what: str) -> int:
        c0 = self(n_min)
        if c0 > budget:
            raise LengthError(
                f"{what}: the prompt needs at least {c0} tokens but only {budget} are available "
                f"(length minus max_new_tokens); use a larger length"
            )
        return c0

    def first_guess(self, n_min: int, c0: int, budget: int) -> tuple[int, float]:
        """A unit count near the budget from the tokens of 4 more units than ``n_min``, and that rate."""
        per_unit = max((self(n_min + 4) - c0) / 4, 0.25)
        return n_min + max(1, int((budget - c0) / per_unit)), per_unit


def fit_length(
    tokenizer: Any,
    build: Build,
    budget: int,
    n_min: int = 0,
    continuation: Callable[[int], str] | None = None,
    what: str = "task",
) -> Fit:
    """Largest unit count fitting ``budget`` (binary search), then a pad to hit it exactly."""
    cost = _Costs(tokenizer, build)
    c0 = cost.minimum(n_min, budget, what)
    guess, _ = cost.first_guess(n_min, c0, budget)
    if cost(guess) <= budget:
        lo, step = guess, max(1, guess // 16)
        hi = lo + step
        while cost(hi) <= budget:
            lo, step = hi, step * 2
            hi = lo + step
    else:
        lo, hi = n_min, guess
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    n = lo
    if cost(n) == budget:
        return Fit(build(n, ""), n, "", budget, True)

    candidates: list[tuple[int, str]] = []
    if continuation is not None:
        candidates.append((n, continuation(n)))
        if n > n_min:
            candidates.append((n - 1, continuation(n - 1)))
    candidates += [(n, f) for f in _FILLERS]
    for m, src in candidates:
        pad = _search_pad(lambda p, m=m: cost(m, p), src, budget)
        if pad is not None:
            return Fit(build(m, pad), m, pad, budget, True)

    best = max(((c, k) for k, c in cost.memo.items() if c <= budget), key=lambda t: t[0])
    (m, pad) = best[1]
    warnings.warn(f"{what}: could not reach exactly {budget} prompt tokens; using {best[0]}", stacklevel=3)
    return Fit(build(m, pad), m, pad, best[0], False)


# An approximate fit is accepted once its prompt is within this fraction of the budget (and never above it).
APPROX_TOLERANCE = 0.03


def fit_length_approx(tokenizer: Any, build: Build, budget: int, n_min: int = 0, what: str = "task") -> Fit:
    """A unit count whose prompt has at most ``budget`` tokens and, where the units are small enough,
    at least ``(1 - APPROX_TOLERANCE) * budget``. Tokens grow about linearly with the units, so each
    measured build gives the tokens per unit for the next guess, aimed at the middle of that window:
    ``n_min + 4`` units, then a quarter of the estimated count, then the whole (usually within the
    window), then corrections. No pad: the haystack ends after a whole unit."""
    cost = _Costs(tokenizer, build)
    c0 = cost.minimum(n_min, budget, what)
    floor = budget - int(APPROX_TOLERANCE * budget)
    aim = (budget + floor) / 2

    def estimate(per_unit: float) -> int:
        return n_min + max(0, int((aim - c0) / per_unit))

    _, per_unit = cost.first_guess(n_min, c0, budget)
    quarter = n_min + (estimate(per_unit) - n_min) // 4
    if quarter > n_min + 4:  # a rate measured over a quarter of the haystack
        per_unit = max((cost(quarter) - c0) / (quarter - n_min), 0.25)
    n = max(n_min + 1, estimate(per_unit))
    fits, over = n_min, None  # largest unit count known to fit, smallest known not to
    for _ in range(8):
        c = cost(n)
        per_unit = max((c - c0) / (n - n_min), 0.25)
        if c <= budget:
            fits = max(fits, n)
            if c >= floor:
                break
            n = max(n + 1, estimate(per_unit))
        else:
            over = n if over is None else min(over, n)
            n = min(n - 1, estimate(per_unit))
        if over is not None:
            n = min(n, over - 1)
        if n <= fits:
            break
    tokens = cost(fits)
    return Fit(build(fits, ""), fits, "", tokens, tokens == budget)


def _search_pad(cost: Callable[[str], int], src: str, budget: int) -> str | None:
    if cost(src) < budget:
        return None
    lo, hi = 0, len(src)  # cost(src[:lo]) < budget <= cost(src[:hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(src[:mid]) < budget:
            lo = mid
        else:
            hi = mid
    if cost(src[:hi]) == budget:
        return src[:hi]
    for c in range(max(0, hi - 24), min(len(src), hi + 24) + 1):
        if cost(src[:c]) == budget:
            return src[:c]
    return None


def interleave(units: Sequence[str], items: Sequence[tuple[float, str]]) -> list[str]:
    """Insert ``(fraction, text)`` items (sorted by fraction) before unit ``int(fraction * n)``."""
    n = len(units)
    out: list[str] = []
    j = 0
    for i, u in enumerate(units):
        while j < len(items) and min(int(items[j][0] * n), n) <= i:
            out.append(items[j][1])
            j += 1
        out.append(u)
    out.extend(t for _, t in items[j:])
    return out


def count_ci(text_lower: str, s: str) -> int:
    """Occurrences of ``s`` in ``text_lower`` (already lower-cased), case-insensitively."""
    return text_lower.count(s.lower())


def join_query(keys: Sequence[str]) -> str:
    """``a``, ``a, and b``, ``a, b, and c``: keys as a question names them."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


# RULER's depth grid for needle placement: 40 evenly spaced integer percents in [0, 100]
DEPTHS = tuple(round(i * 100 / 39) for i in range(40))


# ---------------------------------------------------------------------------------------
# Random values


def random_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_word_pair(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


RANDOM_VALUES: dict[str, Callable[[random.Random], str]] = {
    "numbers": random_number,
    "uuids": random_uuid,
    "words": random_word_pair,
}


def related(a: str, b: str) -> bool:
    """Whether one string contains the other (case-insensitively)."""
    a, b = a.lower(), b.lower()
    return a in b or b in a


class UniqueValues:
    """Draws distinct values of one kind, none a substring of (or containing) one in ``avoid``;
    ``mutual=True`` also keeps the drawn values free of such relations among themselves."""

    def __init__(self, rng: random.Random, kind: str, avoid: Sequence[str] = (), mutual: bool = False):
        self.rng, self.fn, self.seen = rng, RANDOM_VALUES[kind], set(avoid)
        self.avoid, self.mutual = list(avoid), mutual

    def __call__(self) -> str:
        for _ in range(100_000):
            v = self.fn(self.rng)
            if v not in self.seen and not any(related(v, a) for a in self.avoid):
                self.seen.add(v)
                if self.mutual:
                    self.avoid.append(v)
                return v
        raise RuntimeError(f"ran out of distinct values ({len(self.seen)} drawn); use a shorter length")


# ---------------------------------------------------------------------------------------
# Task plumbing


@dataclass
class Plan:
    """How one sample is built (``build``), checked (``validate``) and padded (``continuation``)."""

    build: Build
    validate: Callable[[Draft], bool]
    n_min: int = 0
    continuation: Callable[[int], str] | None = None
    metric: str | None = None  # overrides the registry metric (kv_retrieval value types)


@dataclass
class TaskContext:
    """What a task's plan function gets besides its RNG and options."""

    task: str
    tokenizer: Any
    length: int
    index: int
    seed: int
    max_new_tokens: int
    haystack: Haystack | None
    template: str = "eval"  # a TEMPLATE_FAMILIES entry
    exact_length: bool = True


@dataclass(frozen=True)
class TaskSpec:
    """Registry entry: ``plan(ctx, rng, **options)`` builds a sample plan."""

    name: str
    plan: Callable[..., Plan]
    max_new_tokens: int
    metric: str
    haystack: str | None  # default haystack spec, or None when the task makes its own text
    ruler: bool  # True where the task matches RULER's offline definition
    description: str
    base_task: str  # the task a named variant configures (vt_2chains -> vt); its own name otherwise


def configured(plan: Callable[..., Plan], **defaults: Any) -> Callable[..., Plan]:
    """``plan`` with ``defaults`` for its options (a caller's options still override them): a named variant."""

    def variant(ctx: TaskContext, rng: random.Random, **options: Any) -> Plan:
        return plan(ctx, rng, **{**defaults, **options})

    return variant


MAX_ATTEMPTS = 20


def make_sample(spec: TaskSpec, ctx: TaskContext, options: dict[str, Any]) -> RecallSample:
    """One validated sample of ``spec`` (redrawn with the next ``attempt`` seed until it validates)."""
    budget = ctx.length - ctx.max_new_tokens
    if budget <= 0:
        raise LengthError(f"{spec.name}: length {ctx.length} <= max_new_tokens {ctx.max_new_tokens}")
    family = () if ctx.template == "eval" else (ctx.template,)
    for attempt in range(MAX_ATTEMPTS):
        s = sample_seed(ctx.seed, spec.name, ctx.length, ctx.index, attempt, *family)
        plan = spec.plan(ctx, random.Random(s), **options)
        if ctx.exact_length:
            fit = fit_length(ctx.tokenizer, plan.build, budget, plan.n_min, plan.continuation, what=spec.name)
        else:
            fit = fit_length_approx(ctx.tokenizer, plan.build, budget, plan.n_min, what=spec.name)
        if plan.validate(fit.draft):
            break
    else:
        raise RuntimeError(f"{spec.name}: no valid sample after {MAX_ATTEMPTS} attempts (haystack collisions?)")
    d = fit.draft
    meta = {
        **d.metadata,
        "seed": ctx.seed,
        "sample_seed": s,
        "attempt": attempt,
        "haystack": ctx.haystack.name if ctx.haystack is not None else None,
        "num_units": fit.units,
        "pad_chars": len(fit.pad),
        "input_tokens": fit.tokens,
        "total_tokens": fit.tokens + ctx.max_new_tokens,
        "length_exact": fit.exact,
        "ruler": spec.ruler,
        "base_task": spec.base_task,
        "template": ctx.template,
    }
    return RecallSample(
        task=spec.name,
        length=ctx.length,
        index=ctx.index,
        prompt=d.prompt,
        answer_prefix=d.answer_prefix,
        answers=list(d.answers),
        max_new_tokens=ctx.max_new_tokens,
        metric=plan.metric or spec.metric,
        metadata=meta,
    )
