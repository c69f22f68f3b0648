"""scripts/run_state.py: a run folder packed on one machine and unpacked at another path resumes where it stopped
(finished stages reused, not retrained) and ends as an uninterrupted run does; finished final hybrids travel
without their weights and are reused from their records, and a step that needs the left-out weights stops naming
them; state over the limits and damaged parts are refused."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybrid_distill.artifacts import Step, StepRecord
from hybrid_distill.data import DataConfig
from hybrid_distill.distill import DistillConfig, distill
from hybrid_distill.errors import TimeLimitReached
from hybrid_distill.evaluation.suite import evaluation_seconds
from hybrid_distill.layout import RunLayout
from hybrid_distill.pipeline import Pipeline, RunConfig
from hybrid_distill.pipeline import run as pipeline_run
from hybrid_distill.pipeline.budget import Measured, measured_in
from hybrid_distill.pipeline.models import MissingWeightsError, hybrid_finished
from hybrid_distill.pipeline.outcome import outcome
from hybrid_distill.surgery import build_student, load_tokenizer
from hybrid_distill.tiny_teachers import tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import run_state as rs  # noqa: E402

sys.path.pop(0)
sys.path.insert(0, str(ROOT / "tests"))
from test_pipeline import _config  # noqa: E402

sys.path.pop(0)

BASE_STAGES = ("stage1", "stage2")
LATER_STAGES = ("selection", "final", "export", "eval", "report")


WEIGHTS_WHY = "weights of a finished final hybrid"
EXTRA = {"k3": [0, 1, 2]}  # a set no selector of the toy config chooses (budgets 1 and 2 of 4 layers)


def _machine(root: Path, teacher: Path, save_dtype: str = "float32", extra_sets: dict | None = None) -> RunConfig:
    """A run config as a machine with its own paths sees it: the teacher checkpoint copied to ``root/teacher``;
    every stage's output saved in ``save_dtype``; ``extra_sets`` as ``final.extra_sets``."""
    shutil.copytree(teacher, root / "teacher")
    cfg = _config(root, teacher=str(root / "teacher"), tokenizer="tiny")
    for stage in (cfg["stage1"], cfg["stage2"], cfg["final"]["stage2"]):
        stage["save_dtype"] = save_dtype
    if extra_sets:
        cfg["final"]["extra_sets"] = extra_sets
    return RunConfig.from_dict(cfg)


def _read(path: Path):
    return json.loads(path.read_text())


def _outcome(run: Path) -> dict:
    """What the run found: rankings and scores of each selection, each final hybrid's held-out KL and evaluation."""
    out = {}
    for sel in sorted((run / "selection").glob("*/selection.json")):
        s = _read(sel)
        out[sel.parent.name] = {"ranking": s.get("ranking"), "scores": s.get("scores"), "budgets": s["budgets"]}
    for final in sorted((run / "final").iterdir()):
        out[final.name] = _read(final / "step.json")["result"]["eval_value"]
    for ev in sorted((run / "eval").iterdir()):
        res = _read(ev / "results.json")
        out[f"eval/{ev.name}"] = {"recall": res["recall"]["aggregate"], "quality": res["quality"]}
    return out


def _hybrid_weights(manifest: dict) -> set[str]:
    return {e["path"] for e in manifest["left_out"] if e["why"].startswith(WEIGHTS_WHY)}


def _pack_bytes(manifest: dict) -> int:
    return sum(p["bytes"] for p in manifest["parts"])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    tiny_teacher("llama-gqa", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, teacher_dir) -> RunConfig:
    """Every stage of the toy run done, outputs saved in bf16 (as the reproduction saves them). Read only."""
    cfg = _machine(tmp_path_factory.mktemp("finished"), teacher_dir, "bfloat16")
    Pipeline(cfg, progress=False).run()
    return cfg


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_a_packed_run_resumes_at_another_path_and_ends_as_an_uninterrupted_run(tmp_path, teacher_dir, save_dtype,
                                                                              request):
    if save_dtype == "bfloat16":
        reference = request.getfixturevalue("finished_run")  # the uninterrupted run in bf16 (read only)
    else:
        reference = _machine(tmp_path / "one", teacher_dir, save_dtype)
        Pipeline(reference, progress=False).run()

    first = _machine(tmp_path / "A", teacher_dir, save_dtype)
    pipe = Pipeline(first, progress=False)
    pipe.run(BASE_STAGES)
    for name in ("teacher", "all-gdn"):  # evaluated early, as scripts/reproduce.py does
        pipe.evaluate(name)
    run_a = Path(first.run_dir)
    (run_a / "superseded" / "old").mkdir(parents=True)
    (run_a / "superseded" / "old" / "big.bin").write_bytes(b"x" * 1000)
    manifest = rs.pack(run_a, tmp_path / "out")
    packed = set(manifest["files"])
    assert {"pipeline.json", "stage1/step.json", "stage2/final/model.safetensors", "eval/teacher/results.json"} <= packed
    assert not any(p.startswith("superseded/") or "/checkpoints/" in p or p.endswith(".lock") for p in packed)
    assert {"path": "superseded", "why": "not read by a resumed run"} in manifest["left_out"]

    second = _machine(tmp_path / "B", teacher_dir, save_dtype)
    run_b = Path(second.run_dir)
    rs.unpack([tmp_path / "out"], run_b)
    before = {rel: (run_b / rel).read_bytes() for rel in ("stage1/step.json", "stage2/step.json", "stage1/metrics.jsonl",
                                                         "stage2/metrics.jsonl", "eval/teacher/step.json",
                                                         "eval/all-gdn/results.json")}
    state = Pipeline(second, progress=False).run()
    # Stage 1 and 2 and the early evaluations are reused: the same records, no new training metrics
    assert {rel: (run_b / rel).read_bytes() for rel in before} == before
    stages_a = _read(run_a / "pipeline.json")["stages"]
    for stage in BASE_STAGES:
        assert state["stages"][stage]["run_id"] == stages_a[stage]["run_id"]
    assert not (run_b / "superseded").exists()
    # the run ends as the uninterrupted one did
    assert _outcome(run_b) == _outcome(Path(reference.run_dir))

    # a second hop: everything done, packed again and unpacked elsewhere, nothing is run again
    rs.pack(run_b, tmp_path / "out2")
    third = _machine(tmp_path / "C", teacher_dir, save_dtype)
    rs.unpack([tmp_path / "out2"], third.run_dir)
    again = Pipeline(third, progress=False).run()
    assert {s: e["run_id"] for s, e in again["stages"].items()} == {s: e["run_id"] for s, e in state["stages"].items()}
    assert _outcome(Path(third.run_dir)) == _outcome(run_b)
    for folder in ("stage1/final", "stage2/final", *(f"models/{m.name}" for m in (run_b / "models").iterdir())):
        dtypes = {t.dtype for t in load_file(str(run_b / folder / "model.safetensors")).values()}
        assert dtypes == {getattr(torch, save_dtype)}, folder


def test_a_stage_saved_in_bf16_leaves_the_saved_weights_in_the_student(tmp_path):
    """The file is the stage's output: the student in memory after training equals it (a later stage that runs in
    the same process sees what one that loads the file sees), and so does a finished run loaded again."""
    teacher = tiny_teacher("llama-gqa", seed=0)
    data = DataConfig(source="default", max_tokens=40_000, cache_dir=str(tmp_path / "tokens"))
    tok = load_tokenizer("tiny:llama-gqa", "tiny", teacher.config.vocab_size)
    cfg = DistillConfig(stage=2, target_tokens=2 * 4 * 32, seq_len=32, global_batch_size=4, eval_max_batches=1,
                        progress=False, save_dtype="bfloat16")

    def student():
        torch.manual_seed(0)
        return build_student(teacher, ["gdn"] * teacher.config.num_hidden_layers).float()

    trained = student()
    result = distill(trained, teacher, data.load(tok, 32, require_sequences=4), cfg, tmp_path / "run", tokenizer=tok)
    saved = load_file(str(Path(result.final_model_dir) / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    state = trained.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in saved.items())
    again = student()
    assert distill(again, teacher, data.load(tok, 32), cfg, tmp_path / "run", tokenizer=tok).already_done
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    # the stage's key knows the dtype: the same run saved in float32 is another run
    assert json.loads((tmp_path / "run" / "step.json").read_text())["settings"]["train"]["save_dtype"] == "bfloat16"


def test_unfinished_steps_are_left_out_and_start_again(tmp_path, teacher_dir):
    cfg = _machine(tmp_path / "A", teacher_dir)
    Pipeline(cfg, progress=False).run(BASE_STAGES)
    run = Path(cfg.run_dir)
    record = _read(run / "stage2" / "step.json")
    record["state"], record["result"] = "started", None  # as a run killed mid-way through Stage 2 leaves it
    (run / "stage2" / "step.json").write_text(json.dumps(record))
    state = _read(run / "pipeline.json")
    del state["stages"]["stage2"]
    (run / "pipeline.json").write_text(json.dumps(state))
    manifest = rs.pack(run, tmp_path / "out")
    assert {"path": "stage2", "why": "unfinished step (starts again on resume)"} in manifest["left_out"]
    assert not any(p.startswith("stage2/") for p in manifest["files"])
    other = _machine(tmp_path / "B", teacher_dir)
    rs.unpack([tmp_path / "out"], other.run_dir)
    state = Pipeline(other, progress=False).run(BASE_STAGES)
    assert _read(Path(other.run_dir) / "stage2" / "step.json")["state"] == "done"
    assert state["stages"]["stage1"]["run_id"] == _read(run / "stage1" / "step.json")["run_id"]


def test_state_over_the_limits_is_refused_naming_the_largest_files(tmp_path, teacher_dir):
    cfg = _machine(tmp_path / "A", teacher_dir)
    Pipeline(cfg, progress=False).run(("stage1",))
    run = Path(cfg.run_dir)
    weights = (run / "stage1" / "final" / "model.safetensors").stat().st_size
    with pytest.raises(rs.RunStateError, match=r"exceeds .* in all.*largest files: stage1/final/model\.safetensors"):
        rs.pack(run, tmp_path / "out", rs.Limits(max_file_bytes=weights, max_files=8, max_total_bytes=weights // 2))
    with pytest.raises(rs.RunStateError, match=r"parts of .* exceed 2 files.*largest folders: stage1/"):
        rs.pack(run, tmp_path / "out", rs.Limits(max_file_bytes=weights // 4, max_files=2, max_total_bytes=4 * weights))
    assert not (tmp_path / "out").exists()  # refused before anything is written
    # within the limits: parts of at most max_file_bytes that join into the same folder
    manifest = rs.pack(run, tmp_path / "out", rs.Limits(max_file_bytes=weights // 3, max_files=8, max_total_bytes=4 * weights))
    assert len(manifest["parts"]) >= 3 and all(p["bytes"] <= weights // 3 for p in manifest["parts"])
    distinct = {f["sha256"]: f["bytes"] for f in manifest["files"].values()}
    assert manifest["compression"] == "gzip" and _pack_bytes(manifest) < 0.95 * sum(distinct.values())
    rs.unpack([tmp_path / "out"], tmp_path / "B" / "run")
    for rel, f in manifest["files"].items():
        assert (tmp_path / "B" / "run" / rel).read_bytes() == (run / rel).read_bytes(), rel


def test_damaged_or_missing_parts_are_refused_and_nothing_is_unpacked(tmp_path, teacher_dir):
    cfg = _machine(tmp_path / "A", teacher_dir)
    Pipeline(cfg, progress=False).run(("stage1",))
    manifest = rs.pack(cfg.run_dir, tmp_path / "out", rs.Limits(max_file_bytes=1 << 18))
    part = tmp_path / "out" / manifest["parts"][1]["name"]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(rs.RunStateError, match=rf"part .*{part.name} is damaged"):
        rs.unpack([tmp_path / "out"], tmp_path / "B" / "run")
    assert not (tmp_path / "B" / "run").exists()
    part.unlink()
    files = [p for p in (tmp_path / "out").iterdir()]
    with pytest.raises(rs.RunStateError, match=rf"part {part.name} is missing"):
        rs.unpack(files, tmp_path / "B" / "run")
    with pytest.raises(rs.RunStateError, match="exists and is not empty"):
        rs.unpack([tmp_path / "out"], cfg.run_dir)


def test_finished_hybrids_travel_without_weights_and_are_reused_when_sets_are_added(tmp_path, teacher_dir, finished_run):
    run_a = Path(finished_run.run_dir)
    hybrids = sorted(p.name for p in (run_a / "final").iterdir())
    assert len(hybrids) >= 2
    kept = rs.pack(run_a, tmp_path / "kept", keep_hybrid_weights=True)
    manifest = rs.pack(run_a, tmp_path / "out")
    weights = {f"final/{h}/final" for h in hybrids} | {f"models/{h}/model.safetensors" for h in hybrids}
    assert _hybrid_weights(manifest) == weights and not _hybrid_weights(kept)
    dropped = {rel for rel in kept["files"] if any(rel == w or rel.startswith(w + "/") for w in weights)}
    assert set(manifest["files"]) == set(kept["files"]) - dropped
    assert {f"final/{h}/final/model.safetensors" for h in hybrids} <= dropped
    # smaller by most of the weights' distinct content (gzip keeps well over half of float weights' bytes)
    distinct = {kept["files"][rel]["sha256"]: kept["files"][rel]["bytes"] for rel in dropped if rel.endswith(".safetensors")}
    assert _pack_bytes(kept) - _pack_bytes(manifest) >= 0.5 * sum(distinct.values())

    second = _machine(tmp_path / "B", teacher_dir, "bfloat16", extra_sets=EXTRA)
    run_b = Path(second.run_dir)
    rs.unpack([tmp_path / "out"], run_b)
    records = [f"{d}/{h}/{f}" for h in hybrids for d, f in (("final", "step.json"), ("final", "metrics.jsonl"),
                                                            ("models", "step.json"), ("eval", "step.json"),
                                                            ("eval", "results.json"))]
    before = {rel: (run_b / rel).read_bytes() for rel in records}
    state = Pipeline(second, progress=False).run()
    # the earlier hybrids: neither trained nor evaluated again, still without weights, their stored results kept
    assert {rel: (run_b / rel).read_bytes() for rel in records} == before
    assert not [f for h in hybrids for f in (*(run_b / "models" / h).glob("*.safetensors"), run_b / "final" / h / "final")
                if f.exists()]
    assert not (run_b / "superseded").exists()
    final_a = _read(run_a / "pipeline.json")["stages"]["final"]["models"]
    for h in hybrids:
        reused = state["stages"]["final"]["models"][h]
        assert {k: reused[k] for k in ("tokens", "eval", "compute_time_s")} == {k: final_a[h][k] for k in ("tokens", "eval", "compute_time_s")}
    # the added one is trained, saved and evaluated; the report lists them all
    new = "hybrid-gdn-k3-L0_1_2"
    assert set(state["stages"]["final"]["models"]) == {*hybrids, new}
    assert _read(run_b / "final" / new / "step.json")["state"] == "done"
    assert (run_b / "models" / new / "model.safetensors").is_file()
    assert _read(run_b / "eval" / new / "step.json")["state"] == "done"
    report = (run_b / "report.md").read_text()
    assert all(name in report for name in (*hybrids, new))
    # packed again, the new hybrid's weights are left out too
    again = rs.pack(run_b, tmp_path / "out2")
    assert _hybrid_weights(again) == {f"final/{new}/final", f"models/{new}/model.safetensors"}


def test_a_hybrid_not_evaluated_keeps_its_weights_and_its_evaluation_stops_without_them(tmp_path, teacher_dir):
    cfg = _machine(tmp_path / "A", teacher_dir)
    Pipeline(cfg, progress=False).run((*BASE_STAGES, "selection", "final"))
    manifest = rs.pack(cfg.run_dir, tmp_path / "out")
    assert not _hybrid_weights(manifest)  # trained and saved, not evaluated: its weights travel
    other = _machine(tmp_path / "B", teacher_dir)
    run_b = Path(other.run_dir)
    rs.unpack([tmp_path / "out"], run_b)
    first = next(iter(Pipeline(other, progress=False).final_sets()))
    shutil.rmtree(run_b / "final" / first / "final")  # as a pack that left them out by force
    (run_b / "models" / first / "model.safetensors").unlink()
    records = {rel: (run_b / rel).read_bytes() for rel in (f"final/{first}/step.json", f"models/{first}/step.json")}
    with pytest.raises(MissingWeightsError, match=rf"evaluation .*eval/{first} needs the weights of .*models/{first}, "
                                                  r"and it holds none .*left out when the run folder was packed"):
        Pipeline(other, progress=False).run()
    assert {rel: (run_b / rel).read_bytes() for rel in records} == records  # not trained or saved again
    assert not (run_b / "eval" / first).exists()
    assert "eval" not in _read(run_b / "pipeline.json")["stages"]



def _measured_slower(kind: str, factor: float = 1e6):
    """`measured_in` with the finished training runs of ``kind`` made ``factor`` times slower than they ran: what
    comes after them does not fit a time limit once they are measured, whatever this machine's speed."""
    def measured(*args, **kwargs) -> Measured:
        real = measured_in(*args, **kwargs)
        return Measured({k: [(t, s * factor if k == kind else s) for t, s in runs] for k, runs in real.training.items()},
                        real.seconds)

    return measured


def _step_done(folder: Path) -> bool:
    record = StepRecord.read(folder) if folder.is_dir() else None
    return record is not None and record.state == "done"


def test_a_run_under_a_time_limit_stops_between_units_and_ends_as_an_uninterrupted_run(tmp_path, teacher_dir,
                                                                                     finished_run, monkeypatch):
    cfg = _machine(tmp_path / "A", teacher_dir, "bfloat16")
    run_a = Path(cfg.run_dir)
    # session 1: Stage 1 and 2 start unestimated (nothing measured yet); the GA candidates, estimated from Stage 2,
    # do not fit
    monkeypatch.setattr(pipeline_run, "measured_in", _measured_slower("stage2"))
    with pytest.raises(TimeLimitReached) as stop:
        Pipeline(cfg, progress=False).run(time_limit=600)
    assert not stop.value.during and stop.value.unit.endswith("candidates (7 of 7 to train)")
    assert stop.value.estimate_s * 1.25 > 600 and stop.value.limit_s == 600
    assert set(_read(run_a / "pipeline.json")["stages"]) == set(BASE_STAGES)
    assert not (run_a / "selection" / "candidates").exists()

    # session 2: selection runs; the final hybrids are finished one at a time, and the second, estimated from the
    # first's training, does not fit: the one trained is saved and evaluated, so its weights need not travel
    monkeypatch.setattr(pipeline_run, "measured_in", _measured_slower("final"))
    with pytest.raises(TimeLimitReached) as stop:
        Pipeline(cfg, progress=False).run(time_limit=600)
    first, second, *_ = Pipeline(cfg, progress=False).final_sets()
    assert stop.value.unit == f"final hybrid {second}" and not (run_a / "final" / second).exists()
    assert all(_step_done(run_a / d / first) for d in ("final", "models", "eval"))
    assert _step_done(run_a / "eval" / "all-gdn")  # evaluated before the hybrids: what their evaluation is estimated by
    assert hybrid_finished(RunLayout(run_a), first, exports=False)
    assert set(_read(run_a / "pipeline.json")["stages"]) == {*BASE_STAGES, "selection"}  # final: not complete
    manifest = rs.pack(run_a, tmp_path / "out")
    assert _hybrid_weights(manifest) == {f"final/{first}/final", f"models/{first}/model.safetensors"}

    # session 3, at another path, without a limit: it continues and ends as the run that never stopped
    monkeypatch.undo()
    other = _machine(tmp_path / "B", teacher_dir, "bfloat16")
    run_b = Path(other.run_dir)
    rs.unpack([tmp_path / "out"], run_b)
    state = Pipeline(other, progress=False).run()
    reference = Path(finished_run.run_dir)
    assert _outcome(run_b) == _outcome(reference)
    assert {s: e["key"] for s, e in state["stages"].items()} == \
        {s: e["key"] for s, e in _read(reference / "pipeline.json")["stages"].items()}
    for rel in sorted(str(p.relative_to(reference)) for p in reference.glob("*/*/step.json")):
        if rel.startswith(("final/", "eval/", "models/")):  # the same settings; an evaluation's of the same weights
            got, want = (_read(run / rel)["settings"] for run in (run_b, reference))
            if "model" in want and isinstance(want["model"], dict):  # its config.json names the teacher's path
                got["model"], want["model"] = got["model"]["weights"], want["model"]["weights"]
            assert got == want, rel
    stages = {run: _read(run / "pipeline.json")["stages"] for run in (run_b, reference)}
    fields = ("layers", "chosen_by", "tokens", "eval")  # of each final hybrid: all but its path and the time it took
    assert [{n: {f: m[f] for f in fields} for n, m in s["final"]["models"].items()} for s in stages.values()] == \
        [{n: {f: m[f] for f in fields} for n, m in stages[reference]["final"]["models"].items()}] * 2
    assert [set(s["eval"]["models"]) for s in stages.values()] == [set(stages[reference]["eval"]["models"])] * 2


def test_what_a_run_measured_is_read_from_its_records(finished_run):
    run = Path(finished_run.run_dir)
    pipe = Pipeline(finished_run, progress=False)
    measured = pipe.measured()

    def recorded(folder: Path) -> tuple[int, float]:
        result = _read(folder / "step.json")["result"]
        return result["tokens"], result["wall_time_s"]

    assert measured.training["stage1"] == [recorded(run / "stage1")]
    assert measured.training["stage2"] == [recorded(run / "stage2")]
    assert sorted(measured.training["final"]) == sorted(recorded(p) for p in (run / "final").iterdir())
    assert len(measured.training["candidate-stage2"]) == 7 and "candidate-stage1" not in measured.training  # 4 + 3 null
    evals = {name: evaluation_seconds(_read(run / "eval" / name / "results.json")) for name in pipe.eval_models()}
    assert measured.seconds["eval-teacher"] == [evals.pop("teacher")]
    assert measured.seconds["eval-linear"] == [evals.pop("all-gdn")]
    assert sorted(measured.seconds["eval-hybrid"]) == sorted(evals.values()) and all(t > 0 for t in evals.values())
    # evaluations made under other evaluation settings measure nothing for this run's
    other = measured_in(RunLayout(run), "gdn", {**pipe.eval_settings(), "num_samples": 99,
                                                "teacher_model": pipe.teacher_identity})
    assert other.training == measured.training and not other.seconds


def test_the_outcome_of_a_finished_run_agrees_with_its_evaluations_and_selections(finished_run):
    run = Path(finished_run.run_dir)
    res = outcome([run], resamples=200)
    assert (res.tasks, res.lengths, res.num_layers) == (["kv_retrieval"], [128], 4)
    assert [(b.label, b.k) for b in res.budgets] == [("K=1", 1), ("K=2", 2)]
    for b in res.budgets:
        assert [r.name for r in b.rows] == ["ga-s2", "uniform", "teacher", "all-gdn"]
        for row in b.rows:  # the evaluation's own aggregate of the same predictions
            results = _read(run / "eval" / row.models[0] / "results.json")
            assert row.recall == pytest.approx(results["recall"]["aggregate"]["overall"])
            kl = results["quality"].get("kl")  # none for the teacher
            assert row.kl == (pytest.approx(kl) if row.name != "teacher" else None)
        ga, uniform = b.row("ga-s2"), b.row("uniform")
        assert uniform.versus_primary.mean == pytest.approx(ga.recall - uniform.recall)
        assert b.endpoint.outcomes["ga-s2"].recall == pytest.approx(ga.recall)
    sel = _read(run / "selection" / "ga-s2" / "selection.json")
    (diag,) = [d for d in res.diagnostics if d.selector == "ga-s2"]
    assert [x.early_stop for x in diag.budgets] == ["off", "off"]  # the toy config does not stop early
    assert [x.snr for x in diag.budgets] == [sel["noise_floor"][-1]["snr"]] * 2
    assert [x.resolved for x in diag.budgets] == [sel["budgets"][x.label]["resolved"] for x in diag.budgets]
    assert [x.layers for x in diag.budgets] == [sel["budgets"][x.label]["sets"] for x in diag.budgets]


def _done(folder: Path, settings: dict, upstream: dict | None = None, result: dict | None = None):
    """A finished step in ``folder`` (what was there replaced)."""
    step = Step(folder, settings, upstream)
    step.begin("replace")
    return step.publish(result or {})


def test_a_hybrid_is_finished_only_when_saved_evaluated_and_exported_from_its_own_run(tmp_path):
    layout, name, identity = RunLayout(tmp_path / "run"), "hybrid-gdn-k1-L0", {"weights": "w", "config": "c"}
    train = _done(layout.final_run(name).root, {"train": 1})
    assert not hybrid_finished(layout, name, exports=False)  # not saved
    _done(layout.model(name), {"model": name}, {"final": train.run_id}, {"model": name})
    _done(layout.eval(name), {"model": identity})
    assert not hybrid_finished(layout, name, exports=False)  # saved without its identity: the key needs the weights
    model = _done(layout.model(name), {"model": name}, {"final": train.run_id}, {"model": name, "identity": identity})
    assert hybrid_finished(layout, name, exports=False)
    assert not hybrid_finished(layout, name, exports=True)  # not exported
    _done(layout.export(name), {"export": "x"}, {"model": model.run_id})
    assert hybrid_finished(layout, name, exports=True)
    _done(layout.eval(name), {"model": {**identity, "weights": "other"}})
    assert not hybrid_finished(layout, name, exports=True)  # evaluated on other weights
    _done(layout.eval(name), {"model": identity})
    assert hybrid_finished(layout, name, exports=True)
    Step(layout.final_run(name).root, {"train": 2}).begin("replace")  # trained again, not finished
    assert not hybrid_finished(layout, name, exports=True)
