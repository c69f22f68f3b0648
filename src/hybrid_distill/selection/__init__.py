"""Layer selection: which layers keep softmax attention.

GA-S2 (the paper's selector) and every baseline, with one-swap candidates as independent jobs
(inline, local processes, Ray, Slurm), snapshots with rolling-Jaccard early stopping and racing::

    from hybrid_distill.selection import SelectionConfig, run_selection

    sel = run_selection(SelectionConfig(selector="ga-s2", budgets=[0.25], stage2={"target_tokens": 20_000_000}),
                        teacher="Qwen/Qwen2.5-1.5B-Instruct", run_dir="runs/select", base_student="runs/base/final")
    sel["budgets"]["25%"]["layers"]
"""

from .config import SelectionConfig
from .registry import BYPASS_SELECTORS, LEARNED_SELECTORS, RULE_SELECTORS, SELECTORS
from .rules import BudgetError, resolve_budget, resolve_budgets
from .runner import (
    SelectionError,
    load_selection,
    run_selection,
    selected_layers,
    selection_path,
    teacher_num_layers,
    train_base_student,
)

__all__ = [
    "BYPASS_SELECTORS",
    "LEARNED_SELECTORS",
    "RULE_SELECTORS",
    "SELECTORS",
    "BudgetError",
    "SelectionConfig",
    "SelectionError",
    "load_selection",
    "resolve_budget",
    "resolve_budgets",
    "run_selection",
    "selected_layers",
    "selection_path",
    "teacher_num_layers",
    "train_base_student",
]
