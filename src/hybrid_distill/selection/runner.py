"""`run_selection`: score layers with one selector and write ``selection.json`` plus plots.

Run directory layout (several selectors may share one directory and its candidates)::

    run_dir/
      base/stage1, base/stage2     the all-linear student, when no base_student is given
      candidates/ga/layer_XX/      greedy-addition one-swap candidates (GA-S1/S2, AVG, SMART, dist.)
      candidates/gr/layer_XX/      greedy-removal candidates (GR-S1/S2, AVG)
      <selector>/selection.json    scores, rankings, snapshots, sets per budget, tokens, config
      <selector>/*.png             importance, selected layers per budget, stability over snapshots
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..errors import HybridDistillError
from ..fileio import atomic_write_json, read_json
from . import rules
from .candidates import (
    CandidateJob,
    candidate_dir,
    check_reusable,
    heldout_batches,
    run_candidate,
)
from .config import SelectionConfig
from .executors import make_executor
from .registry import BYPASS_SELECTORS, LEARNED_SELECTORS, candidate_kinds

logger = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"


class SelectionError(HybridDistillError, RuntimeError):
    """Selection could not produce a layer set (e.g. too many candidates failed)."""


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def teacher_num_layers(teacher: str) -> int:
    """Number of decoder layers of a teacher spec (reads only the config for real checkpoints)."""
    if str(teacher).startswith("tiny:"):
        from ..tiny_teachers import tiny_teacher

        return tiny_teacher(str(teacher).split(":", 1)[1]).config.num_hidden_layers
    from transformers import AutoConfig

    from ..surgery import teacher_family

    config = AutoConfig.from_pretrained(str(teacher))
    teacher_family(config)  # an unsupported architecture is named before its layer count is used anywhere
    return config.num_hidden_layers


def selection_path(run_dir: str | Path, selector: str) -> Path:
    return Path(run_dir) / selector / SELECTION_FILE


def load_selection(path: str | Path) -> dict[str, Any]:
    """A ``selection.json`` (or the directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SELECTION_FILE
    data = read_json(path)
    if data is None:
        raise FileNotFoundError(f"no selection file at {path}")
    return data


def selected_layers(selection: dict[str, Any], budget: Any) -> list[int]:
    """The softmax layers a selection chose for ``budget`` (a count, ratio, or budget label)."""
    k = rules.resolve_budget(budget, selection["num_layers"])
    for entry in selection["budgets"].values():
        if entry["k"] == k:
            return list(entry["layers"])
    raise KeyError(f"selection has no set for budget {budget!r} (K={k}); it has {list(selection['budgets'])}")


# ----------------------------------------------------------------------------------------------
# Candidate scoring in rounds (early stopping, racing)
# ----------------------------------------------------------------------------------------------


def _importance_loss(kind: str, kl: float) -> float:
    """Lower = more important: GA layers that lower the KL most; GR layers whose removal raises it most."""
    return kl if kind == "ga" else -kl


def _snapshot_sets(kind: str, snaps: dict[int, list[float]], k: int, count: int) -> list[list[int]]:
    """Top-k set at each of the first ``count`` snapshot indices; candidates eliminated earlier (fewer
    snapshots) rank after every candidate still measured at that index (later eliminations first)."""
    sets = []
    for j in range(count):
        measured = {layer: -_importance_loss(kind, kls[j]) for layer, kls in snaps.items() if j < len(kls)}
        dropped = {layer: (len(kls), -_importance_loss(kind, kls[-1])) for layer, kls in snaps.items() if 0 < len(kls) <= j}
        sets.append(rules.top_k(rules.ranking_with_eliminations(measured, dropped), k))
    return sets


def score_candidates(
    kind: str,
    config: SelectionConfig,
    make_job,
    layers: Sequence[int],
    ks: Sequence[int],
    executor,
    total_tokens: int,
) -> dict[str, Any]:
    """Train the ``kind`` candidates of ``layers`` (in rounds when stopping early or racing) and return
    their per-snapshot KLs, the stop point, eliminations, failures and tokens spent."""
    interval = config.snapshot_interval()
    staged = config.early_stop or config.racing
    round_tokens = interval * config.round_snapshots
    alive = sorted(layers)
    results: dict[int, dict] = {}
    failures: dict[int, str] = {}
    eliminated: dict[int, int] = {}
    stop_index, stop_by_budget, rnd = None, {}, 0
    rule = rules.EarlyStopRule(window=config.early_stop_window, min_jaccard=config.early_stop_min_jaccard)
    t0 = time.perf_counter()
    while alive:
        rnd += 1
        pause = rnd * round_tokens if staged and rnd * round_tokens < total_tokens else None
        jobs = [make_job(kind, layer, pause) for layer in alive]
        outcomes = executor.map(run_candidate, [job.to_dict() for job in jobs])
        for layer, out in zip(list(alive), outcomes):
            if out.ok:
                results[layer] = out.value
            else:
                failures[layer] = out.error
                results.pop(layer, None)  # failed in a later round: no partial score
                alive.remove(layer)
        if pause is None:
            break
        snaps = {layer: [s["kl"] for s in r["snapshots"]] for layer, r in results.items()}
        count = min((len(snaps[layer]) for layer in alive), default=0)
        if config.early_stop and count:
            stop_by_budget = {}
            for k in ks:
                idx = rule.first_stop(_snapshot_sets(kind, snaps, k, count), k)
                if idx is None:
                    break
                stop_by_budget[k] = idx
            else:
                stop_index = max(stop_by_budget.values())
                logger.info("%s candidates: early stop at snapshot %d (round %d)", kind, stop_index, rnd)
                break
        if config.racing and count:
            current = {layer: _importance_loss(kind, snaps[layer][count - 1]) for layer in alive}
            min_keep = config.racing_min_keep or max(ks) + 2
            keep = rules.racing_survivors(current, max(ks), config.racing_keep_fraction, min_keep, config.racing_margin)
            for layer in alive:
                if layer not in keep:
                    eliminated[layer] = rnd
            alive = sorted(keep)
    snaps = {layer: [s["kl"] for s in r["snapshots"]] for layer, r in results.items()}
    return {
        "results": results,
        "snapshots": snaps,
        "snapshot_tokens": _snapshot_tokens(results),
        "failures": failures,
        "eliminated": eliminated,
        "stop_index": stop_index,
        "stop_by_budget": stop_by_budget,
        "rounds": rnd,
        "tokens_spent": sum(r["tokens_trained"] for r in results.values()),
        "wall_time_s": time.perf_counter() - t0,
    }


def _snapshot_tokens(results: dict[int, dict]) -> list[int]:
    longest = max((r["snapshots"] for r in results.values()), key=len, default=[])
    return [s["tokens"] for s in longest]


def _final_kl(kind: str, scoring: dict[str, Any], layer: int) -> float:
    kls = scoring["snapshots"][layer]
    idx = scoring["stop_index"]
    if not kls:
        return scoring["results"][layer]["kl_initial"]
    return kls[min(idx, len(kls) - 1)] if idx is not None else kls[-1]


def _learned_scores(selector: str, scorings: dict[str, dict]) -> tuple[dict[int, float] | None, list[int] | None, dict]:
    """(scores, ranking, per-kind score tables) of a learned selector from its candidates."""
    tables: dict[str, dict[int, float]] = {}
    rankings: dict[str, list[int]] = {}
    for kind, sc in scorings.items():
        ok = sc["results"]
        sign = -1.0 if kind == "ga" else 1.0  # importance: GA -KL (lower KL helps more), GR +KL
        s2 = {layer: sign * _final_kl(kind, sc, layer) for layer in ok}
        elim = {layer: (rnd, s2[layer]) for layer, rnd in sc["eliminated"].items() if layer in s2}
        tables[f"{kind}-s2"] = s2
        rankings[f"{kind}-s2"] = rules.ranking_with_eliminations({l: v for l, v in s2.items() if l not in elim}, elim)
        tables[f"{kind}-s1"] = {layer: sign * r["s1_loss"] for layer, r in ok.items() if r["s1_loss"] is not None}
        rankings[f"{kind}-s1"] = rules.ranking_from_scores(tables[f"{kind}-s1"])
    metric = "s1" if selector.endswith("-s1") else "s2"
    if selector.startswith("avg"):
        ga, gr = rankings[f"ga-{metric}"], rankings[f"gr-{metric}"]
        common = set(ga) & set(gr)
        ranking = rules.average_rank([[x for x in ga if x in common], [x for x in gr if x in common]])
        return rules.scores_from_ranking(ranking), ranking, tables
    name = f"{selector[:2]}-{metric}" if selector[:2] in ("ga", "gr") else "ga-s2"
    return tables[name], rankings[name], tables


def learned_sets(config: SelectionConfig, scores: dict[int, float], ranking: list[int], num_layers: int,
                 ks: Sequence[int], failures: dict | None = None) -> tuple[list[int] | None, dict[int, list[int]]]:
    """(ranking, {K: softmax layers}) of a learned selector from its candidate scores."""
    if config.selector == "smart":  # SMART gives sets, not a ranking
        return None, {k: rules.smart_select(scores, num_layers, k, terminal_quantile=config.smart_terminal_quantile) for k in ks}
    if config.selector == "ga-s2-dist":
        return (rules.distance_regularized_ranking(scores, config.distance_lambda, config.distance_sigma),
                {k: rules.distance_regularized_select(scores, k, config.distance_lambda, config.distance_sigma) for k in ks})
    if len(ranking) < max(ks):
        raise SelectionError(f"only {len(ranking)} candidates succeeded, fewer than the budget K={max(ks)}; failures: {failures or {}}")
    return ranking, {k: rules.top_k(ranking, k) for k in ks}


# ----------------------------------------------------------------------------------------------
# Base (all-linear) student
# ----------------------------------------------------------------------------------------------


def train_base_student(
    teacher: str,
    run_dir: str | Path,
    data: dict[str, Any],
    probe: str,
    stage1: dict[str, Any],
    stage2: dict[str, Any] | None,
    mixer_options: dict | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
) -> tuple[str, str]:
    """Distill the all-``probe`` student (Stage 1, then Stage 2 unless ``stage2`` is None) into
    ``run_dir/stage1`` and ``run_dir/stage2``; returns (stage-1 final dir, base final dir)."""
    import torch

    from ..data import DataConfig
    from ..distill import DistillConfig, distill
    from ..surgery import build_student, load_teacher, load_tokenizer

    run_dir = Path(run_dir)
    spec = DataConfig.from_value(data)
    teacher_model = load_teacher(teacher, dtype=torch.float32)
    tok = load_tokenizer(teacher, tokenizer, teacher_model.config.vocab_size)
    torch.manual_seed(seed)
    student = build_student(teacher_model, [probe] * teacher_model.config.num_hidden_layers, mixer_options).float()
    finals = []
    for number, overrides in ((1, stage1), (2, stage2)):
        if overrides is None:
            finals.append(finals[-1])
            continue
        cfg = DistillConfig.from_dict({"seed": seed, **overrides, "stage": number, "save_final_model": True})
        cfg = cfg.replace(seq_len=cfg.seq_len or (512 if number == 1 else 4096))
        ds = spec.load(tok, cfg.seq_len, seed=seed, require_sequences=cfg.global_batch_size)
        result = distill(student, teacher_model, ds, cfg, run_dir / f"stage{number}", tokenizer=tok)
        finals.append(result.final_model_dir)
    return finals[0], finals[1]


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def run_selection(
    config: SelectionConfig,
    teacher: str,
    run_dir: str | Path,
    data: dict[str, Any] | str | None = None,
    base_student: str | None = None,
    stage1_student: str | None = None,
    tokenizer: str | None = None,
    base_stages: dict[str, dict | None] | None = None,
    reference: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``config.selector`` for ``teacher`` and write ``run_dir/<selector>/selection.json`` (+ plots).

    Learned selectors start their candidates from ``base_student`` (the all-linear student after
    Stage 1 (+2); GA) and ``stage1_student`` (its Stage-1 mixers; GR); when neither is given they
    are distilled first into ``run_dir/base`` with ``base_stages`` ({"stage1": {...}, "stage2":
    {...}} DistillConfig fields). Finished candidates are reused; a restarted run recomputes
    nothing finished. ``reference``: another selection.json (e.g. a full run) to report the
    Jaccard of each budget's set against. Returns the selection dict.
    """
    from ..data import DataConfig

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    spec = DataConfig.from_value(data)
    num_layers = teacher_num_layers(teacher)
    if config.selector == "given":
        bad = [i for i in config.layers if not 0 <= i < num_layers]
        if bad:
            raise rules.BudgetError(f"SelectionConfig.layers {bad} out of range for a {num_layers}-layer teacher (0-based)")
        ks = [len(set(config.layers))]
        rules.resolve_budget(ks[0], num_layers)
    else:
        ks = rules.resolve_budgets(config.budgets, num_layers)
    out_dir = run_dir / config.selector
    selection: dict[str, Any] = {
        "selector": config.selector,
        "teacher": teacher,
        "num_layers": num_layers,
        "probe": config.probe if config.selector in LEARNED_SELECTORS else None,
        "config": config.to_dict(),
        "data": spec.to_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    scores: dict[int, float] | None = None
    ranking: list[int] | None = None
    sets: dict[int, list[int]] = {}

    if config.selector == "uniform":
        sets = {k: rules.uniform_layers(num_layers, k) for k in ks}
    elif config.selector == "given":
        sets = {ks[0]: sorted(set(config.layers))}
    elif config.selector in BYPASS_SELECTORS:
        scores, details = _bypass_scores(config, teacher, tokenizer, spec)
        ranking = rules.ranking_from_scores(scores)
        sets = {k: rules.top_k(ranking, k) for k in ks}
        selection["bypass"] = details
    else:
        scores, ranking, sets = _run_learned(config, teacher, run_dir, spec, base_student, stage1_student, tokenizer,
                                             base_stages, num_layers, ks, progress, selection)

    selection["scores"] = {str(k): v for k, v in sorted(scores.items())} if scores is not None else None
    selection["ranking"] = ranking
    selection["budgets"] = {}
    seen = set()
    for budget in config.budgets if config.selector != "given" else [ks[0]]:
        k = rules.resolve_budget(budget, num_layers)
        if k in seen:  # e.g. 0.25 and 1 on a 4-layer model: one entry
            continue
        seen.add(k)
        layers = sets[k]
        selection["budgets"][rules.budget_label(budget)] = {
            "k": k,
            "layers": layers,
            "adjacency": rules.adjacency_index(layers),
            "expected_adjacency": rules.expected_adjacency(k, num_layers),
        }
    if reference is not None:
        ref = load_selection(reference)
        selection["reference"] = {
            "path": str(reference),
            "jaccard": {label: rules.jaccard(e["layers"], selected_layers(ref, e["k"])) for label, e in selection["budgets"].items()},
        }
        ref_tokens = (ref.get("tokens") or {}).get("spent")
        spent = (selection.get("tokens") or {}).get("spent")
        if ref_tokens and spent is not None:
            selection["reference"]["tokens_saved_fraction"] = 1 - spent / ref_tokens
    selection["wall_time_s"] = time.perf_counter() - t0
    atomic_write_json(out_dir / SELECTION_FILE, selection)
    write_selection_plots(selection, out_dir)
    return selection


def _bypass_scores(config, teacher, tokenizer, spec):
    import torch

    from ..surgery import load_teacher, load_tokenizer
    from . import bypass

    model = load_teacher(teacher, dtype=torch.float32)
    if torch.cuda.is_available():
        model.cuda()
    tok = load_tokenizer(teacher, tokenizer, model.config.vocab_size)
    if config.selector in ("act-mse", "lm-ppl"):
        seq = min(config.task_length, getattr(model.config, "max_position_embeddings", config.task_length))
        batches = heldout_batches(spec.load(tok, seq, seed=config.seed), config.batch_size, config.bypass_batches,
                                  purpose=f"selector {config.selector!r}")
        fn = bypass.act_mse_scores if config.selector == "act-mse" else bypass.lm_ppl_scores
        scores = fn(model, batches, progress=False)
        return {int(k): float(v) for k, v in scores.items()}, {"batches": len(batches), "seq_len": seq}
    task = bypass.TASK_SELECTORS[config.selector]
    out = bypass.task_scores(model, tok, task, config.task_length, config.task_samples, seed=config.seed,
                             batch_size=config.batch_size, progress=False)
    return {int(k): float(v) for k, v in out["scores"].items()}, {k: v for k, v in out.items() if k != "scores"}


def _run_learned(config, teacher, run_dir, spec, base_student, stage1_student, tokenizer, base_stages,
                 num_layers, ks, progress, selection):
    if base_student is None and stage1_student is None:
        stages = base_stages or {}
        stage1_student, base_student = train_base_student(
            teacher, run_dir / "base", spec.to_dict(), config.probe, stages.get("stage1") or {"target_tokens": 100_000_000},
            stages.get("stage2"), config.mixer_options, tokenizer, config.seed)
    if stage1_student is None and "gr" in candidate_kinds(config.selector):
        # The Stage-2 base has trained MLPs and embeddings; a removal candidate must be the teacher but one layer.
        raise ConfigError(
            f"{config.selector} trains greedy-removal candidates (the teacher with one layer linear): give the "
            "all-linear student after Stage 1 only (stage1_student= / --stage1-student), whose other weights "
            "are still the teacher's, or neither student to have both distilled first"
        )
    base_student = base_student or stage1_student
    for name, path in (("base_student", base_student), ("stage1_student", stage1_student)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{name} {path!r} is not a directory (a saved student checkpoint)")
    stage1_cfg, stage2_cfg = config.stage_config(1), config.stage_config(2)
    interval = config.snapshot_interval()
    stage2_dict = stage2_cfg.replace(eval_every_tokens=interval).to_dict()
    stage1_dict = stage1_cfg.to_dict() if stage1_cfg is not None else None
    # Actual Stage-2 tokens: whole optimizer steps.
    seq2 = stage2_cfg.seq_len or 4096
    total = stage2_cfg.total_steps(seq2) * stage2_cfg.global_batch_size * seq2

    from ..checkpoint import weights_fingerprint

    fingerprints = {str(path): weights_fingerprint(path) for path in {base_student, stage1_student}}

    def make_job(kind: str, layer: int, pause: int | None) -> CandidateJob:
        if kind == "ga":
            mixers = ["softmax" if i == layer else config.probe for i in range(num_layers)]
            base = base_student
        else:
            mixers = [config.probe if i == layer else "softmax" for i in range(num_layers)]
            base = stage1_student
        job = CandidateJob(kind=kind, layer=layer, run_dir=str(candidate_dir(run_dir, kind, layer)), teacher=teacher,
                           base_student=str(base), mixers=mixers, data=spec.to_dict(), stage1=stage1_dict,
                           stage2=stage2_dict, tokenizer=tokenizer, pause_at_tokens=pause,
                           eval_batches=stage2_cfg.eval_max_batches, base_weights=fingerprints[str(base)])
        check_reusable(job)  # a settings change must fail loudly, not be retried as a candidate failure
        return job

    executor = make_executor(config.executor, config.workers, config.retries, config.executor_options,
                             folder=run_dir / "slurm-logs", progress=progress)
    try:
        scorings = {
            kind: score_candidates(kind, config, make_job, range(num_layers), ks, executor, total)
            for kind in candidate_kinds(config.selector)
        }
    finally:
        executor.close()
    failures = {f"{kind}-{layer}": err for kind, sc in scorings.items() for layer, err in sc["failures"].items()}
    scores, ranking, tables = _learned_scores(config.selector, scorings)
    ranking, sets = learned_sets(config, scores, ranking, num_layers, ks, failures)

    n_cand = len(range(num_layers)) * len(scorings)
    s1_tokens = 0
    if stage1_cfg is not None:
        seq1 = stage1_cfg.seq_len or 512
        s1_tokens = stage1_cfg.total_steps(seq1) * stage1_cfg.global_batch_size * seq1
    spent = sum(sc["tokens_spent"] for sc in scorings.values())
    full = n_cand * (s1_tokens + total)
    per_candidate = [r for sc in scorings.values() for r in sc["results"].values()]
    speeds = [r["tokens_per_s"] for r in per_candidate if r.get("tokens_per_s")]
    selection.update({
        "base_student": str(base_student),
        "stage1_student": str(stage1_student),
        "score_tables": {name: {str(k): v for k, v in sorted(t.items())} for name, t in tables.items()},
        "snapshots": {
            kind: {
                "tokens": sc["snapshot_tokens"],
                "kl": {str(layer): kls for layer, kls in sorted(sc["snapshots"].items())},
                "kl_initial": {str(layer): r["kl_initial"] for layer, r in sorted(sc["results"].items())},
                "sets": {str(k): _snapshot_sets(kind, sc["snapshots"], k, max(map(len, sc["snapshots"].values()), default=0)) for k in ks},
            }
            for kind, sc in scorings.items()
        },
        "early_stop": {
            "enabled": config.early_stop,
            "rule": {"window": config.early_stop_window, "min_jaccard": config.early_stop_min_jaccard,
                     "backbone": "K-1", "union": "K+1"},
            "stop_snapshot": {kind: sc["stop_index"] for kind, sc in scorings.items()},
            "stop_tokens": {kind: (sc["snapshot_tokens"][sc["stop_index"]] if sc["stop_index"] is not None else None)
                            for kind, sc in scorings.items()},
        },
        "racing": {
            "enabled": config.racing,
            "eliminated_round": {kind: {str(k): v for k, v in sc["eliminated"].items()} for kind, sc in scorings.items()},
        },
        "rounds": {kind: sc["rounds"] for kind, sc in scorings.items()},
        "tokens": {"spent": spent, "by_kind": {kind: sc["tokens_spent"] for kind, sc in scorings.items()}, "full_budget": full, "saved_fraction": 1 - spent / full if full else 0.0,
                   "per_candidate_stage2": total, "per_candidate_stage1": s1_tokens},
        "candidates": {
            "count": n_cand,
            "reused": sum(bool(r.get("reused")) for r in per_candidate),
            "mean_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
            "wall_time_s": {kind: sc["wall_time_s"] for kind, sc in scorings.items()},
            "executor": config.executor,
        },
        "failed": failures,
    })
    return scores, ranking, sets


def write_selection_plots(selection: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Importance per layer, selected layers per budget and (learned selectors) snapshot stability."""
    from . import plots

    out_dir = Path(out_dir)
    paths = []
    num_layers = selection["num_layers"]
    sets = {label: e["layers"] for label, e in selection["budgets"].items()}
    if selection.get("scores"):
        scores = {int(k): v for k, v in selection["scores"].items() if v is not None}
        first = next(iter(sets.values()))
        paths.append(plots.plot_importance(scores, out_dir / "importance.png", selected=first,
                                           title=f"{selection['selector']}: layer importance"))
    paths.append(plots.plot_selected_layers(sets, num_layers, out_dir / "selected_layers.png",
                                            title=f"{selection['selector']}: softmax layers per budget"))
    for kind, snap in (selection.get("snapshots") or {}).items():
        kls = {int(k): v for k, v in snap["kl"].items()}
        if not kls or not any(kls.values()):
            continue
        paths.append(plots.plot_score_trajectories(kls, out_dir / f"kl_{kind}.png", tokens=snap["tokens"] or None))
        for k_str, snapshot_sets in snap["sets"].items():
            k = int(k_str)
            stats = rules.rolling_jaccard_stats(snapshot_sets, window=selection["config"]["early_stop_window"])
            stop = (selection.get("early_stop") or {}).get("stop_snapshot", {}).get(kind)
            tokens = snap["tokens"][: len(stats)] if snap["tokens"] else None
            paths.append(plots.plot_stability(stats, k, out_dir / f"stability_{kind}_k{k}.png", stop_index=stop, tokens=tokens))
    return paths
