"""Offline RULER-style in-context recall tasks with exact token lengths.

Every sample is a :class:`RecallSample`; the model input is ``prompt + answer_prefix``
(encoded with ``add_special_tokens=False`` plus whatever special tokens the caller adds),
greedy generation of at most ``max_new_tokens`` tokens, scored with ``metric``
(see :mod:`hybrid_distill.evaluation.scoring`).

Length (as in RULER, input + generated tokens)::

    count_tokens(tok, prompt + answer_prefix) + max_new_tokens == length

``count_tokens`` counts *without* special tokens, so a caller that prepends BOS feeds
``length + 1`` positions. How the exact count is reached:

1. The haystack grows in whole *units* (sentences, needle lines, dictionary entries,
   key-value pairs, list words); the largest unit count whose prompt fits the budget
   ``length - max_new_tokens`` is found by binary search (needle/insert positions are
   fractions of the unit count, so they move with it).
2. The remaining gap (less than one unit) is filled by appending a character prefix of the
   *natural continuation* at the end of the haystack -- the next units of the same stream,
   cut mid-unit as RULER cuts its essays (``fwe``: more ``....`` noise words) -- choosing
   the prefix length (binary search, then a local scan) whose total is exact. If no prefix hits (a merge skipping the count), it
   retries from one unit fewer, then with generic fillers (``" ."``, ``" a"``, ...).
3. Failing all of that (not seen with byte-level BPE tokenizers) the closest shorter
   sample is returned with ``metadata["length_exact"] = False`` and a warning.

The continuation never adds an answer: each task validates the final text (answers occur
exactly as often as intended, keys do not collide, aggregation counts are strict) and
redraws the sample (``attempt`` + 1 in the seed) if it does not.

Seeding: each sample uses ``random.Random(sample_seed(seed, task, length, index, attempt))``
(SHA-256 of the tuple); the global RNG is never touched.

Tasks (``TASKS``): RULER's ``niah_single_1/2/3``, ``niah_multikey_1/2/3``,
``niah_multivalue``, ``niah_multiquery``, ``vt``, ``cwe``, ``fwe``, plus ``kv_retrieval``
(the layer-selection probe: dictionary of uuid keys), ``mqar`` (Zoology multi-query
associative recall as text), ``ar`` and ``ar_multihop`` (the paper's AR / AR-MH bypass probes:
the sum of the values of 3 keys; the value of a key reached through 1-2 aliases).
Differences from RULER: essay haystacks default to seeded pseudo-prose (pass ``haystack=``
a corpus path, ``"default:prose"`` or strings), word lists are embedded (no ``wonderwords``),
``vt``/``cwe`` have no one-shot example, ``fwe`` uses ``....`` as the noise word (the
question's spelling), short ``cwe`` contexts use fewer repeats (``cwe`` docstring).
"""

from __future__ import annotations

import hashlib
import random
import re
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .haystack import (
    ADJECTIVES,
    ADVERBS,
    NOISE_SENTENCES,
    NOUNS,
    VERBS,
    Haystack,
    UnitStream,
    resolve_haystack,
)

__all__ = [
    "DEFAULT_RECALL_TASKS",
    "RULER_OFFLINE_TASKS",
    "TASKS",
    "LengthError",
    "RecallSample",
    "TaskSpec",
    "count_tokens",
    "generate_samples",
    "sample_seed",
]


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
        elif self.task == "vt":
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
# Exact-length fitting


@dataclass
class _Draft:
    prompt: str
    answer_prefix: str
    answers: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.prompt + self.answer_prefix


Build = Callable[[int, str], _Draft]  # (number of haystack units, pad text) -> draft

# generic pads tried when the natural continuation cannot hit the count exactly
_FILLERS = (" ." * 200, " a" * 200, " -" * 200, "\n" * 100, " " * 50 + "." * 200)


@dataclass
class _Fit:
    draft: _Draft
    units: int
    pad: str
    tokens: int  # of prompt + answer_prefix
    exact: bool


def _fit_length(
    tokenizer: Any,
    build: Build,
    budget: int,
    n_min: int = 0,
    continuation: Callable[[int], str] | None = None,
    what: str = "task",
) -> _Fit:
    """Largest unit count fitting ``budget`` (binary search), then a pad to hit it exactly."""
    memo: dict[tuple[int, str], int] = {}

    def cost(n: int, pad: str = "") -> int:
        key = (n, pad)
        if key not in memo:
            memo[key] = count_tokens(tokenizer, build(n, pad).text)
        return memo[key]

    c0 = cost(n_min)
    if c0 > budget:
        raise LengthError(
            f"{what}: the prompt needs at least {c0} tokens but only {budget} are available "
            f"(length minus max_new_tokens); use a larger length"
        )
    probe = n_min + 4
    per_unit = max((cost(probe) - c0) / 4, 0.25)
    guess = n_min + max(1, int((budget - c0) / per_unit))
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
        return _Fit(build(n, ""), n, "", budget, True)

    candidates: list[tuple[int, str]] = []
    if continuation is not None:
        candidates.append((n, continuation(n)))
        if n > n_min:
            candidates.append((n - 1, continuation(n - 1)))
    candidates += [(n, f) for f in _FILLERS]
    for m, src in candidates:
        pad = _search_pad(lambda p, m=m: cost(m, p), src, budget)
        if pad is not None:
            return _Fit(build(m, pad), m, pad, budget, True)

    best = max(((c, k) for k, c in memo.items() if c <= budget), key=lambda t: t[0])
    (m, pad) = best[1]
    warnings.warn(f"{what}: could not reach exactly {budget} prompt tokens; using {best[0]}", stacklevel=3)
    return _Fit(build(m, pad), m, pad, best[0], False)


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


def _interleave(units: Sequence[str], items: Sequence[tuple[float, str]]) -> list[str]:
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


def _count_ci(text_lower: str, s: str) -> int:
    return text_lower.count(s.lower())


# RULER's depth grid for needle placement: 40 evenly spaced integer percents in [0, 100]
DEPTHS = tuple(round(i * 100 / 39) for i in range(40))


# ---------------------------------------------------------------------------------------
# Random values


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_pair(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


_RANDOM = {"numbers": _number, "uuids": _uuid, "words": _word_pair}


def _related(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a in b or b in a


class _Unique:
    """Draws distinct values of one kind, none a substring of (or containing) one in ``avoid``;
    ``mutual=True`` also keeps the drawn values free of such relations among themselves."""

    def __init__(self, rng: random.Random, kind: str, avoid: Sequence[str] = (), mutual: bool = False):
        self.rng, self.fn, self.seen = rng, _RANDOM[kind], set(avoid)
        self.avoid, self.mutual = list(avoid), mutual

    def __call__(self) -> str:
        for _ in range(100_000):
            v = self.fn(self.rng)
            if v not in self.seen and not any(_related(v, a) for a in self.avoid):
                self.seen.add(v)
                if self.mutual:
                    self.avoid.append(v)
                return v
        raise RuntimeError(f"ran out of distinct values ({len(self.seen)} drawn); use a shorter length")


# ---------------------------------------------------------------------------------------
# Task plumbing


@dataclass
class _Plan:
    build: Build
    validate: Callable[[_Draft], bool]
    n_min: int = 0
    continuation: Callable[[int], str] | None = None
    metric: str | None = None  # overrides the registry metric (kv_retrieval value types)


@dataclass
class _Ctx:
    task: str
    tokenizer: Any
    length: int
    index: int
    seed: int
    max_new_tokens: int
    haystack: Haystack | None


@dataclass(frozen=True)
class TaskSpec:
    """Registry entry: ``plan(ctx, rng, **options)`` builds a sample plan."""

    name: str
    plan: Callable[..., _Plan]
    max_new_tokens: int
    metric: str
    haystack: str | None  # default haystack spec, or None when the task makes its own text
    ruler: bool  # True where the task matches RULER's offline definition
    description: str


_MAX_ATTEMPTS = 20


def _make_sample(spec: TaskSpec, ctx: _Ctx, options: dict[str, Any]) -> RecallSample:
    budget = ctx.length - ctx.max_new_tokens
    if budget <= 0:
        raise LengthError(f"{spec.name}: length {ctx.length} <= max_new_tokens {ctx.max_new_tokens}")
    for attempt in range(_MAX_ATTEMPTS):
        s = sample_seed(ctx.seed, spec.name, ctx.length, ctx.index, attempt)
        plan = spec.plan(ctx, random.Random(s), **options)
        fit = _fit_length(ctx.tokenizer, plan.build, budget, plan.n_min, plan.continuation, what=spec.name)
        if plan.validate(fit.draft):
            break
    else:
        raise RuntimeError(f"{spec.name}: no valid sample after {_MAX_ATTEMPTS} attempts (haystack collisions?)")
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


# ---------------------------------------------------------------------------------------
# NIAH family

NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
NIAH_TEMPLATE_SINGLE = (
    "A special magic {type_v} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What is the special magic {type_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX_SINGLE = " The special magic {type_v} for {query} mentioned in the provided text is"
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."


def niah_question(value_type: str, query: str, plural: bool) -> tuple[str, str]:
    """(template with a ``{context}`` slot, answer prefix) for RULER's NIAH prompt."""
    if plural:
        tmpl, prefix, tv = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, value_type
    else:
        tmpl, prefix, tv = NIAH_TEMPLATE_SINGLE, NIAH_ANSWER_PREFIX_SINGLE, value_type[:-1]
    return tmpl.replace("{type_v}", tv).replace("{query}", query), prefix.format(type_v=tv, query=query)


def _join_query(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _niah_plan(
    ctx: _Ctx,
    rng: random.Random,
    *,
    haystack_type: str = "text",
    key_type: str = "words",
    value_type: str = "numbers",
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    depth: float | Sequence[float] | None = None,
) -> _Plan:
    """RULER NIAH: ``num_keys`` keys with ``num_values`` needles each; ``num_queries`` keys asked.

    ``haystack_type="text"`` uses ``ctx.haystack``; ``"needle"`` makes every line a distractor
    needle (RULER multikey_2/3). ``depth``: percent(s) for the needles (default: random
    distinct entries of RULER's 40-point depth grid).
    """
    if not 1 <= num_queries <= num_keys:
        raise ValueError("need 1 <= num_queries <= num_keys")
    keygen = _Unique(rng, key_type, mutual=True)
    keys = [keygen() for _ in range(num_keys)]
    valgen = _Unique(rng, value_type, avoid=keys, mutual=True)
    values = [[valgen() for _ in range(num_values)] for _ in keys]
    needles = [NEEDLE.format(type_v=value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    if depth is None:
        depths = rng.sample(DEPTHS, len(needles))
    elif isinstance(depth, (int, float)):
        depths = [float(depth)] * len(needles)
    else:
        depths = [float(d) for d in depth]
        if len(depths) != len(needles):
            raise ValueError(f"need {len(needles)} depths, got {len(depths)}")
    items = sorted(zip((d / 100 for d in depths), needles), key=lambda t: t[0])
    q_idx = sorted(rng.sample(range(num_keys), num_queries), reverse=True)
    queries = [keys[i] for i in q_idx]
    answers = [v for i in q_idx for v in values[i]]
    query = _join_query(queries)
    template, prefix = niah_question(value_type, query, plural=num_queries * num_values > 1)

    if haystack_type == "needle":
        dkeys = _Unique(rng, key_type, avoid=keys)
        dvals = _Unique(rng, value_type, avoid=[v for vs in values for v in vs] + keys)

        def distractors():
            while True:
                yield NEEDLE.format(type_v=value_type, key=dkeys(), value=dvals())

        stream = UnitStream(distractors(), joiner="\n")
        hay_name = "needle"
    elif haystack_type == "text":
        assert ctx.haystack is not None
        stream = ctx.haystack.stream(rng.getrandbits(64))
        hay_name = ctx.haystack.name
    else:
        raise ValueError(f"unknown haystack_type {haystack_type!r}")

    meta = {"keys": keys, "queries": queries, "depths": [d * 100 for d, _ in items], "value_type": value_type,
            "key_type": key_type, "haystack_type": hay_name}

    def build(n: int, pad: str) -> _Draft:
        context = stream.joiner.join(_interleave(stream.take(n), items)) + pad
        return _Draft(template.replace("{context}", context), prefix, answers, meta)

    def validate(d: _Draft) -> bool:
        low = d.text.lower()
        if any(_count_ci(low, a) != 1 for a in answers):
            return False
        per_key = Counter(k for k, vs in zip(keys, values) for _ in vs)
        return all(_count_ci(low, q) == per_key[q] + 2 for q in queries)

    return _Plan(build, validate, 0, lambda n: stream.continuation(n))


def _niah_task(**cfg: Any) -> Callable[..., _Plan]:
    def plan(ctx: _Ctx, rng: random.Random, **options: Any) -> _Plan:
        return _niah_plan(ctx, rng, **{**cfg, **options})

    return plan


# ---------------------------------------------------------------------------------------
# Variable tracking

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" is RULER's own spelling (its constants.py and lm-eval's copy): kept so the prompt is RULER's.
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assgined the value {query}, they are: "
)


def _vt_plan(ctx: _Ctx, rng: random.Random, num_chains: int = 1, num_hops: int = 4) -> _Plan:
    """RULER variable tracking: ``VAR X = 12345`` then ``num_hops`` re-assignments per chain.

    Chain statements are spread over the haystack in order; the answer is every variable of
    the first chain. Names are 5 upper-case letters not occurring (any case) in the text.
    """
    assert ctx.haystack is not None
    forbidden = (VT_TEMPLATE + VT_ANSWER_PREFIX + " ".join(NOISE_SENTENCES)).lower()
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names and name.lower() not in forbidden:
            names.append(name)
    values: list[int] = []
    while len(values) < num_chains:
        v = rng.randint(10000, 99999)
        if v not in values:
            values.append(v)
    chains = []
    items: list[tuple[float, str]] = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        chains.append(chain)
        stmts = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {chain[j + 1]} = VAR {chain[j]}." for j in range(num_hops)]
        items += zip(sorted(rng.random() for _ in stmts), stmts)
    items.sort(key=lambda t: t[0])
    query = str(values[0])
    stream = ctx.haystack.stream(rng.getrandbits(64))
    prefix = VT_ANSWER_PREFIX.format(num_v=num_hops + 1, query=query)
    meta = {"chains": chains, "values": values, "num_hops": num_hops}

    def build(n: int, pad: str) -> _Draft:
        context = stream.joiner.join(_interleave(stream.take(n), items)) + pad
        return _Draft(VT_TEMPLATE.format(context=context, query=query), prefix, list(chains[0]), meta)

    def validate(d: _Draft) -> bool:
        low = d.text.lower()
        for chain in chains:
            for j, name in enumerate(chain):
                if _count_ci(low, name) != (1 if j == len(chain) - 1 else 2):
                    return False
        return all(_count_ci(low, str(v)) == (3 if i == 0 else 1) for i, v in enumerate(values))

    return _Plan(build, validate, 0, lambda n: stream.continuation(n))


# ---------------------------------------------------------------------------------------
# Common / frequent words extraction

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the {num_cw} most common words "
    "in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"

_REAL_WORDS = tuple(dict.fromkeys(ADJECTIVES + NOUNS + VERBS + ADVERBS))


def _word_pool(rng: random.Random):
    """Embedded real words in seeded order, then endless pronounceable pseudo-words."""
    real = list(_REAL_WORDS)
    rng.shuffle(real)
    yield from real
    seen = set(real)
    cons, vows = "bdfgklmnprstvz", "aeiou"
    while True:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            yield w


def cwe_config(length: int) -> tuple[int, int, int]:
    """``(freq_cw, freq_ucw, num_cw)`` by length: RULER's (30, 3, 10) from 4096 tokens,
    its short-context (6, 1, 10) from 1024, and (3, 1, 5) below so that 256 tokens fit."""
    if length >= 4096:
        return 30, 3, 10
    if length >= 1024:
        return 6, 1, 10
    return 3, 1, 5


def _cwe_plan(
    ctx: _Ctx,
    rng: random.Random,
    freq_cw: int | None = None,
    freq_ucw: int | None = None,
    num_cw: int | None = None,
) -> _Plan:
    """RULER common words extraction (no one-shot example): ``num_cw`` words ``freq_cw`` times,
    the haystack units are uncommon words ``freq_ucw`` times each, shuffled, numbered."""
    d_cw, d_ucw, d_num = cwe_config(ctx.length)
    freq_cw, freq_ucw, num_cw = freq_cw or d_cw, freq_ucw or d_ucw, num_cw or d_num
    if freq_cw <= freq_ucw + 1:
        raise ValueError("need freq_cw > freq_ucw + 1 (a truncated tail item may add one occurrence)")
    template = CWE_TEMPLATE.replace("{num_cw}", str(num_cw))
    prefix = CWE_ANSWER_PREFIX.format(num_cw=num_cw)
    fixed_text = (template + prefix).lower()
    pool = _word_pool(rng)
    common: list[str] = []
    while len(common) < num_cw:
        w = next(pool)
        if w not in fixed_text and not any(_related(w, c) for c in common):
            common.append(w)

    def uncommon_gen():
        for w in pool:
            if not any(_related(w, c) for c in common):
                yield w

    uncommon = UnitStream(uncommon_gen())
    shuffle_seed = rng.getrandbits(64)
    meta = {"freq_cw": freq_cw, "freq_ucw": freq_ucw, "num_cw": num_cw}

    def items(n: int) -> list[str]:
        words = common * freq_cw + uncommon.take(n) * freq_ucw
        random.Random(shuffle_seed + n).shuffle(words)
        return words

    def build(n: int, pad: str) -> _Draft:
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items(n))) + pad
        return _Draft(template.replace("{context}", context), prefix, list(common), meta)

    def continuation(n: int) -> str:
        start = num_cw * freq_cw + n * freq_ucw
        extra = uncommon.take(n + 8)[n:]
        return "".join(f" {start + k + 1}. {w}" for k, w in enumerate(extra))

    def validate(d: _Draft) -> bool:
        body = d.prompt.split("\n")[1]
        counts = Counter(re.findall(r"\d+\. ([a-z]+)", body))
        top = min(counts[c] for c in common)
        rest = max((v for w, v in counts.items() if w not in common), default=0)
        return top > rest

    return _Plan(build, validate, 0, continuation)


FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
    "dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_NOISE = "...."


def _zeta(alpha: float, terms: int = 10_000) -> float:
    return sum(k**-alpha for k in range(1, terms + 1)) + terms ** (1 - alpha) / (alpha - 1)


def fwe_counts(num_words: int, alpha: float = 2.0) -> list[int]:
    """Zipf counts ``floor(N k^-alpha / zeta(alpha))`` for ranks 1..K; ranks 2-4 are raised where
    needed so that ``c2 > c3 > c4 > c5`` (ties happen for small N)."""
    z = _zeta(alpha)
    counts = []
    k = 1
    while True:
        c = int(num_words * k**-alpha / z)
        if c < 1 and k > 5:
            break
        counts.append(c)
        k += 1
    for i in (3, 2, 1):
        counts[i] = max(counts[i], counts[i + 1] + 1)
    return counts


def _fwe_plan(ctx: _Ctx, rng: random.Random, alpha: float = 2.0, word_len: int = 6) -> _Plan:
    """RULER frequent words extraction: coded words with Zipf(alpha) counts; the top word is the
    noise ``....``; the gold answers are ranks 2-4. Haystack units = total word count N."""
    forbidden = (FWE_TEMPLATE + FWE_ANSWER_PREFIX).lower()

    def vocab_gen():
        seen: set[str] = set()
        while True:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(word_len))
            if w not in seen and w not in forbidden:
                seen.add(w)
                yield w

    vocab = UnitStream(vocab_gen())
    shuffle_seed = rng.getrandbits(64)
    answers = vocab.take(3)
    meta = {"alpha": alpha}

    def build(n: int, pad: str) -> _Draft:
        counts = fwe_counts(n, alpha)
        words = [FWE_NOISE] * counts[0]
        for w, c in zip(vocab.take(len(counts) - 1), counts[1:]):
            words += [w] * c
        random.Random(shuffle_seed + n).shuffle(words)
        context = " ".join(words) + pad
        return _Draft(FWE_TEMPLATE.replace("{context}", context), FWE_ANSWER_PREFIX, list(answers), meta)

    def validate(d: _Draft) -> bool:
        body = d.prompt[len(FWE_TEMPLATE.split("{context}")[0]) :].split("\nQuestion:")[0]
        counts = Counter(w for w in body.split() if w.strip("."))
        ranked = counts.most_common()
        if [w for w, _ in ranked[:3]] != answers:
            return False
        c = [v for _, v in ranked] + [0]
        return c[0] > c[1] > c[2] > c[3]

    return _Plan(build, validate, 8, lambda n: (" " + FWE_NOISE) * 64)


# ---------------------------------------------------------------------------------------
# Key-value retrieval (layer-selection probe) and MQAR

KV_TEMPLATE = "Memorize the following dictionary:\n{{{context}}}\n"
KV_ANSWER_PREFIX = "The value of the key '{key}' is"


def _kv_plan(
    ctx: _Ctx,
    rng: random.Random,
    value_type: str = "int",
    value_range: tuple[int, int] = (0, 100),
    depth: float | None = None,
) -> _Plan:
    """Dictionary of uuid keys; ask one key. ``value_type``: ``"int"`` (in ``value_range``, as in
    the probe; distractors never share the answer's value; metric ``first_int_exact``),
    ``"numbers"`` (7 digits, ``first_int_exact``) or ``"uuids"`` (``string_match_all``)."""
    if value_type not in ("int", "numbers", "uuids"):
        raise ValueError(f"value_type must be int, numbers or uuids, got {value_type!r}")
    key = _uuid(rng)
    keys = _Unique(rng, "uuids", avoid=[key])
    if value_type == "int":
        lo, hi = value_range
        answer = str(rng.randint(lo, hi))
        others = [str(v) for v in range(lo, hi + 1) if str(v) != answer]

        def value() -> str:
            return rng.choice(others)
    else:
        answer = _RANDOM[value_type](rng)
        vals = _Unique(rng, value_type, avoid=[answer])

        def value() -> str:
            return vals()

    def fmt(k: str, v: str) -> str:
        return f'"{k}": "{v}"' if value_type == "uuids" else f'"{k}": {v}'

    def entries():
        while True:
            yield fmt(keys(), value())

    stream = UnitStream(entries(), joiner=", ")
    frac = (rng.choice(DEPTHS) if depth is None else depth) / 100
    item = [(frac, fmt(key, answer))]
    prefix = KV_ANSWER_PREFIX.format(key=key)
    meta = {"key": key, "value_type": value_type, "depths": [frac * 100]}

    def build(n: int, pad: str) -> _Draft:
        context = stream.joiner.join(_interleave(stream.take(n), item)) + pad
        return _Draft(KV_TEMPLATE.format(context=context), prefix, [answer], meta)

    def validate(d: _Draft) -> bool:
        low = d.text.lower()
        if _count_ci(low, key) != 2:
            return False
        if value_type == "uuids":
            return _count_ci(low, answer) == 1
        return len(re.findall(rf'": {answer}(?=[,}}])', d.prompt)) == 1

    metric = "string_match_all" if value_type == "uuids" else "first_int_exact"
    return _Plan(build, validate, 0, lambda n: stream.continuation(n), metric=metric)


MQAR_TEMPLATE = (
    "Memorize the following key-value pairs. Each key is followed by its value.\n{context}\n"
    "Give the value of each of these keys, in this order: {queries}\n"
)
MQAR_ANSWER_PREFIX = "Values:"


def _mqar_plan(ctx: _Ctx, rng: random.Random, num_queries: int = 8) -> _Plan:
    """Zoology-style MQAR as text: ``k1 v1 k2 v2 ...`` (keys: lower-case letters, values: digits
    of one fixed width), then ``num_queries`` keys; the answer is their values in order
    (``mqar_accuracy`` scores each position). Key/value widths grow with ``length`` so that
    the pairs filling the context stay distinct."""
    max_pairs = ctx.length // 2 + num_queries  # a pair takes at least 2 tokens
    digits = 3
    while 9 * 10 ** (digits - 1) < 2 * max_pairs:
        digits += 1
    letters = 3 if 26**3 >= 4 * max_pairs else 4
    fixed = (MQAR_TEMPLATE + MQAR_ANSWER_PREFIX).lower()
    seen_k: set[str] = set()
    seen_v: set[str] = set()

    def new_key() -> str:
        while True:
            k = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(letters))
            if k not in seen_k and k not in fixed:
                seen_k.add(k)
                return k

    def new_value() -> str:
        while True:
            v = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
            if v not in seen_v:
                seen_v.add(v)
                return v

    qkeys = [new_key() for _ in range(num_queries)]
    qvals = [new_value() for _ in range(num_queries)]
    items = sorted(zip((rng.random() for _ in qkeys), (f"{k} {v}" for k, v in zip(qkeys, qvals))), key=lambda t: t[0])
    order = list(range(num_queries))
    rng.shuffle(order)
    queries = [qkeys[i] for i in order]
    answers = [qvals[i] for i in order]

    def pairs():
        while True:
            yield f"{new_key()} {new_value()}"

    stream = UnitStream(pairs(), joiner=" ")
    prompt_tail = " ".join(queries)
    meta = {"queries": queries, "query_values": answers, "value_digits": digits, "key_letters": letters}

    def build(n: int, pad: str) -> _Draft:
        context = " ".join(_interleave(stream.take(n), items)) + pad
        return _Draft(MQAR_TEMPLATE.format(context=context, queries=prompt_tail), MQAR_ANSWER_PREFIX, answers, meta)

    def validate(d: _Draft) -> bool:
        low = d.text.lower()
        return all(_count_ci(low, a) == 1 for a in answers) and all(_count_ci(low, q) == 2 for q in queries)

    return _Plan(build, validate, 0, lambda n: stream.continuation(n))


# ---------------------------------------------------------------------------------------
# Associative recall with aggregation (AR) and through alias chains (AR-multihop): the
# paper's task-guided bypass probes (Table 5, "AR" and "AR-MH").


def _code_keys(rng: random.Random, length: int, forbidden: str) -> Callable[[], str]:
    """Distinct lower-case letter codes of one width (4 letters, more when ``length`` could need
    too many for that), none occurring in ``forbidden``. One width means no code is a substring of
    another; codes only ever stand between non-letters, so counting them in the text is exact."""
    max_units = length // 2 + 16
    width = 4
    while 26**width < 8 * max_units:
        width += 1
    seen: set[str] = set()

    def new() -> str:
        for _ in range(100_000):
            k = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(width))
            if k not in seen and k not in forbidden:
                seen.add(k)
                return k
        raise RuntimeError(f"ran out of distinct keys ({len(seen)} drawn)")  # pragma: no cover

    return new


AR_TEMPLATE = (
    "Memorize the following dictionary:\n{{{context}}}\n"
    "Question: What is the sum of the values of the keys {query}?\n"
)
AR_ANSWER_PREFIX = "Answer: The sum of the values is"


def _ar_plan(
    ctx: _Ctx,
    rng: random.Random,
    num_queries: int = 3,
    value_range: tuple[int, int] = (0, 9),
    min_sum: int | None = None,
) -> _Plan:
    """Associative recall with aggregation (the paper's AR probe): a dictionary ``"key": value`` of
    letter-code keys and small ints in ``value_range``; the question names ``num_queries`` keys
    (in an order unrelated to their positions) and the answer is the SUM of their values.

    Each asked key occurs exactly once in the dictionary (and once in the question). The asked
    values are redrawn until their sum is at least ``min_sum`` (default: the largest value + 1),
    so by default the answer never occurs in the context: it must be computed, not copied.
    Metric ``first_int_exact``."""
    lo, hi = (int(v) for v in value_range)
    if not 0 <= lo <= hi:
        raise ValueError(f"need 0 <= value_range[0] <= value_range[1], got {value_range}")
    if num_queries < 1:
        raise ValueError("need num_queries >= 1")
    min_sum = hi + 1 if min_sum is None else int(min_sum)
    if num_queries * hi < min_sum:
        raise ValueError(f"{num_queries} values <= {hi} cannot sum to min_sum={min_sum}")
    new_key = _code_keys(rng, ctx.length, (AR_TEMPLATE + AR_ANSWER_PREFIX).lower())
    keys = [new_key() for _ in range(num_queries)]
    while True:
        values = [rng.randint(lo, hi) for _ in keys]
        if sum(values) >= min_sum:
            break
    answer = str(sum(values))
    depths = sorted(rng.sample(DEPTHS, num_queries))
    items = [(dp / 100, f'"{k}": {v}') for dp, k, v in zip(depths, keys, values)]
    order = list(range(num_queries))
    rng.shuffle(order)
    asked = [keys[i] for i in order]
    query = _join_query([f'"{k}"' for k in asked])

    def entries():
        while True:
            yield f'"{new_key()}": {rng.randint(lo, hi)}'

    stream = UnitStream(entries(), joiner=", ")
    meta = {"keys": asked, "values": [values[i] for i in order], "depths": depths,
            "value_range": [lo, hi]}

    def build(n: int, pad: str) -> _Draft:
        context = stream.joiner.join(_interleave(stream.take(n), items)) + pad
        return _Draft(AR_TEMPLATE.format(context=context, query=query), AR_ANSWER_PREFIX, [answer], meta)

    def validate(d: _Draft) -> bool:
        low = d.text.lower()
        if any(_count_ci(low, k) != 2 for k in keys):
            return False
        if any(re.findall(rf'"{k}": (\d+)', d.prompt) != [str(v)] for k, v in zip(keys, values)):
            return False
        return int(answer) <= hi or re.search(rf"(?<!\d){answer}(?!\d)", d.prompt) is None

    return _Plan(build, validate, 0, lambda n: stream.continuation(n))


AR_MH_TEMPLATE = (
    "Memorize the following facts. A fact either gives the value of a key or another name for a key "
    "or for another name.\n{context}\nQuestion: What is the value of {query}?\n"
)
AR_MH_ANSWER_PREFIX = "Answer: The value of {query} is"
AR_MH_ALIAS = "{name} is also called {alias}."
AR_MH_VALUE = "{key}: {value}."


def _ar_multihop_plan(
    ctx: _Ctx,
    rng: random.Random,
    hops: int | None = None,
    value_range: tuple[int, int] = (0, 99),
    alias_rate: float = 0.3,
) -> _Plan:
    """Associative recall through alias chains (the paper's AR-MH probe). Facts, one a line:
    ``key: value.`` or ``name is also called alias.``. The asked name is an alias ``hops`` steps
    (default: 1 or 2, drawn per sample) away from a key: ``K: V.``, ``K is also called A1.``,
    ``A1 is also called A2.``, question ``What is the value of A2?``, answer ``V``. The chain's
    facts sit at random depths in random order; distractor facts include aliases (a fraction
    ``alias_rate``) of earlier distractor names. ``V`` (an int in ``value_range``) occurs exactly once:
    no distractor has that value. Metric ``first_int_exact``."""
    if hops is None:
        hops = rng.choice((1, 2))
    if int(hops) < 1:
        raise ValueError("need hops >= 1")
    hops = int(hops)
    lo, hi = (int(v) for v in value_range)
    if not 0 <= lo < hi:
        raise ValueError(f"need 0 <= value_range[0] < value_range[1], got {value_range}")
    forbidden = (AR_MH_TEMPLATE + AR_MH_ANSWER_PREFIX + AR_MH_ALIAS + AR_MH_VALUE).lower()
    new_name = _code_keys(rng, ctx.length, forbidden)
    chain = [new_name() for _ in range(hops + 1)]  # key, alias 1, ..., alias hops (asked)
    answer = str(rng.randint(lo, hi))
    others = [v for v in range(lo, hi + 1) if str(v) != answer]
    stmts = [AR_MH_VALUE.format(key=chain[0], value=answer)]
    stmts += [AR_MH_ALIAS.format(name=a, alias=b) for a, b in zip(chain, chain[1:])]
    rng.shuffle(stmts)
    depths = sorted(rng.sample(DEPTHS, len(stmts)))
    items = [(dp / 100, st) for dp, st in zip(depths, stmts)]
    query = chain[-1]

    def facts():
        names: list[str] = []
        while True:
            if names and rng.random() < alias_rate:
                src = rng.choice(names[-64:])
                alias = new_name()
                names.append(alias)
                yield AR_MH_ALIAS.format(name=src, alias=alias)
            else:
                key = new_name()
                names.append(key)
                yield AR_MH_VALUE.format(key=key, value=rng.choice(others))

    stream = UnitStream(facts(), joiner="\n")
    prefix = AR_MH_ANSWER_PREFIX.format(query=query)
    meta = {"chain": chain, "query": query, "hops": hops, "depths": depths}

    def build(n: int, pad: str) -> _Draft:
        context = stream.joiner.join(_interleave(stream.take(n), items)) + pad
        return _Draft(AR_MH_TEMPLATE.format(context=context, query=query), prefix, [answer], meta)

    def validate(d: _Draft) -> bool:
        low = d.text.lower()
        if any(_count_ci(low, name) != 2 for name in chain[:-1]) or _count_ci(low, query) != 3:
            return False
        return re.findall(r": (\d+)", d.prompt).count(answer) == 1

    return _Plan(build, validate, 0, lambda n: stream.continuation(n))


# ---------------------------------------------------------------------------------------
# Registry and public entry point


def _spec(name, plan, max_new_tokens, metric, haystack, ruler, description):
    return TaskSpec(name, plan, max_new_tokens, metric, haystack, ruler, description)


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        _spec("niah_single_1", _niah_task(), 128, "string_match_all", "noise", True,
              "one needle (word key -> 7-digit number) in RULER's noise sentences"),
        _spec("niah_single_2", _niah_task(), 128, "string_match_all", "prose", False,
              "one needle (word key -> number) in prose (RULER: essays)"),
        _spec("niah_single_3", _niah_task(value_type="uuids"), 128, "string_match_all", "prose", False,
              "one needle (word key -> uuid) in prose"),
        _spec("niah_multikey_1", _niah_task(num_keys=4), 128, "string_match_all", "prose", False,
              "4 needles with different keys in prose, one asked"),
        _spec("niah_multikey_2", _niah_task(haystack_type="needle"), 128, "string_match_all", None, True,
              "every line a needle (word keys -> numbers), one asked"),
        _spec("niah_multikey_3", _niah_task(haystack_type="needle", key_type="uuids", value_type="uuids"), 128,
              "string_match_all", None, True, "every line a needle (uuid keys -> uuids), one asked"),
        _spec("niah_multivalue", _niah_task(num_values=4), 128, "string_match_all", "prose", False,
              "4 values for one key in prose, all asked"),
        _spec("niah_multiquery", _niah_task(num_keys=4, num_queries=4), 128, "string_match_all", "prose", False,
              "4 keys in prose, all asked"),
        _spec("vt", _vt_plan, 30, "string_match_all", "noise", True,
              "variable tracking: 1 chain of 4 hops in noise"),
        _spec("cwe", _cwe_plan, 120, "string_match_all", None, True,
              "common words extraction from a numbered word list"),
        _spec("fwe", _fwe_plan, 50, "string_match_all", None, True,
              "frequent coded words (Zipf alpha=2), ranks 2-4"),
        _spec("kv_retrieval", _kv_plan, 8, "first_int_exact", None, False,
              "JSON-like dictionary of uuid keys -> ints 0-100, one key asked"),
        _spec("mqar", _mqar_plan, 64, "mqar_accuracy", None, False,
              "multi-query associative recall as text, 8 queries scored per query"),
        _spec("ar", _ar_plan, 8, "first_int_exact", None, False,
              "associative recall: dictionary of letter keys -> ints 0-9, the sum of 3 asked keys"),
        _spec("ar_multihop", _ar_multihop_plan, 8, "first_int_exact", None, False,
              "associative recall through 1-2 alias hops (key: value / name is also called alias)"),
    )
}

# RULER's offline-capable tasks: RULER's templates, needles, answer prefixes and scoring (their average is
# reported as "ruler"). Layout differs in one respect: the noise haystack of niah_single_1 runs RULER's
# sentences together with spaces and places the needle on the depth grid (DEPTHS) of the NIAH grid, where
# RULER joins whole noise paragraphs with newlines and inserts the needle at a random paragraph.
RULER_OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe")

# Default recall suite: retrieval-type tasks only (cwe/fwe test aggregation, not recall).
DEFAULT_RECALL_TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "kv_retrieval",
    "mqar",
)


def generate_samples(
    task: str,
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    haystack: Any = None,
    **task_options: Any,
) -> list[RecallSample]:
    """``num_samples`` samples of ``task`` whose input + ``max_new_tokens`` is ``length`` tokens.

    ``haystack``: see :func:`~hybrid_distill.evaluation.haystack.resolve_haystack`; used by the
    text-haystack tasks (default per ``TASKS[task].haystack``) and ignored by tasks that make
    their own text (``niah_multikey_2/3``, ``cwe``, ``fwe``, ``kv_retrieval``, ``mqar``).
    ``task_options``: ``max_new_tokens`` plus the task's own options (its plan docstring).
    Sample ``i`` depends only on ``(seed, task, length, i)`` and the options.
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    spec = TASKS[task]
    max_new = task_options.pop("max_new_tokens", None)
    if max_new is None:
        max_new = spec.max_new_tokens
        if task == "mqar" and "num_queries" in task_options:
            max_new = max(16, 8 * int(task_options["num_queries"]))
    hay = resolve_haystack(haystack, default=spec.haystack) if spec.haystack is not None else None
    return [
        _make_sample(spec, _Ctx(task, tokenizer, int(length), i, int(seed), int(max_new), hay), dict(task_options))
        for i in range(num_samples)
    ]
