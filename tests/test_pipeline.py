"""`hybrid-distill run`: a reduced end-to-end run, kill -9 + re-run without redoing finished stages,
config validation before any compute, dry-run plan, report contents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from hybrid_distill.checkpoint import load_student
from hybrid_distill.cli import main
from hybrid_distill.config import ConfigError
from hybrid_distill.pipeline import Pipeline, RunConfig, run_pipeline

SEQ, BATCH = 32, 4


def _stage(steps, **kw):
    return {"target_tokens": steps * SEQ * BATCH, "seq_len": SEQ, "global_batch_size": BATCH, "eval_max_batches": 2, **kw}


def _config(tmp_path: Path, **over) -> dict:
    cfg = {
        "teacher": "tiny:llama-gqa",
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "default", "max_tokens": 40_000, "cache_dir": str(tmp_path / "tokens")},
        "stage1": _stage(3),
        "stage2": _stage(2),
        "selection": {"selectors": ["ga-s2", "uniform"], "budgets": [1, 2], "stage2": _stage(2),
                      "snapshot_every_tokens": SEQ * BATCH},
        "final": {"stage2": _stage(2)},
        "eval": {"suite": ["recall", "quality"], "tasks": ["kv_retrieval"], "lengths": [128], "num_samples": 2,
                 "quality_seq_len": SEQ, "quality_sequences": 4},
    }
    cfg.update(over)
    return cfg


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_end_to_end_run_writes_models_exports_eval_and_report(tmp_path):
    exportable = {"student": {"layout": "qwen3_5"}, "export": {"format": "qwen3_5"}}
    cfg = RunConfig.from_dict(_config(tmp_path, **exportable))
    state = run_pipeline(cfg, progress=False)
    run = Path(cfg.run_dir)
    assert list(state["stages"]) == ["stage1", "stage2", "selection", "final", "export", "eval", "report"]
    # 4 one-swap candidates and 3 null candidates (the noise floor), 2 steps each
    assert state["stages"]["stage1"]["tokens"] == 3 * SEQ * BATCH and state["stages"]["selection"]["tokens"] == (4 + 3) * 2 * SEQ * BATCH
    sets = Pipeline(cfg, progress=False).final_sets()
    uniform = json.loads((run / "selection/uniform/selection.json").read_text())
    assert uniform["budgets"]["K=2"]["layers"] == [1, 3]
    assert 2 <= len(sets) <= 4  # GA-S2 and uniform at K=1,2; identical sets are trained once
    for name, item in sets.items():
        model = run / "models" / name
        cfg_json = json.loads((model / "config.json").read_text())
        assert [i for i, m in enumerate(cfg_json["mixers"]) if m == "softmax"] == item["layers"]
        card = (model / "README.md").read_text()
        assert str(item["layers"]) in card and "tiny:llama-gqa" in card
        assert (model / "tokenizer.json").is_file()
        assert (run / "eval" / name / "results.json").is_file()
        # the export: a stock Qwen3.5 model (no remote code) computing the saved hybrid's function
        exported = AutoModelForCausalLM.from_pretrained(run / "exports" / name, dtype=torch.float32)
        assert type(exported).__name__ == "Qwen3_5ForCausalLM" and state["stages"]["export"]["models"][name]["exact"]
        ids = torch.randint(0, exported.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = load_student(model, dtype=torch.float32)(ids).logits
            assert torch.allclose(exported(ids).logits, reference, atol=1e-4, rtol=0)
    report = (run / "report.md").read_text()
    for needle in ("Cost per stage", "ga-s2", "uniform", "teacher", "all-gdn", "softmax layers", "![", "| overall |",
                   "comparison.png", "## Exports", "`qwen3_5`"):
        assert needle in report, needle
    assert "<table>" in (run / "report.html").read_text()
    from hybrid_distill.pipeline.report import selector_budget_table

    table = selector_budget_table(run, ["ga-s2", "uniform"])
    assert table["budgets"] == ["K=1", "K=2"] and table["rows"]["uniform"]["K=2"]["layers"] == [1, 3]
    for selector, row in table["rows"].items():
        for label, cell in row.items():
            res = json.loads((run / "eval" / cell["model"] / "results.json").read_text())
            assert cell["value"] == res["recall"]["aggregate"]["overall"]
            assert f"| {selector} |" in report and f"`{cell['layers']}`" in report
    assert "### recall by selector and budget" in report
    for img in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (run / img).is_file(), img

    # evaluation results are reused under the same settings and replaced under others
    teacher_results = run / "eval" / "teacher" / "results.json"
    before = teacher_results.stat().st_mtime_ns
    Pipeline(cfg, progress=False).evaluate("teacher")
    assert teacher_results.stat().st_mtime_ns == before
    changed = RunConfig.from_dict(_config(tmp_path, **exportable, eval={**_config(tmp_path)["eval"], "num_samples": 3}))
    Pipeline(changed, progress=False).evaluate("teacher")
    res = json.loads(teacher_results.read_text())
    assert res["config"]["num_samples"] == 3 and res["recall"]["aggregate"]["counts"] == {"kv_retrieval": {"128": 3}}
    assert json.loads((run / "eval" / "teacher" / "step.json").read_text())["settings"]["num_samples"] == 3
    from hybrid_distill.data import DataConfig

    assert res["config"]["data"] == DataConfig.from_value(cfg.data).to_dict()  # the run's held-out split

    # a hand-picked set added afterwards: only it is distilled and evaluated; finished hybrids are kept as they are
    weights = {name: (run / "models" / name / "model.safetensors").stat().st_mtime_ns for name in sets}
    extra = RunConfig.from_dict(_config(tmp_path, **exportable, final={"stage2": _stage(2), "extra_sets": {"probe": [0, 2, 3]}}))
    pipe = Pipeline(extra, progress=False)
    pipe.run(("selection", "final", "export", "eval", "report"))
    assert (run / "exports" / "hybrid-gdn-k3-L0_2_3" / "config.json").is_file()
    probe = pipe.final_sets()["hybrid-gdn-k3-L0_2_3"]
    assert probe["chosen_by"] == [{"selector": "extra", "budget": "probe", "k": 3, "probe": None}]
    assert (run / "eval" / "hybrid-gdn-k3-L0_2_3" / "results.json").is_file()
    assert {name: (run / "models" / name / "model.safetensors").stat().st_mtime_ns for name in sets} == weights
    assert "extra probe" in (run / "report.md").read_text()
    # each stage's cost counts every model it holds, also those trained or evaluated before the set was added
    stages = json.loads((run / "pipeline.json").read_text())["stages"]
    final, ev = stages["final"], stages["eval"]
    assert final["compute_time_s"] == pytest.approx(sum(m["compute_time_s"] for m in final["models"].values()))
    assert final["compute_time_s"] > final["models"]["hybrid-gdn-k3-L0_2_3"]["compute_time_s"] > 0
    assert set(ev["eval_time_s"]) == set(pipe.eval_models()) and all(t > 0 for t in ev["eval_time_s"].values())
    assert ev["compute_time_s"] == pytest.approx(sum(ev["eval_time_s"].values()))
    assert ev["compute_time_s"] > ev["eval_time_s"]["hybrid-gdn-k3-L0_2_3"]


def test_invalid_configs_fail_before_compute(tmp_path):
    def fails(match, exc=ConfigError, **over):
        with pytest.raises(exc, match=match):
            RunConfig.from_dict(_config(tmp_path, **over))

    fails(r"selection\.selectors must be a list of selector names; 'best-guess' must be one of", selection={"selectors": ["best-guess"], "budgets": [1]})
    fails(r"selection\.budgets.*4-layer model", selection={"selectors": ["ga-s2"], "budgets": [4]})
    fails(r"selection\.budgets", selection={"selectors": ["ga-s2"], "budgets": [1.0]})
    fails(r"teacher: .*no-such-dir.*config\.json", exc=FileNotFoundError, teacher=str(tmp_path / "no-such-dir"))
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=2).save_pretrained(tmp_path / "gpt2")
    fails(r"teacher: .*gpt2': Unsupported architecture 'gpt2'", teacher=str(tmp_path / "gpt2"),
          selection={"selectors": ["ga-s2"], "budgets": [4]})  # named before the budget is checked against its layers
    fails(r"data has unknown field.*txt_field", data={"source": "default", "txt_field": "body"})
    fails(r"stage2\.lr_mixer must be > 0", stage2={"lr_mixer": -1})
    fails(r"unknown top-level field.*stage_2", stage_2={})
    fails(r"student\.linear", student={"linear": "mamba"})
    fails(r"final\.extra_sets\.p: .*out of range for a 4-layer", final={"extra_sets": {"p": [1, 4]}})
    fails(r"final\.extra_sets must map a label to distinct 0-based layer indices; p: \[1, 1\]", final={"extra_sets": {"p": [1, 1]}})
    fails(r"final\.extra_sets must be a mapping", final={"extra_sets": [[0, 1]]})
    fails(r"eval\.suite must name parts among .*unknown: \['speed'\]", eval={"suite": ["recall", "speed"]})
    fails(r"eval\.tasks has unknown task.*nosuch", eval={"tasks": ["niah_single_1", "nosuch"]})
    fails(r"eval\.lengths must be a list of positive integers.*-5 must be >= 1", eval={"lengths": [-5]})
    fails(r"eval\.lengths must be", eval={"lengths": "128,256"})
    fails(r"eval\.num_samples must be >= 1", eval={"num_samples": 0})
    fails(r"eval\.niah_depths", eval={"niah_depths": [50, 120]})
    fails(r"eval\.suite must be a name or a list", eval={"suite": 5})
    fails(r"eval\.seed must be an integer", eval={"seed": "x"})
    fails(r"eval\.compile_decode must be true or false", eval={"compile_decode": "no"})
    fails(r"eval\.efficiency_dtype must be one of \['float32', 'bfloat16', 'float16'\]", eval={"efficiency_dtype": "float8"})
    fails(r"student must be a mapping", student="gdn")
    fails(r"student\.mixer_options must be a mapping", student={"linear": "gdn", "mixer_options": "x"})
    fails(r"student\.mixer_options has a bad value: mixer option gdn_use_short_conv must be true or false",
          student={"mixer_options": {"gdn_use_short_conv": "yes"}})
    fails(r"student\.layout must be one of", student={"layout": "qwen35"})
    fails(r"student\.mixer_options .*gdn_use_output_gate=False contradicts student layout 'qwen3_5'",
          student={"layout": "qwen3_5", "mixer_options": {"gdn_use_output_gate": False}})
    fails(r"export\.format must be one of", export={"format": "gguf"})
    # a student that cannot be exported exactly is named before any training, with the option that fixes it
    fails(r"export\.format 'qwen3_5': .*q/k/v biases .*gdn_use_qkv_bias: false.*student\.layout: qwen3_5",
          teacher="tiny:qwen2", export={"format": "qwen3_5"})
    RunConfig.from_dict(_config(tmp_path, teacher="tiny:qwen2", student={"layout": "qwen3_5"}, export={"format": "qwen3_5"}))
    RunConfig.from_dict(_config(tmp_path, teacher="tiny:qwen2", export={"format": "qwen3_5", "approximate": True}))
    fails(r"run_dir must be a non-empty string", run_dir=5)
    fails(r"report must be a mapping", report="x")
    fails(r"report has unknown field.*titel", report={"titel": "x"})
    assert not (tmp_path / "run").exists()
    path = _write(tmp_path, _config(tmp_path, selection={"selectors": ["ga-s2"], "budgets": [0.99]}))
    assert main(["run", str(path)]) == 2 and not (tmp_path / "run").exists()


def test_efficiency_settings_join_the_eval_settings_only_with_the_efficiency_suite(tmp_path):
    plain = Pipeline(RunConfig.from_dict(_config(tmp_path, eval={"suite": ["recall"]})), progress=False)
    assert "efficiency_batches" not in plain.eval_settings()  # runs without it keep their recorded settings
    cfg = _config(tmp_path, eval={"suite": "recall,efficiency", "efficiency_batches": [1, 4], "decode_steps": 8})
    settings = Pipeline(RunConfig.from_dict(cfg), progress=False).eval_settings()
    assert settings["efficiency_batches"] == [1, 4] and settings["decode_steps"] == 8
    assert settings["efficiency_lengths"] is None and settings["compile_decode"] is False


def test_bad_text_field_is_named_before_training(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": "hello world " * 50}) for _ in range(50)))
    cfg = RunConfig.from_dict(_config(tmp_path, data={"source": str(corpus), "text_field": "text"}))
    with pytest.raises(Exception, match="text"):
        Pipeline(cfg, progress=False).run(("stage1",))
    assert not (Path(cfg.run_dir) / "stage1" / "step.json").exists()  # no run recorded, let alone finished


def test_sequences_too_short_for_the_recall_mix_are_refused_before_any_stage_runs(tmp_path):
    long = {"target_tokens": 4 * 512, "seq_len": 512, "global_batch_size": 4}
    cfg = RunConfig.from_dict(_config(
        tmp_path, stage1=long, stage2=long, final={"stage2": long},
        data={"source": "default", "max_tokens": 40_000, "cache_dir": str(tmp_path / "tokens"), "recall_fraction": 0.3,
              "recall_tasks": ["niah_single_1"]}))
    pipe = Pipeline(cfg, progress=False)
    assert pipe.data_seq_lens(("stage1", "selection", "final")) == {
        "stage1": 512, "selection.stage1": 512, "selection.stage2": SEQ, "final.stage2": 512}
    with pytest.raises(ConfigError, match=f"selection.stage2.seq_len {SEQ} with data.recall_fraction: .*longer seq_len"):
        pipe.run()
    assert not (Path(cfg.run_dir) / "stage1").exists()  # refused before Stage 1 trained
    pipe.check_recall_mix(("stage1", "stage2", "final"))  # the 512-token stages fit


def test_an_interrupted_evaluation_is_run_again_not_reused(tmp_path, monkeypatch):
    cfg = RunConfig.from_dict(_config(tmp_path, eval={"suite": ["recall", "quality"], "tasks": ["kv_retrieval"],
                                                      "lengths": [128], "num_samples": 1, "quality_seq_len": SEQ,
                                                      "quality_sequences": 4}))
    pipe = Pipeline(cfg, progress=False)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies in the quality suite, after recall was saved

    monkeypatch.setattr("hybrid_distill.evaluation.suite.evaluate_quality", killed)  # the name the suite calls
    with pytest.raises(KeyboardInterrupt):
        pipe.evaluate("teacher")
    dest = Path(cfg.run_dir) / "eval" / "teacher"
    assert json.loads((dest / "results.json").read_text())["partial"] == ["quality"]
    monkeypatch.undo()
    results = json.loads((pipe.evaluate("teacher") / "results.json").read_text())
    assert "partial" not in results and "quality" in results and "recall" in results


def test_quality_eval_scores_the_text_the_runs_data_held_out(tmp_path):
    """The quality suite reads the run's own data (its text field, held-out share, cache), not the bare source."""
    import random

    from hybrid_distill.data import DataConfig

    rng = random.Random(0)
    words = "alpha beta gamma delta river stone cloud paper engine garden yellow seven".split()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": " ".join(rng.choice(words) for _ in range(80))}) for _ in range(200)))
    data = {"source": str(corpus), "text_field": "body", "heldout_fraction": 0.2, "cache_dir": str(tmp_path / "tokens")}
    cfg = RunConfig.from_dict(_config(tmp_path, data=data, eval={"suite": ["quality"], "quality_seq_len": SEQ,
                                                                  "quality_sequences": 4}))
    pipe = Pipeline(cfg, progress=False)
    res = json.loads((pipe.evaluate("teacher") / "results.json").read_text())
    assert res["config"]["data"] == DataConfig.from_value(data).to_dict()
    assert res["quality"]["sequences"] == 4 and res["quality"]["heldout_fraction"] == 0.2
    assert pipe.eval_settings()["data"]["text_field"] == "body"


def test_changed_settings_never_reuse_stale_models_or_results(tmp_path):
    """Runs made under other settings are set aside and redone (the trainer alone would return a finished run
    as it is, whatever the teacher or data); later stages follow; a partial run on stale inputs is refused."""
    from hybrid_distill.checkpoint import weights_fingerprint

    uniform = {"selectors": ["uniform"], "budgets": [1]}
    base = _config(tmp_path, selection=uniform, eval={"suite": ["quality"], "quality_seq_len": SEQ, "quality_sequences": 4})
    run = Path(base["run_dir"])
    run_pipeline(RunConfig.from_dict(base), progress=False)
    first = {p: weights_fingerprint(run / p) for p in ("stage1/final", "stage2/final", "models/hybrid-gdn-k1-L3")}
    teacher_eval = (run / "eval/teacher/results.json").stat().st_mtime_ns

    # Final settings changed: the hybrid is trained again (from scratch: no reuse of Stage-1 mixers) and re-evaluated.
    no_reuse = {**base, "final": {**base["final"], "reuse_stage1_mixers": False}}
    run_pipeline(RunConfig.from_dict(no_reuse), progress=False)
    assert weights_fingerprint(run / "models/hybrid-gdn-k1-L3") != first["models/hybrid-gdn-k1-L3"]
    assert weights_fingerprint(run / "stage2/final") == first["stage2/final"]  # upstream untouched
    res = json.loads((run / "eval/hybrid-gdn-k1-L3/step.json").read_text())["settings"]
    assert res["model"]["weights"] == weights_fingerprint(run / "models/hybrid-gdn-k1-L3")
    assert (run / "eval/teacher/results.json").stat().st_mtime_ns == teacher_eval  # same teacher, same results
    superseded = sorted(p.name for p in (run / "superseded").iterdir())
    assert [n.rsplit("-", 1)[0] for n in superseded] == ["final--hybrid-gdn-k1-L3", "models--hybrid-gdn-k1-L3"]

    # Data changed: a partial run on the stale Stage 1 is refused; the full run redoes everything from Stage 1.
    other_data = {**no_reuse, "data": {**base["data"], "max_tokens": 30_000}}
    with pytest.raises(ConfigError, match="stage final needs stage1, stage2, selection done under the current"):
        Pipeline(RunConfig.from_dict(other_data), progress=False).run(("final", "eval", "report"))
    run_pipeline(RunConfig.from_dict(other_data), progress=False)
    for path, before in first.items():
        assert weights_fingerprint(run / path) != before, path
    assert (run / "eval/teacher/results.json").stat().st_mtime_ns != teacher_eval  # new held-out text
    moved = {p.name.rsplit("-", 1)[0] for p in (run / "superseded").iterdir()}
    assert {"stage1", "stage2", "selection"} <= moved

    # Another selection: the hybrid it no longer plans leaves final/, models/ and eval/ with its evaluation.
    other_budget = {**other_data, "selection": {"selectors": ["uniform"], "budgets": [2]}}
    run_pipeline(RunConfig.from_dict(other_budget), progress=False)
    for folder in ("final", "models", "eval"):
        names = sorted(p.name for p in (run / folder).iterdir() if p.is_dir())
        assert "hybrid-gdn-k1-L3" not in names and any(n.startswith("hybrid-gdn-k2") for n in names), (folder, names)
    moved = [p.name.rsplit("-", 1)[0] for p in (run / "superseded").iterdir()]
    assert {"final--hybrid-gdn-k1-L3", "models--hybrid-gdn-k1-L3", "eval--hybrid-gdn-k1-L3"} <= set(moved)


def test_changed_candidate_settings_retrain_the_candidates_and_new_budgets_reuse_them(tmp_path):
    cfg = _config(tmp_path, selection={"selectors": ["ga-s2"], "budgets": [1], "stage2": _stage(2),
                                       "snapshot_every_tokens": SEQ * BATCH})
    stages = ("stage1", "stage2", "selection")
    Pipeline(RunConfig.from_dict(cfg), progress=False).run(stages)
    run = Path(cfg["run_dir"])
    more_budgets = {**cfg, "selection": {**cfg["selection"], "budgets": [1, 2]}}
    state = Pipeline(RunConfig.from_dict(more_budgets), progress=False).run(stages)
    assert not (run / "superseded").exists()  # the same candidates answer the new budget
    assert set(state["stages"]["selection"]["selectors"]["ga-s2"]) == {"K=1", "K=2"}
    longer = {**cfg, "selection": {**cfg["selection"], "stage2": _stage(3)}}
    Pipeline(RunConfig.from_dict(longer), progress=False).run(stages)  # before: "trained with other settings"
    assert [p.name.rsplit("-", 1)[0] for p in (run / "superseded").iterdir()] == ["selection"]
    sel = json.loads((run / "selection" / "ga-s2" / "selection.json").read_text())
    assert sel["tokens"]["per_candidate_stage2"] == 3 * SEQ * BATCH


def test_a_teacher_overwritten_in_place_makes_its_students_stale(tmp_path):
    from hybrid_distill.tiny_teachers import tiny_teacher

    tiny_teacher("llama-gqa", seed=0).save_pretrained(tmp_path / "teacher")
    cfg = RunConfig.from_dict(_config(tmp_path, teacher=str(tmp_path / "teacher"), tokenizer="tiny"))
    Pipeline(cfg, progress=False).run(("stage1",))
    assert Pipeline(cfg, progress=False).run(("stage1",))["stages"]["stage1"]  # done: skipped
    assert not (tmp_path / "run" / "superseded").exists()
    tiny_teacher("llama-gqa", seed=1).save_pretrained(tmp_path / "teacher")  # same path, other weights
    Pipeline(cfg, progress=False).run(("stage1",))
    assert [p.name.rsplit("-", 1)[0] for p in (tmp_path / "run" / "superseded").iterdir()] == ["stage1"]


def test_students_and_evaluations_use_the_fp32_teacher_after_bf16_distillation(tmp_path):
    """distill() casts the frozen teacher to bf16 in place (CUDA's default precision); later students and
    evaluations must not depend on whether that happened earlier in the same process."""
    import torch

    from hybrid_distill.dtypes import cast_model

    pipe = Pipeline(RunConfig.from_dict(_config(tmp_path)), progress=False)
    fp32 = {k: v.clone() for k, v in pipe.teacher.state_dict().items()}
    cast_model(pipe.teacher, torch.bfloat16)  # what a bf16 stage does to the shared teacher
    teacher = pipe.teacher
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    assert all(torch.equal(v, fp32[k]) for k, v in teacher.state_dict().items())


def test_dry_run_prints_plan(tmp_path, capsys):
    path = _write(tmp_path, _config(tmp_path))
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 one-swap + 3 null candidates" in out and "H100-hours" in out and "**total**" in out
    assert "up to 4 final hybrids" in out  # 2 selectors x 2 budgets
    assert not (tmp_path / "run").exists()
    path = _write(tmp_path, _config(tmp_path, final={"stage2": _stage(2), "extra_sets": {"a": [0], "b": [1, 2]}}))
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "up to 6 final hybrids" in capsys.readouterr().out
    from hybrid_distill.pipeline import plan_run

    rows = {r["stage"]: r for r in plan_run(RunConfig.from_dict(_config(tmp_path)))["stages"]}
    # 4 one-swap and 3 null candidates (the default noise floor), each the candidates' Stage-2 tokens
    assert rows["selection"]["what"].startswith("4 one-swap + 3 null candidates") and rows["eval"]["what"].endswith(": recall, quality")
    assert rows["selection"]["tokens"] == 7 * 2 * SEQ * BATCH
    assert rows["eval"]["tokens"] == 6 * (1 * 128 * 2 + 2 * 4 * SEQ)  # 6 models: recall 1 task x 128 x 2, quality
    early = _config(tmp_path, selection={"selectors": ["ga-s2"], "budgets": [1], "early_stop": True, "stage2": _stage(2)},
                    eval={"suite": ["niah", "efficiency"], "lengths": [64], "niah_depths": [0, 50]})
    rows = {r["stage"]: r for r in plan_run(RunConfig.from_dict(early))["stages"]}
    assert rows["selection"]["what"].startswith("up to 4 one-swap + 3 null")
    assert rows["eval"]["tokens"] == 3 * 2 * 64 and "efficiency: timed decoding, not counted" in rows["eval"]["what"]


def _stage_done(run: Path, stage: str) -> bool:
    try:
        return stage in json.loads((run / "pipeline.json").read_text())["stages"]
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def test_kill_and_rerun_skips_finished_stages(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    path = _write(tmp_path, cfg)
    run = Path(cfg["run_dir"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_distill.cli", "run", str(path), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not _stage_done(run, "selection"):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads((run / "pipeline.json").read_text())["stages"]
    assert "report" not in before

    def must_not_run(self):
        raise AssertionError("a finished stage ran again")

    for stage in ("stage1", "stage2", "selection"):
        monkeypatch.setattr(Pipeline, stage, must_not_run)
    state = run_pipeline(RunConfig.from_file(path), progress=False)
    assert all(state["stages"][s] == before[s] for s in ("stage1", "stage2", "selection"))
    assert "report" in state["stages"] and (run / "report.md").is_file()
    # A changed setting re-runs the stages it affects (and those after it), not the ones before.
    cfg["final"] = {"stage2": _stage(3)}
    path.write_text(yaml.safe_dump(cfg))
    ran = []
    monkeypatch.setattr(Pipeline, "final", lambda self: ran.append("final") or {"models": {}, "tokens": 0})
    monkeypatch.setattr(Pipeline, "export", lambda self: ran.append("export") or {})
    monkeypatch.setattr(Pipeline, "eval", lambda self: ran.append("eval") or {})
    monkeypatch.setattr(Pipeline, "report", lambda self: ran.append("report") or {})
    run_pipeline(RunConfig.from_file(path), progress=False)
    assert ran == ["final", "export", "eval", "report"]


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("examples/configs/*.yaml")), ids=lambda p: p.stem)
def test_example_configs_validate(path):
    cfg = RunConfig.from_file(path, check_paths=False)  # real teachers need the hub; fields are checked offline
    assert cfg.selectors and cfg.stage2.data_seq_len == 4096
    assert cfg.selection_config("ga-s2").early_stop


def test_embedded_default_reduced(tmp_path):
    """The README's main job (`hybrid-distill run default`) with every token budget cut to one or two steps."""
    import copy

    base = RunConfig.from_file("default")
    assert base.teacher == "default" and Path(base.teacher_spec, "model.safetensors").is_file()
    data = copy.deepcopy(base.to_dict())
    short = {"target_tokens": 16 * 256}  # one step of the default's 16 x 256 batch
    for name in ("stage1", "stage2"):
        data[name].update(short)
    data["selection"]["stage2"].update(target_tokens=2 * 4 * 256)  # 2 steps of its 4 x 256 batch, a snapshot after each
    data["selection"]["budgets"] = [1, 3]
    data["selection"]["null_candidates"] = 2  # the fewest that give the noise floor a spread
    data["final"]["stage2"].update(short)
    data["eval"].update(num_samples=3, tasks=["niah_single_1", "kv_retrieval"], quality_sequences=4)
    data["data"]["cache_dir"] = str(tmp_path / "tokens")
    # tokenizing the default's 1.5M tokens would be most of the test; at 100k tokens the 2% held-out split would
    # select no whole document and fall back to a few
    data["data"]["max_tokens"] = 200_000
    data["run_dir"] = str(tmp_path / "run")
    state = run_pipeline(RunConfig.from_dict(data), progress=False)
    assert "report" in state["stages"]
    teacher = json.loads((tmp_path / "run/eval/teacher/results.json").read_text())
    assert teacher["recall"]["aggregate"]["overall"] >= 0.8  # the shipped teacher solves the recall tasks
    report = (tmp_path / "run/report.md").read_text()
    assert "hybrid-gdn-k3" in report
    assert "Noise floor (2 null candidates" in report and "top-K beyond the noise floor" in report
    assert "the two KLs differ by sample" in report  # the Final-hybrids KL says what it was measured on


def test_report_efficiency_table_uses_the_teacher_measured_beside_each_model():
    from hybrid_distill.pipeline.report import efficiency_table

    def row(model, ctx, batch, tok_s, cache, oom=False):
        return {"model": model, "context": ctx, "batch": batch, "decode_tokens_per_s": tok_s, "cache_gib": cache, "oom": oom}

    sections = {
        "teacher": {"model": "teacher-self", "baseline": None, "rows": [row("teacher-self", 4096, 8, 1000.0, 1.0)]},
        "hybrid": {"model": "hybrid", "baseline": "teacher", "rows": [
            row("teacher", 4096, 8, 900.0, 1.0), row("hybrid", 4096, 8, 1800.0, 0.25),
            row("teacher", 32768, 8, 0.0, 0.0, oom=True), row("hybrid", 32768, 8, 1500.0, 0.5),
        ]},
    }
    lines = efficiency_table(sections)
    assert lines[4] == "| model | 4096 × 8: tok/s (× teacher), cache (/ teacher) | 32768 × 8: tok/s (× teacher), cache (/ teacher) |"
    assert lines[6] == "| teacher | 1,000, 1 GiB | – |"
    assert lines[7] == "| hybrid | 1,800 (2.00x), 0.25 GiB (25%) | 1,500, 0.5 GiB |"  # the baseline ran out of memory there
