"""The recall task registry (``TASKS``), its task lists and :func:`generate_samples`.

Tasks: RULER's ``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``,
``niah_multiquery``, ``vt``, ``cwe``, ``fwe``, plus ``kv_retrieval`` (the layer-selection probe:
dictionary of uuid keys), ``mqar`` (Zoology multi-query associative recall as text), ``ar`` and
``ar_multihop`` (the paper's AR / AR-MH bypass probes: the sum of the values of 3 keys; the value of
a key reached through 1-2 aliases), and named variants (``vt_2chains``, ``vt_3chains``: 2 or 3
chains of 4 hops, the first one asked).
Differences from RULER: essay haystacks default to seeded pseudo-prose (pass ``haystack=`` strings
or a corpus read by :func:`hybrid_distill.data.read_haystack`), word lists are embedded (no
``wonderwords``), ``vt``/``cwe`` have no one-shot example, ``fwe`` uses ``....`` as the noise word
(the question's spelling), short ``cwe`` contexts use fewer repeats (``cwe_config``).

Every task has two template families (``template=``): ``"eval"`` (the default; RULER's wording where
the task is RULER's) and ``"train"``, a different wording of instruction, question, answer prefix and
facts for training documents that share no template text with the evaluation. A sample of either
family is scored the same way, and its ``completion`` scores 1.0.
"""

from __future__ import annotations

from typing import Any

from .aggregation import cwe_plan, fwe_plan
from .ar import ar_multihop_plan, ar_plan
from .base import TEMPLATE_FAMILIES, RecallSample, TaskContext, TaskSpec, configured, make_sample
from .haystack import resolve_haystack
from .kv import kv_plan, mqar_plan
from .niah import niah_plan
from .vt import vt_plan

# Default haystack of the ``train`` family where the task's default is RULER's noise sentences.
TRAIN_HAYSTACKS = {"noise": "train_noise"}

TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("niah_single_1", niah_plan, 128, "string_match_all", "noise", True,
                 "one needle (word key -> 7-digit number) in RULER's noise sentences", "niah"),
        TaskSpec("niah_single_2", niah_plan, 128, "string_match_all", "prose", False,
                 "one needle (word key -> number) in prose (RULER: essays)", "niah"),
        TaskSpec("niah_single_3", configured(niah_plan, value_type="uuids"), 128, "string_match_all", "prose", False,
                 "one needle (word key -> uuid) in prose", "niah"),
        TaskSpec("niah_multikey_1", configured(niah_plan, num_keys=4), 128, "string_match_all", "prose", False,
                 "4 needles with different keys in prose, one asked", "niah"),
        TaskSpec("niah_multikey_2", configured(niah_plan, haystack_type="needle"), 128, "string_match_all", None, True,
                 "every line a needle (word keys -> numbers), one asked", "niah"),
        TaskSpec("niah_multikey_3", configured(niah_plan, haystack_type="needle", key_type="uuids", value_type="uuids"), 128,
                 "string_match_all", None, True, "every line a needle (uuid keys -> uuids), one asked", "niah"),
        TaskSpec("niah_multivalue", configured(niah_plan, num_values=4), 128, "string_match_all", "prose", False,
                 "4 values for one key in prose, all asked", "niah"),
        TaskSpec("niah_multiquery", configured(niah_plan, num_keys=4, num_queries=4), 128, "string_match_all", "prose", False,
                 "4 keys in prose, all asked", "niah"),
        TaskSpec("vt", vt_plan, 30, "string_match_all", "noise", True,
                 "variable tracking: 1 chain of 4 hops in noise", "vt"),
        TaskSpec("vt_2chains", configured(vt_plan, num_chains=2), 30,
                 "string_match_all", "noise", False, "variable tracking: 2 chains of 4 hops in noise, one asked", "vt"),
        TaskSpec("vt_3chains", configured(vt_plan, num_chains=3), 30,
                 "string_match_all", "noise", False, "variable tracking: 3 chains of 4 hops in noise, one asked", "vt"),
        TaskSpec("cwe", cwe_plan, 120, "string_match_all", None, True,
                 "common words extraction from a numbered word list", "cwe"),
        TaskSpec("fwe", fwe_plan, 50, "string_match_all", None, True,
                 "frequent coded words (Zipf alpha=2), ranks 2-4", "fwe"),
        TaskSpec("kv_retrieval", kv_plan, 8, "first_int_exact", None, False,
                 "JSON-like dictionary of uuid keys -> ints 0-100, one key asked", "kv_retrieval"),
        TaskSpec("mqar", mqar_plan, 64, "mqar_accuracy", None, False,
                 "multi-query associative recall as text, 8 queries scored per query", "mqar"),
        TaskSpec("ar", ar_plan, 8, "first_int_exact", None, False,
                 "associative recall: dictionary of letter keys -> ints 0-9, the sum of 3 asked keys", "ar"),
        TaskSpec("ar_multihop", ar_multihop_plan, 8, "first_int_exact", None, False,
                 "associative recall through 1-2 alias hops (key: value / name is also called alias)", "ar_multihop"),
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
    *,
    template: str = "eval",
    exact_length: bool = True,
    **task_options: Any,
) -> list[RecallSample]:
    """``num_samples`` samples of ``task`` whose input + ``max_new_tokens`` is ``length`` tokens.

    ``haystack``: see :func:`~hybrid_distill.tasks.haystack.resolve_haystack`; used by the
    text-haystack tasks (default per ``TASKS[task].haystack``; the ``train`` family replaces RULER's
    noise by its own, ``TRAIN_HAYSTACKS``) and ignored by tasks that make their own text
    (``niah_multikey_2/3``, ``cwe``, ``fwe``, ``kv_retrieval``, ``mqar``, ``ar``, ``ar_multihop``).
    ``template``: a ``TEMPLATE_FAMILIES`` entry. ``exact_length=False`` fits the length approximately
    (:func:`~hybrid_distill.tasks.base.fit_length_approx`: at most ``length`` tokens, a few percent
    fewer, about 10x faster; for training documents). ``task_options``: ``max_new_tokens`` plus the
    task's own options (its plan docstring). Sample ``i`` depends only on ``(seed, task, length, i)``,
    the template family and the options.
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if template not in TEMPLATE_FAMILIES:
        raise ValueError(f"unknown template family {template!r}; known: {list(TEMPLATE_FAMILIES)}")
    spec = TASKS[task]
    max_new = task_options.pop("max_new_tokens", None)
    if max_new is None:
        max_new = spec.max_new_tokens
        if spec.base_task == "mqar" and "num_queries" in task_options:
            max_new = max(16, 8 * int(task_options["num_queries"]))
    hay = None
    if spec.haystack is not None:
        default = TRAIN_HAYSTACKS.get(spec.haystack, spec.haystack) if template == "train" else spec.haystack
        hay = resolve_haystack(haystack, default=default)
    return [
        make_sample(spec, TaskContext(task, tokenizer, int(length), i, int(seed), int(max_new), hay, template,
                                      bool(exact_length)), dict(task_options))
        for i in range(num_samples)
    ]
