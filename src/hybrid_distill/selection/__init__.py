"""Layer selection: which layers keep softmax attention.

GA-S2 (the paper's selector) and every baseline (`registry`), with one-swap candidates as independent jobs
(inline, local processes, Ray, Slurm), a noise floor from null candidates, and held-out snapshots with the paper's
early-stopping rule and racing::

    from hybrid_distill.selection import SelectionConfig, run_selection

    result = run_selection(SelectionConfig(selector="ga-s2", budgets=[0.25], stage2={"target_tokens": 20_000_000}),
                           teacher="Qwen/Qwen2.5-1.5B-Instruct", run_dir="runs/select",
                           stage1_student="runs/base/stage1/final", base_student="runs/base/stage2/final")
    result.budgets["25%"].layers
"""

from .config import SelectionConfig
from .recipe import SelectionError, SelectionUnit, run_selection, train_base_student
from .registry import BYPASS_SELECTORS, LEARNED_SELECTORS, RULE_SELECTORS, SELECTORS
from .result import BudgetSet, CandidateScoring, SelectionResult
from .rules import BudgetError, resolve_budget, resolve_budgets

__all__ = [
    "BYPASS_SELECTORS",
    "LEARNED_SELECTORS",
    "RULE_SELECTORS",
    "SELECTORS",
    "BudgetError",
    "BudgetSet",
    "CandidateScoring",
    "SelectionConfig",
    "SelectionError",
    "SelectionResult",
    "SelectionUnit",
    "resolve_budget",
    "resolve_budgets",
    "run_selection",
    "train_base_student",
]
