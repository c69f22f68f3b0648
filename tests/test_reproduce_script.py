"""scripts/reproduce.py end to end on CPU at toy size: pretraining, every selector at 3 budgets, budgets
fitted to a deadline, evaluation, report, the replayed selection cost, and the results pack."""

import json
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import reproduce
finally:
    sys.path.pop(0)

PRETRAIN = [
    "model.num_hidden_layers=8", "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
    "model.num_key_value_heads=1", "model.max_position_embeddings=512", "data.seq_len=128", "data.prompt_tokens=[64,120]",
    "data.text_chars=300000", "tokenizer.train_chars=100000", "tokenizer.synthetic_docs=20", "tokenizer.vocab_size=512",
    "data.synthetic_docs=40", "data.synthetic_seconds=10", "train.compile=false", "train.batch_size=4",
    "train.warmup_steps=2", "data.heldout_rows=4",
]


def _toy_pipeline_config(path: Path) -> dict:
    cfg = yaml.safe_load(reproduce.DEFAULT_CONFIG.read_text())
    step = 4 * 64

    def stage(steps):
        return {"target_tokens": steps * step, "seq_len": 64, "global_batch_size": 4, "eval_max_batches": 1}

    cfg["data"]["max_tokens"] = 60_000
    cfg.update(stage1=stage(3), stage2=stage(3), final={"stage2": stage(4)})
    cfg["selection"].update(stage2=stage(24), snapshot_every_tokens=2 * step, task_length=200, task_samples=4,
                            bypass_batches=2, batch_size=4)
    cfg["eval"].update(lengths=[256], niah_lengths=[256], num_samples=2, niah_depths=[0, 100], niah_samples=1,
                       batch_size=8, quality_seq_len=64, quality_sequences=4, tasks=["kv_retrieval", "niah_single_1"])
    path.write_text(yaml.safe_dump(cfg))
    return cfg


def test_reproduce_toy_run(tmp_path, monkeypatch):
    cfg = _toy_pipeline_config(tmp_path / "pipe.yaml")
    work = tmp_path / "work"
    # a toy teacher solves no task, so the gate would keep both: make it keep one, as a trained teacher's would
    monkeypatch.setattr(reproduce, "gate_tasks", lambda results, gate: ["kv_retrieval"])
    rc = reproduce.main(["run", "--work", str(work), "--config", str(tmp_path / "pipe.yaml"), "--workers", "1",
                         "--pretrain-minutes", "0.03", "--deadline-minutes", "3", "--eval-seconds", "5",
                         "--snapshots", "6", "--swap-probes", "lm-ppl", "--pretrain-set", *PRETRAIN])
    assert rc == 0, (work / "logs" / "pretrain.log").read_text()[-3000:]
    timeline = json.loads((work / "timeline.json").read_text())["events"]
    events = [e["event"] for e in timeline]
    assert events[:2] == ["start", "pretrain_started"] and events[-1] == "done" and "budgets" in events
    gate = next(e for e in timeline if e["event"] == "eval_tasks")
    assert gate["kept"] == ["kv_retrieval"] and gate["dropped"] == ["niah_single_1"]
    budgets = next(e for e in timeline if e["event"] == "budgets")
    teacher_s = [e["eval_seconds"] for e in timeline if e["event"] == "model_eval_done" and e["model"] == "teacher"][-1]
    expected = max(5 * (1 - reproduce.RECALL_EVAL_SHARE / 2), reproduce.HYBRID_EVAL_VS_TEACHER * teacher_s)
    assert budgets["model"]["eval_seconds_per_model"] == pytest.approx(expected, abs=0.1)
    every = json.loads((work / reproduce.TEACHER_ALL_TASKS / "results.json").read_text())
    assert every["config"]["tasks"] == ["kv_retrieval", "niah_single_1"]  # (niah_single_1 does not fit 256 tokens)
    for model in (work / "pipeline" / "eval").iterdir():  # teacher, all-linear and hybrids: the kept task only
        assert json.loads((model / "results.json").read_text())["config"]["tasks"] == ["kv_retrieval"]
    ran = yaml.safe_load((work / "pipeline.yaml").read_text())
    assert ran["teacher"] == str(work / "pretrain" / "teacher") and ran["data"]["source"] == str(work / "text.jsonl.gz")
    step = 4 * 64
    cand = ran["selection"]["stage2"]["target_tokens"]
    assert cand % step == 0 and step <= cand <= cfg["selection"]["stage2"]["target_tokens"]  # fitted, never grown
    assert cand == 6 * ran["selection"]["snapshot_every_tokens"]  # --snapshots 6: six held-out snapshots per candidate
    assert ran["final"]["stage2"]["target_tokens"] <= cfg["final"]["stage2"]["target_tokens"]
    state = json.loads((work / "pipeline" / "pipeline.json").read_text())
    assert list(state["stages"]) == ["stage1", "stage2", "selection", "final", "export", "eval", "report"]
    assert sorted(state["stages"]["selection"]["selectors"]) == sorted(cfg["selection"]["selectors"])

    a = reproduce.analyze(work)
    table = a["tables"]["recall/overall"]
    assert table["budgets"] == ["12.5%", "25%", "50%"] and set(table["rows"]) == set(cfg["selection"]["selectors"])
    assert all(len(c["layers"]) == k for row in table["rows"].values() for c, k in zip(row.values(), (1, 2, 4)))
    assert all(c["value"] is not None for row in table["rows"].values() for c in row.values())
    assert {"teacher", "all-gdn"} <= set(a["models"]) and a["teacher_all_tasks"]["recall/overall"] is not None
    cost = a["selection_cost"]["ga-s2"]
    from hybrid_distill.selection import SelectionConfig

    per_layer = 8 + ran["selection"].get("null_candidates", SelectionConfig().null_candidates)  # 8 layers + null candidates
    assert cost["full"]["tokens_spent"] == per_layer * cand and all(r["tokens_spent"] <= per_layer * cand for r in cost.values())
    assert set(a["selection_cost"]) == {"ga-s2", "gr-s2", "smart"}
    probes = next(e for e in timeline if e["event"] == "probes")["sets"]
    assert probes == reproduce.swap_probes(work / "pipeline", "lm-ppl") and probes == ran["final"]["extra_sets"]
    for label, layers in probes.items():  # each probe distilled and evaluated like a selector's set
        assert a["probes"][label]["layers"] == layers and a["probes"][label]["recall/overall"] is not None
    assert "### swap probes" in (work / "analysis.md").read_text()
    for f in ("analysis.md", "recall_by_selector.png", "ga_s2_importance.png"):
        assert (work / f).is_file()

    packed = reproduce.pack(work, tmp_path / "out" / "repro.tar.gz")
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert "work/pipeline/report.md" in names and "work/timeline.json" in names and "work/pretrain/teacher/config.json" in names
    assert not [n for n in names if n.endswith((".safetensors", ".gz", ".npy", ".bin")) or "/checkpoints/" in n]


def test_eval_estimate_takes_the_larger_of_the_given_time_and_the_teachers():
    # run 3: --eval-seconds 12, four of five tasks kept, the teacher took 31.9 s on them, each hybrid 18 s
    ratio = reproduce.HYBRID_EVAL_VS_TEACHER
    assert reproduce.eval_seconds_per_hybrid(12, 0.8, 31.9) == pytest.approx(ratio * 31.9)
    assert ratio * 31.9 > 18 > 12 * (1 - reproduce.RECALL_EVAL_SHARE * 0.2)  # the teacher's bound covers what was measured
    assert reproduce.eval_seconds_per_hybrid(None, 0.8, 31.9) == pytest.approx(ratio * 31.9)
    assert reproduce.eval_seconds_per_hybrid(40, 0.8, 31.9) == pytest.approx(40 * (1 - reproduce.RECALL_EVAL_SHARE * 0.2))


def test_fit_budgets_shrinks_to_the_deadline_and_never_grows():
    cfg = yaml.safe_load(reproduce.DEFAULT_CONFIG.read_text())
    step = 8 * 4096
    full_c, full_f = cfg["selection"]["stage2"]["target_tokens"], cfg["final"]["stage2"]["target_tokens"]
    roomy = reproduce.fit_budgets(cfg, 10**6, 166_000, 14.5, 16)
    assert (roomy["candidate_tokens"], roomy["final_tokens"]) == (full_c // step * step, full_f // step * step)
    fits = [reproduce.fit_budgets(cfg, s, 166_000, 14.5, 16) for s in (700, 900, 1200, 1600)]
    cands = [b["candidate_tokens"] for b in fits]
    assert cands == sorted(cands) and cands[0] < cands[-1] <= full_c  # more time, more tokens
    for b in fits:
        assert b["candidate_tokens"] % step == 0 and b["final_tokens"] % step == 0
        assert b["snapshot_every_tokens"] * reproduce.SNAPSHOTS <= b["candidate_tokens"]
        assert b["model"]["candidates"] == 32  # GA and GR candidates of 16 layers
    tight = reproduce.fit_budgets(cfg, 10, 166_000, 14.5, 16)  # no time at all: the minimum, not zero
    assert tight["candidate_tokens"] == 12 * step and tight["final_tokens"] >= 4 * step
    six = reproduce.fit_budgets(cfg, 900, 166_000, 14.5, 16, snapshots=6)  # finer rounding, more tokens
    assert six["candidate_tokens"] % (6 * step) == 0 and six["candidate_tokens"] >= fits[1]["candidate_tokens"]


def test_gate_tasks_keeps_what_the_teacher_solves():
    res = {"config": {"tasks": ["niah_single_1", "kv_retrieval", "mqar", "vt"]},
           "recall": {"aggregate": {"per_task": {"niah_single_1": 0.72, "kv_retrieval": 0.06, "mqar": 0.0, "vt": 0.25}}}}
    assert reproduce.gate_tasks(res, 0.25) == ["niah_single_1", "vt"]
    assert reproduce.gate_tasks(res, 0.9) == ["niah_single_1", "kv_retrieval", "mqar", "vt"]  # none passes: keep all


def test_swap_probes_exchange_the_reference_selectors_best_missing_layer(tmp_path):
    from hybrid_distill.layout import RunLayout
    from hybrid_distill.selection.result import BudgetSet, SelectionResult

    def selection(name, ranking, budgets):
        SelectionResult(selector=name, teacher="t", num_layers=16, config={}, data={}, created="", ranking=ranking,
                        budgets={k: BudgetSet.of(len(v), [v], 16) for k, v in budgets.items()},
                        ).save(RunLayout(tmp_path).selection.selection_file(name))

    selection("ga-s2", [9, 6, 7, 14, 8, 0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 15], {"12.5%": [6, 9], "25%": [6, 7, 9, 14]})
    selection("lm-ppl", [0, 4, 9, 3, 2, 6, 14, 11, 15, 13, 12, 7, 5, 1, 8, 10], {"12.5%": [0, 4], "25%": [0, 3, 4, 9]})
    assert reproduce.swap_probes(tmp_path, "lm-ppl") == {
        "ga-s2 12.5% +0 -6": [0, 9],  # lm-ppl's best layer that ga-s2 lacks, in place of ga-s2's weakest
        "lm-ppl 12.5% -0 +9": [4, 9],  # ... and out of lm-ppl's set, for its best layer outside the set
        "ga-s2 25% +0 -14": [0, 6, 7, 9],
        "lm-ppl 25% -0 +2": [2, 3, 4, 9],
    }
    selection("same", [9, 6, 7, 14, 8, 0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 15], {"12.5%": [6, 9], "25%": [6, 7, 9, 14]})
    assert reproduce.swap_probes(tmp_path, "same") == {}
    config = _toy_pipeline_config(tmp_path / "pipe.yaml")  # a reference that is not run is refused before any work
    work = tmp_path / "work"
    assert reproduce.main(["run", "--work", str(work), "--config", str(tmp_path / "pipe.yaml"), "--swap-probes", "best"]) == 2
    assert not (work / "pretrain").exists() and "best" not in config["selection"]["selectors"]
    with pytest.raises(ValueError, match="finished ga-s2 and act-mse"):
        reproduce.swap_probes(tmp_path, "act-mse")
