"""``hybrid-distill select``: score layers with one selector and write ``selection.json`` plus plots.

The recipe owns the selection folder (`SelectionLayout`; several selectors may share one folder and its
candidates), trains the candidates a selector needs (`candidates`, in rounds by `scoring`, fanned out by
`executors`), gathers bypass or task scores for the baselines, asks the selector (`registry`) for its sets, and
writes a `SelectionResult`::

    run_dir/
      base/stage1, base/stage2        the all-linear student, when none is given
      candidates/<family>/<name>/     one candidate each (ga-stage1/layer_03-seed0, null-stage1/null0-seed1, ...)
      scores/<selector>/step.json     a bypass or task selector's per-layer scores, reused under the same settings
      <selector>/selection.json       scores, rankings, snapshots, noise floor, sets per budget, tokens, config
      <selector>/*.png                importance, selected layers per budget, KL curves with the null band, stability
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..artifacts import FolderLock, Step
from ..checkpoint import verify_checkpoint, weights_fingerprint
from ..config import ConfigError, add_flags, flag_values, parse_int, read_config_file
from ..data import DataConfig, add_data_flags, data_config_from_flags
from ..distill import DistillConfig, distill
from ..errors import HybridDistillError
from ..fileio import check_output_folder
from ..layout import SelectionLayout
from ..surgery import (
    build_student,
    check_student_fits_teacher,
    load_teacher,
    load_tokenizer,
    model_identity,
    teacher_config,
    teacher_num_layers,
)
from . import bypass, plots, rules
from .candidates import (
    CandidateJob,
    candidate_folder,
    candidate_name,
    candidate_step,
    heldout_batches,
    run_candidate,
)
from .config import SelectionConfig
from .executors import make_executor
from .registry import SELECTORS, TASK_SELECTORS, SelectInputs
from .replay import replay_selection
from .result import BudgetSet, SelectionResult
from .scoring import (
    FamilyScores,
    Member,
    candidate_families,
    noise_floors,
    score_family,
    score_tables,
    snapshot_sets,
)

# A bypass-task selector means nothing when the teacher cannot do its task: below this accuracy it says so.
MIN_TEACHER_TASK_ACCURACY = 0.1


class SelectionError(HybridDistillError):
    """Selection could not produce a layer set (e.g. too many candidates failed)."""


@dataclass(frozen=True)
class SelectionUnit:
    """A unit of selection work about to start, for a caller that budgets its time (`run_selection`'s
    ``before_unit``, which may stop the selection by raising): a candidate family (``source`` "candidates": one
    kind and start, its null candidates and seed repeats, trained in lockstep rounds) with the Stage-1 and Stage-2
    tokens its unfinished candidates train at most, or a selector's bypass or task scoring (``source`` "bypass" or
    "task")."""

    name: str
    source: str
    selector: str
    stage1_tokens: int = 0
    stage2_tokens: int = 0


def candidate_tokens(config: SelectionConfig) -> tuple[int, int]:
    """(Stage-1, Stage-2) tokens one candidate trains over its whole budget (Stage 1: none unless configured)."""
    stage1_cfg = config.stage_config(1)
    return (0 if stage1_cfg is None else stage1_cfg.total_tokens), config.stage_config(2).total_tokens


# ----------------------------------------------------------------------------------------------
# The all-linear base student


def train_base_student(teacher: str, run_dir: str | Path, data: DataConfig, probe: str, stage1: dict[str, Any],
                       stage2: dict[str, Any] | None, mixer_options: dict | None = None, tokenizer: str | None = None,
                       seed: int = 0) -> tuple[str, str]:
    """Distill the all-``probe`` student (Stage 1, then Stage 2 unless ``stage2`` is None) into
    ``run_dir/base/stage1`` and ``run_dir/base/stage2``; returns (Stage-1 final folder, base final folder)."""
    layout = SelectionLayout(run_dir)
    teacher_model = load_teacher(teacher, dtype=torch.float32)
    tok = load_tokenizer(teacher, tokenizer, teacher_model.config.vocab_size)
    torch.manual_seed(seed)
    student = build_student(teacher_model, [probe] * teacher_model.config.num_hidden_layers, mixer_options).float()
    identity = {"teacher": model_identity(teacher), "data": data.identity()}
    finals: list[str] = []
    for number, overrides in ((1, stage1), (2, stage2)):
        if overrides is None:
            finals.append(finals[-1])
            continue
        cfg = DistillConfig.from_dict({"seed": seed, **overrides, "stage": number, "save_final_model": True})
        cfg = cfg.replace(seq_len=cfg.data_seq_len)
        ds = data.load(tok, cfg.seq_len, seed=seed, require_sequences=cfg.global_batch_size)
        result = distill(student, teacher_model, ds, cfg, layout.base(number).root, tokenizer=tok, identity=identity)
        finals.append(result.final_model_dir)
    return finals[0], finals[1]


# ----------------------------------------------------------------------------------------------
# Scores


def bypass_scores(config: SelectionConfig, teacher: str, tokenizer: str | None, data: DataConfig
                  ) -> tuple[dict[int, float], dict[str, Any], str | None]:
    """(importance per layer, details, why the scores mean nothing or None) of a bypass or task selector."""
    model = load_teacher(teacher, dtype=torch.float32)
    if torch.cuda.is_available():
        model.cuda()
    tok = load_tokenizer(teacher, tokenizer, model.config.vocab_size)
    name = config.base_selector
    if name in ("act-mse", "lm-ppl"):
        seq = min(config.task_length, getattr(model.config, "max_position_embeddings", config.task_length))
        batches = heldout_batches(data.load(tok, seq, seed=config.seed), config.batch_size, config.bypass_batches,
                                  purpose=f"selector {name!r}")
        fn = bypass.act_mse_scores if name == "act-mse" else bypass.lm_ppl_scores
        scores = fn(model, batches, progress=False)
        return {int(k): float(v) for k, v in scores.items()}, {"batches": len(batches), "seq_len": seq}, None
    out = bypass.task_scores(model, tok, TASK_SELECTORS[name], config.task_length, config.task_samples,
                             seed=config.seed, batch_size=config.batch_size, progress=False)
    details = {k: v for k, v in out.items() if k != "scores"}
    return {int(k): float(v) for k, v in out["scores"].items()}, details, degenerate_task(details)


def reused_bypass_scores(config: SelectionConfig, teacher: str, tokenizer: str | None, data: DataConfig,
                         layout: SelectionLayout, before: Callable[[], None] | None = None
                         ) -> tuple[dict[int, float], dict[str, Any], str | None]:
    """`bypass_scores`, kept in ``scores/<selector>`` under the settings that decide them (teacher, tokenizer, data
    and the scoring fields), so that a resumed or repeated selection reuses them instead of scoring again.
    ``before``: called only when the scores must be computed (a time limit's check)."""
    name = config.base_selector
    fields = ("bypass_batches", "batch_size", "seed", "task_length") if name in ("act-mse", "lm-ppl") else \
        ("task_length", "task_samples", "batch_size", "seed")
    settings = {"selector": name, "teacher": model_identity(teacher), "tokenizer": tokenizer,
                **({"data": data.identity()} if name in ("act-mse", "lm-ppl") else {}),
                **{f: getattr(config, f) for f in fields}}
    step = Step(layout.scores(name), settings, what=f"{name} scoring")
    done = step.finished()
    if done is not None:
        r = done.result
        return {int(k): float(v) for k, v in r["scores"].items()}, r["details"], r["degenerate"]
    if before is not None:
        before()
    step.begin(on_stale="replace")
    scores, details, degenerate = bypass_scores(config, teacher, tokenizer, data)
    step.publish({"scores": {str(k): v for k, v in scores.items()}, "details": details, "degenerate": degenerate})
    return scores, details, degenerate


def degenerate_task(details: dict[str, Any]) -> str | None:
    """Why a task selector's ranking is tie-break noise, or None: the teacher cannot do the task, or no layer's
    bypass lowers its accuracy by more than two standard errors of the teacher's accuracy over the samples."""
    acc, n = details["baseline"]["accuracy"], details["num_samples"]
    task = details["task"]
    if acc < MIN_TEACHER_TASK_ACCURACY:
        return (f"the teacher scores {acc:.2f} on {task} ({n} samples, {details['length']} tokens): bypassing a layer "
                "cannot show a drop, so the ranking would be tie-break noise")
    noise = max(1.0 / n, 2.0 * math.sqrt(acc * (1.0 - acc) / n))
    drop = max((d["accuracy_drop"] for d in details["details"].values()), default=0.0)
    if drop <= noise:
        return (f"no layer's bypass lowers the teacher's {task} accuracy ({acc:.2f}) by more than its noise over {n} "
                f"samples (largest drop {drop:.3f} <= {noise:.3f}): the ranking would be tie-break noise")
    return None


def _train_candidates(config: SelectionConfig, teacher: str, layout: SelectionLayout, data: DataConfig,
                      base_student: str, stage1_student: str, tokenizer: str | None, num_layers: int, ks: list[int],
                      progress: bool, deadline: float | None = None,
                      before_unit: Callable[[SelectionUnit], None] | None = None) -> dict[str, FamilyScores]:
    stage1_cfg, stage2_cfg = config.stage_config(1), config.stage_config(2)
    interval, eval_batches = config.snapshot_schedule()
    per1, total = candidate_tokens(config)
    weights = {str(p): weights_fingerprint(p) for p in {base_student, stage1_student}}
    teacher_weights = model_identity(teacher).get("weights")

    def make_job_for(kind: str, start: str):
        base = {"stage1": stage1_student, "stage2": base_student, "stage2-s1": base_student, "teacher": stage1_student}[start]

        def make_job(member: Member, until: int | None) -> dict[str, Any]:
            if kind == "gr":
                mixers = [config.probe if i == member.layer else "softmax" for i in range(num_layers)]
            else:  # ga restores its layer; a null candidate restores none
                mixers = ["softmax" if i == member.layer else config.probe for i in range(num_layers)]
            who = "null" if member.is_null else kind
            name = candidate_name(who, member.layer, member.replicate, member.seed)
            stage2 = stage2_cfg.replace(seed=member.seed, eval_every_tokens=interval).to_dict()
            s1 = None if stage1_cfg is None else stage1_cfg.replace(seed=member.seed).to_dict()
            job = CandidateJob(kind=who, layer=member.layer, start=start, seed=member.seed, replicate=member.replicate,
                               run_dir=str(candidate_folder(layout.root, who, start, name)), teacher=teacher,
                               base_student=str(base), mixers=mixers, data=data.to_dict(), stage1=s1, stage2=stage2,
                               tokenizer=tokenizer, until_tokens=until, eval_batches=eval_batches,
                               teacher_weights=teacher_weights, base_weights=weights[str(base)],
                               keep_trainer=config.executor == "inline", deadline=deadline)
            return job.to_dict()

        return make_job

    executor = make_executor(config.executor, config.workers, config.retries, config.executor_options,
                             folder=layout.slurm_logs, progress=progress)
    try:
        families = {}
        for kind, (start, members) in candidate_families(config, num_layers).items():
            make_job = make_job_for(kind, start)
            if before_unit is not None:
                todo = sum(candidate_step(CandidateJob(**make_job(m, None))).finished() is None for m in members)
                family = kind if kind == "gr" else f"{kind}-{start}"
                before_unit(SelectionUnit(f"the {family} candidates ({todo} of {len(members)} to train)", "candidates",
                                          config.selector, todo * per1, todo * total))
            families[kind] = score_family(kind, start, members, config, make_job, run_candidate, executor, ks, total)
        return families
    finally:
        executor.close()


# ----------------------------------------------------------------------------------------------
# Entry point


def run_selection(config: SelectionConfig, teacher: str, run_dir: str | Path, data: DataConfig | dict | str | None = None,
                  base_student: str | None = None, stage1_student: str | None = None, tokenizer: str | None = None,
                  base_stages: dict[str, dict | None] | None = None, reference: str | Path | None = None,
                  progress: bool = True, deadline: float | None = None,
                  before_unit: Callable[[SelectionUnit], None] | None = None) -> SelectionResult:
    """Run ``config.selector`` for ``teacher`` and write ``run_dir/<selector>/selection.json`` (+ plots).

    Learned selectors start their candidates from the all-linear students: ``stage1_student`` (after Stage 1;
    GA candidates with ``candidate_start="stage1"``, GR candidates) and ``base_student`` (after Stage 2; the other
    starts). When neither is given they are distilled first into ``run_dir/base`` with ``base_stages``
    (``{"stage1": {...}, "stage2": {...}}`` DistillConfig fields). Finished candidates are reused. ``reference``:
    another selection.json to report the Jaccard of each budget's set against. One process writes a selection
    folder at a time (`hybrid_distill.artifacts.FolderLock`).

    For a caller under a time limit: ``before_unit`` is called before each candidate family and each bypass or task
    scoring starts (a `SelectionUnit`; raising stops the selection there), and candidates stop at ``deadline`` (a
    ``time.time()``) with `TimeLimitReached`, their training checkpointed. Neither changes what is selected.
    """
    with FolderLock(SelectionLayout(run_dir).root):
        return _select(config, teacher, run_dir, data, base_student, stage1_student, tokenizer, base_stages, reference,
                       progress, deadline, before_unit)


def _select(config: SelectionConfig, teacher: str, run_dir: str | Path, data, base_student: str | None,
            stage1_student: str | None, tokenizer: str | None, base_stages: dict[str, dict | None] | None,
            reference: str | Path | None, progress: bool, deadline: float | None = None,
            before_unit: Callable[[SelectionUnit], None] | None = None) -> SelectionResult:
    t0 = time.perf_counter()
    layout = SelectionLayout(run_dir)
    data = DataConfig.from_value(data)
    num_layers = teacher_num_layers(teacher)
    selector = SELECTORS[config.base_selector]
    if selector.name == "given":
        bad = [i for i in config.layers if not 0 <= i < num_layers]
        if bad:
            raise rules.BudgetError(f"SelectionConfig.layers {bad} out of range for a {num_layers}-layer teacher (0-based)")
        budgets = [len(set(config.layers))]
    else:
        budgets = list(config.budgets)
    ks = rules.resolve_budgets(budgets, num_layers)
    result = SelectionResult(
        selector=config.selector, teacher=teacher, num_layers=num_layers, config=config.to_dict(), data=data.to_dict(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), budgets={}, source=selector.source,
        probe=config.probe if selector.kinds else None,
        candidate_start=config.candidate_start if "ga" in selector.kinds else None)
    inputs = SelectInputs(config, num_layers, ks)
    stop: dict[int, int | None] = {}
    null_std: dict[int, float | None] = {}
    if selector.source in ("bypass", "task"):
        unit = SelectionUnit(f"the {config.selector} {selector.source} scoring", selector.source, config.selector)
        inputs.scores, result.bypass, result.degenerate = reused_bypass_scores(
            config, teacher, tokenizer, data, layout, before=None if before_unit is None else lambda: before_unit(unit))
    elif selector.kinds:
        base_student, stage1_student = _base_students(config, teacher, layout, data, base_student, stage1_student,
                                                      tokenizer, base_stages)
        families = _train_candidates(config, teacher, layout, data, base_student, stage1_student, tokenizer,
                                     num_layers, ks, progress, deadline, before_unit)
        _record_candidates(result, config, families, ks, num_layers, base_student, stage1_student)
        inputs.tables = score_tables(families, ks)
        inputs.eliminated = {kind: fam.layers.eliminated for kind, fam in families.items()}
        main = families[selector.kinds[0]]
        stop = dict(main.layers.stop_by_budget)
        floors = noise_floors(main)
        for k in ks:
            at = stop.get(k)
            floor = floors[min(at, len(floors) - 1) if at is not None else -1] if floors else None
            null_std[k] = floor.null_std if floor is not None else None
    largest = None
    for budget in budgets:
        k = rules.resolve_budget(budget, num_layers)
        label = rules.budget_label(budget)
        if label in result.budgets or any(b.k == k for b in result.budgets.values()) or result.degenerate:
            continue  # e.g. 0.25 and 1 on a 4-layer model: one entry
        chosen = selector.select(inputs, k)
        resolved = None
        if selector.source == "s2" and null_std.get(k) is not None and chosen.scores:
            kls = {layer: -v if "ga" in selector.kinds else v for layer, v in chosen.scores.items()}
            resolved = rules.boundary_resolved(kls, k, null_std[k])
        result.budgets[label] = BudgetSet.of(k, chosen.sets, num_layers, stop_snapshot=stop.get(k), resolved=resolved)
        if largest is None or k >= largest[0]:
            largest = (k, chosen)
    if selector.kinds and not result.budgets:
        raise SelectionError(f"{config.selector} chose no layer set")
    if largest is not None:
        result.scores, result.ranking = largest[1].scores, largest[1].ranking
    if reference is not None:
        ref = SelectionResult.load(reference)
        result.reference = {"path": str(reference),
                            "jaccard": {label: rules.jaccard(b.layers, ref.set_for(b.k)) for label, b in result.budgets.items()}}
        if (ref.tokens or {}).get("spent") and result.tokens:
            result.reference["tokens_saved_fraction"] = 1 - result.tokens["spent"] / ref.tokens["spent"]
    result.wall_time_s = time.perf_counter() - t0
    out_dir = layout.selector(config.selector)
    result.save(layout.selection_file(config.selector))
    write_selection_plots(result, out_dir)
    return result


def _base_students(config, teacher, layout, data, base_student, stage1_student, tokenizer, base_stages):
    if base_student is None and stage1_student is None:
        stages = base_stages or {}
        stage1_student, base_student = train_base_student(
            teacher, layout.root, data, config.probe, stages.get("stage1") or {}, stages.get("stage2"),
            config.mixer_options, tokenizer, config.seed)
    kinds = SELECTORS[config.base_selector].kinds
    needs_stage1 = "gr" in kinds or ("ga" in kinds and config.candidate_start == "stage1")
    if stage1_student is None and needs_stage1:
        raise ConfigError(
            f"{config.selector} starts candidates from the all-linear student after Stage 1 (greedy removal, or "
            f"candidate_start 'stage1'): give it (stage1_student= / --stage1-student), or neither student to have both "
            "distilled first"
        )
    base_student = base_student or stage1_student
    for name, path in (("base_student", base_student), ("stage1_student", stage1_student)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{name} {path!r} is not a directory (a saved student checkpoint)")
        if path is not None:  # before any candidate starts from it
            check_student_fits_teacher(verify_checkpoint(path), teacher_config(teacher), f"{name} {path}",
                                       f"teacher {teacher}")
    return str(base_student), str(stage1_student or base_student)


def _record_candidates(result: SelectionResult, config: SelectionConfig, families: dict[str, FamilyScores],
                       ks: list[int], num_layers: int, base_student: str, stage1_student: str) -> None:
    """The candidates' evidence in the result: curves, noise floor, stop points, failures and tokens."""
    result.base_student, result.stage1_student = base_student, stage1_student
    for kind, fam in families.items():
        result.candidates[kind] = fam.layers
        if fam.null is not None:
            result.candidates["null"] = fam.null
    main = families[SELECTORS[config.base_selector].kinds[0]]
    result.noise_floor = [f.to_dict() for f in noise_floors(main)] or None
    result.score_tables = {name: table[max(ks)] for name, table in score_tables(families, ks).items()}
    result.early_stop = {
        "enabled": config.early_stop,
        "rule": {"window": config.early_stop_window, "min_jaccard": config.early_stop_min_jaccard,
                 "backbone": "K-1", "union": "K+1"},
        "stop_snapshot": {str(k): v for k, v in main.layers.stop_by_budget.items()},
        "stop_tokens": {str(k): (main.layers.snapshot_tokens[v] if v is not None else None)
                        for k, v in main.layers.stop_by_budget.items()},
    }
    per1, per2 = candidate_tokens(config)
    count = sum(len(fam.members) for fam in families.values())
    spent = {kind: fam.layers.tokens_spent + (fam.null.tokens_spent if fam.null else 0) for kind, fam in families.items()}
    full = count * (per1 + per2)
    result.tokens = {"spent": sum(spent.values()), "by_kind": spent, "full_budget": full,
                     "saved_fraction": 1 - sum(spent.values()) / full if full else 0.0,
                     "per_candidate_stage2": per2, "per_candidate_stage1": per1, "candidates": count}
    failures = {f"{kind}-{layer}": err for kind, fam in families.items() for layer, err in fam.layers.failures.items()}
    if failures and len(failures) > num_layers - max(ks):
        raise SelectionError(f"{len(failures)} candidates failed, too many for the budget K={max(ks)}: {sorted(failures)}")


def write_selection_plots(result: SelectionResult, out_dir: str | Path) -> list[Path]:
    """Importance per layer, selected layers per budget and (learned selectors) KL curves with the null band and
    snapshot stability."""
    out_dir = Path(out_dir)
    paths = []
    sets = {label: b.layers for label, b in result.budgets.items()}
    if result.scores:
        scores = {k: v for k, v in result.scores.items() if v is not None}
        first = next(iter(sets.values()), [])
        paths.append(plots.plot_importance(scores, out_dir / "importance.png", selected=first,
                                           title=f"{result.selector}: layer importance"))
    if sets:
        paths.append(plots.plot_selected_layers(sets, result.num_layers, out_dir / "selected_layers.png",
                                                title=f"{result.selector}: softmax layers per budget"))
    band = [(f["null_mean"], f["null_mean"] - 2 * (f["null_std"] or 0.0), f["null_mean"] + 2 * (f["null_std"] or 0.0))
            for f in result.noise_floor or []]
    for kind, sc in result.candidates.items():
        if kind == "null" or not sc.kl or not any(sc.kl.values()):
            continue
        paths.append(plots.plot_score_trajectories(sc.kl, out_dir / f"kl_{kind}.png", tokens=sc.snapshot_tokens or None,
                                                   null_band=band if kind == "ga" else None))
        longest = max(map(len, sc.kl.values()))
        for k in sorted({b.k for b in result.budgets.values()}):
            stats = rules.rolling_jaccard_stats(snapshot_sets(kind, sc.kl, k, longest), window=result.config["early_stop_window"])
            tokens = sc.snapshot_tokens[: len(stats)] if sc.snapshot_tokens else None
            paths.append(plots.plot_stability(stats, k, out_dir / f"stability_{kind}_k{k}.png",
                                              stop_index=sc.stop_by_budget.get(k), tokens=tokens))
    return paths


# ----------------------------------------------------------------------------------------------
# Command line


def add_select_arguments(parser) -> None:
    g = parser.add_argument_group("models and folders")
    g.add_argument("--teacher", required=True, help="HF path / hub id, or tiny:<variant>")
    g.add_argument("--run-dir", required=True, help="selection directory (shared by selectors; candidates are reused)")
    g.add_argument("--base", default=None, help="all-linear student after Stage 2 (candidate starts stage2, stage2-s1)")
    g.add_argument("--stage1-student", default=None,
                   help="all-linear student after Stage 1 (candidate start stage1, greedy removal)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--config", default=None, help="YAML/JSON file of SelectionConfig fields (flags given override it)")
    g.add_argument("--reference", default=None, help="selection.json to compare against (Jaccard, tokens saved)")
    g.add_argument("--no-progress", action="store_true")
    add_flags(parser, SelectionConfig, prefix="sel_", title="selection (SelectionConfig fields)")
    c = parser.add_argument_group("candidate and base budgets (shortcuts for SelectionConfig.stage1 / stage2)")
    c.add_argument("--seq-len", type=parse_int, default=None, help="candidate sequence length (Stage 1 and 2)")
    c.add_argument("--global-batch-size", type=parse_int, default=None)
    c.add_argument("--candidate-tokens", type=parse_int, default=None, help="Stage-2 tokens per candidate")
    c.add_argument("--candidate-stage1-tokens", type=parse_int, default=None, help="Stage-1 tokens per candidate (default: none)")
    c.add_argument("--base-stage1-tokens", type=parse_int, default=None, help="when distilling the base: Stage-1 tokens")
    c.add_argument("--base-stage2-tokens", type=parse_int, default=None, help="when distilling the base: Stage-2 tokens (0: skip)")
    add_data_flags(parser)


def config_from_select_args(ns: dict[str, Any]) -> SelectionConfig:
    """`SelectionConfig` from a config file (if any), then the flags given (a flag left out keeps the file's value)."""
    data: dict[str, Any] = read_config_file(ns["config"], SelectionConfig) if ns.get("config") else {}
    data.update(flag_values(ns, SelectionConfig, prefix="sel_"))
    for key in ("stage1", "stage2"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"{ns['config']}: {key} must be a mapping of DistillConfig fields, got {data[key]!r}")
    shared = {k: ns[k] for k in ("seq_len", "global_batch_size") if ns.get(k)}
    if shared or ns.get("candidate_tokens"):
        stage2 = {**(data.get("stage2") or {}), **shared}
        if ns.get("candidate_tokens"):
            stage2["target_tokens"] = ns["candidate_tokens"]
        data["stage2"] = stage2
    if ns.get("candidate_stage1_tokens"):
        data["stage1"] = {**(data.get("stage1") or {}), **shared, "target_tokens": ns["candidate_stage1_tokens"]}
    return SelectionConfig.from_dict(data)


def run_select_from_args(args) -> int:
    ns = dict(vars(args))
    config = config_from_select_args(ns)
    data = data_config_from_flags(ns)
    check_output_folder(ns["run_dir"], "--run-dir")
    shared = {k: ns[k] for k in ("seq_len", "global_batch_size") if ns.get(k)}
    stage1 = {**shared, **({"target_tokens": ns["base_stage1_tokens"]} if ns.get("base_stage1_tokens") else {})}
    s2 = ns.get("base_stage2_tokens")
    stage2 = None if s2 == 0 else {**shared, **({"target_tokens": s2} if s2 else {})}
    result = run_selection(config, ns["teacher"], ns["run_dir"], data=data, base_student=ns.get("base"),
                           stage1_student=ns.get("stage1_student"), tokenizer=ns.get("tokenizer"),
                           base_stages={"stage1": stage1, "stage2": stage2}, reference=ns.get("reference"),
                           progress=not ns.get("no_progress"))
    summary = {
        "selection": str(SelectionLayout(ns["run_dir"]).selection_file(config.selector)),
        "candidate_start": result.candidate_start,
        "degenerate": result.degenerate,
        "ranking": result.ranking,
        "budgets": {label: b.layers if len(b.sets) == 1 else b.sets for label, b in result.budgets.items()},
        "resolved": {label: b.resolved for label, b in result.budgets.items()},
        "tokens": result.tokens,
        "failed": sorted(f"{kind}-{layer}" for kind, sc in result.candidates.items() for layer in sc.failures),
    }
    print(json.dumps(summary, indent=2))
    return 0


def add_replay_arguments(parser) -> None:
    parser.add_argument("selection", help="selection.json (or its folder) of a full-budget learned-selector run")
    parser.add_argument("--early-stop", action="store_true", help="replay the rolling-Jaccard early stop")
    parser.add_argument("--racing", action="store_true", help="replay racing (successive halving)")
    parser.add_argument("--window", type=parse_int, default=None, help="early_stop_window (snapshots)")
    parser.add_argument("--min-jaccard", type=float, default=None, help="early_stop_min_jaccard")
    parser.add_argument("--round-snapshots", type=parse_int, default=None, help="snapshots per round (decision points)")
    parser.add_argument("--keep-fraction", type=float, default=None, help="racing_keep_fraction")


def run_replay_from_args(args) -> int:
    """Print (JSON) what early stopping / racing would have spent and chosen on a full run."""
    if not (args.early_stop or args.racing):
        raise ConfigError("hybrid-distill replay: give --early-stop, --racing or both")
    changes = {name: value for name, value in (("early_stop_window", args.window), ("early_stop_min_jaccard", args.min_jaccard),
                                               ("round_snapshots", args.round_snapshots),
                                               ("racing_keep_fraction", args.keep_fraction)) if value is not None}
    print(json.dumps(replay_selection(args.selection, early_stop=args.early_stop, racing=args.racing, **changes), indent=2))
    return 0


__all__ = [
    "SelectionError",
    "SelectionUnit",
    "add_replay_arguments",
    "add_select_arguments",
    "bypass_scores",
    "candidate_tokens",
    "config_from_select_args",
    "degenerate_task",
    "run_replay_from_args",
    "run_select_from_args",
    "run_selection",
    "train_base_student",
    "write_selection_plots",
]
