"""The models of a pipeline run: the all-linear students, the final hybrids' layer sets and names, and the
models each evaluation covers. Read by the pipeline and by the report (from the run folder alone)."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import StepRecord
from ..errors import HybridDistillError
from ..layout import RunLayout
from ..selection.result import SelectionResult
from ..surgery import model_identity
from .config import RunConfig

WEIGHTS_GLOB = "*.safetensors"


class MissingWeightsError(HybridDistillError, FileNotFoundError):
    """A step needs the weights of a final hybrid whose run folder was packed without them."""


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


def saved_model_identity(layout: RunLayout, name: str) -> dict[str, str]:
    """What ``models/<name>`` is, for its evaluation's settings key: the `model_identity` its step recorded when
    the model was saved (a finished evaluation keeps its key in a run folder packed without the hybrid's weights),
    else that of its files."""
    folder = layout.model(name)
    record = StepRecord.read(folder)
    recorded = (record.result or {}).get("identity") if record is not None and record.state == "done" else None
    return recorded or model_identity(str(folder))


def hybrid_finished(layout: RunLayout, name: str, exports: bool) -> bool:
    """Whether final hybrid ``name`` needs its weights no more: its training run is done, ``models/<name>`` is
    saved from that run with its identity recorded, ``eval/<name>`` is done on that identity and (``exports``:
    the run exports its hybrids) ``exports/<name>`` is made from that saved model. A run under other settings
    later (another evaluation, export or training) needs them again."""
    train = StepRecord.read(layout.final_run(name).root)
    model = StepRecord.read(layout.model(name))
    evaluation = StepRecord.read(layout.eval(name))
    export = StepRecord.read(layout.export(name))
    if not all(r is not None and r.state == "done" for r in (train, model, evaluation)):
        return False
    identity = (model.result or {}).get("identity")
    if identity is None or model.upstream != {"final": train.run_id} or evaluation.settings.get("model") != identity:
        return False
    return not exports or (export is not None and export.state == "done" and export.upstream == {"model": model.run_id})


def require_weights(layout: RunLayout, name: str, needed_by: str) -> Path:
    """``models/<name>``, or MissingWeightsError naming it when its weights are not there."""
    folder = layout.model(name)
    if folder.is_dir() and not any(folder.glob(WEIGHTS_GLOB)):
        raise MissingWeightsError(
            f"{needed_by} needs the weights of {folder}, and it holds none ({WEIGHTS_GLOB}): they were left out when "
            f"the run folder was packed (scripts/run_state.py pack leaves out the weights of final hybrids that are "
            f"trained, saved, evaluated and exported). Run it where the weights are (pack with --keep-hybrid-weights), "
            f"or delete {layout.final_run(name).root} and {folder} to train the hybrid again"
        )
    return folder


__all__ = ["WEIGHTS_GLOB", "MissingWeightsError", "base_students", "eval_models", "final_sets", "hybrid_finished",
           "hybrid_name", "require_weights", "saved_model_identity"]
