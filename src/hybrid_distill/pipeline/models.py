"""The models of a pipeline run: the all-linear students, the final hybrids' layer sets and names, and the
models each evaluation covers. Read by the pipeline and by the report (from the run folder alone)."""

from __future__ import annotations

from pathlib import Path

from ..layout import RunLayout
from ..selection.result import SelectionResult
from .config import RunConfig


def hybrid_name(layers: list[int], linear: str) -> str:
    """The folder name of the final hybrid with softmax ``layers`` (``hybrid-gdn-k2-L1_3``)."""
    return f"hybrid-{linear}-k{len(layers)}-L" + "_".join(str(i) for i in layers)


def base_students(config: RunConfig, layout: RunLayout) -> tuple[Path, Path]:
    """(the all-linear student after Stage 1, the one after Stage 2 — Stage 1's when the run has no Stage 2)."""
    stage1 = layout.stage("stage1").final
    return stage1, stage1 if config.stage2 is None else layout.stage("stage2").final


def final_sets(config: RunConfig, layout: RunLayout) -> dict[str, dict]:
    """Distinct layer sets chosen by any (selector, budget) or listed in ``final.extra_sets``, with who chose
    them (selector ``extra`` and the set's label for the latter)."""
    sets: dict[str, dict] = {}

    def add(layers, chosen_by: dict) -> None:
        layers = sorted(layers)
        item = sets.setdefault(hybrid_name(layers, config.linear), {"layers": layers, "chosen_by": []})
        item["chosen_by"].append(chosen_by)

    for selector in config.selectors:
        sel = SelectionResult.load(layout.selection.selection_file(selector))
        for label, entry in sel.budgets.items():
            for r, layers in enumerate(entry.sets):  # random draws several sets per budget
                who = {"selector": selector, "budget": label, "k": entry.k, "probe": sel.probe}
                add(layers, {**who, "replicate": r} if len(entry.sets) > 1 else who)
    for label, layers in config.final.extra_sets.items():
        add(layers, {"selector": "extra", "budget": str(label), "k": len(layers), "probe": None})
    return sets


def eval_models(config: RunConfig, layout: RunLayout) -> dict[str, str]:
    """Models to evaluate, by name: the teacher, the all-linear student, and each final hybrid."""
    models = {"teacher": config.teacher_spec, f"all-{config.linear}": str(base_students(config, layout)[1])}
    for name in final_sets(config, layout):
        models[name] = str(layout.model(name))
    return models


__all__ = ["base_students", "eval_models", "final_sets", "hybrid_name"]
