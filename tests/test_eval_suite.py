"""evaluate_model / CLI / quality / compare / lm_eval bridge on tiny random models (CPU, seconds)."""

import argparse
import copy
import json
import math
import sys

import pytest
import torch

from hybrid_distill.evaluation.compare import compare_results
from hybrid_distill.evaluation.quality import evaluate_quality, heldout_batches, perplexity, teacher_student_kl
from hybrid_distill.evaluation.config import parse_suite
from hybrid_distill.evaluation.suite import add_eval_arguments, evaluate_model, run_eval_from_args
from hybrid_distill.tiny_teachers import tiny_teacher
from hybrid_distill.tokenization import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_teacher("llama-gqa", num_hidden_layers=2)


def test_evaluate_model_writes_files_and_consistent_aggregates(model, tok, tmp_path):
    out = tmp_path / "run"
    res = evaluate_model(model, tok, out, suite=["recall", "niah"], tasks=["niah_single_1", "kv_retrieval"],
                         lengths=(160, 200), num_samples=2, niah_depths=(0, 50, 100), batch_size=4,
                         task_options={"niah_single_1": {"max_new_tokens": 8}}, model_name="rand")
    for f in ("results.json", "summary.md", "niah.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["model"] == "rand" and on_disk["suites"] == ["recall", "niah"]
    preds = on_disk["recall"]["predictions"]
    assert len(preds) == 2 * 2 * 2
    assert {(p["task"], p["length"]) for p in preds} == {(t, n) for t in ("niah_single_1", "kv_retrieval") for n in (160, 200)}
    assert all(0.0 <= p["score"] <= 1.0 and isinstance(p["prediction"], str) for p in preds)
    agg = on_disk["recall"]["aggregate"]
    for t in ("niah_single_1", "kv_retrieval"):
        for n in (160, 200):
            scores = [p["score"] for p in preds if p["task"] == t and p["length"] == n]
            assert agg["per_task_length"][t][str(n)] == pytest.approx(sum(scores) / len(scores))
    assert agg["overall_samples"] == pytest.approx(sum(p["score"] for p in preds) / len(preds))
    per_task = [sum(agg["per_task_length"][t].values()) / 2 for t in ("niah_single_1", "kv_retrieval")]
    assert agg["overall"] == pytest.approx(sum(per_task) / 2)
    assert agg["ruler_tasks"] == ["niah_single_1"]  # kv_retrieval is not one of RULER's
    assert agg["ruler"] == pytest.approx(per_task[0])
    # NIAH: 2 lengths x 3 depths, table = mean of per-cell predictions
    niah = on_disk["niah"]
    assert len(niah["predictions"]) == 6 and len(niah["table"]) == 6
    for row in niah["table"]:
        cell = [p["score"] for p in niah["predictions"] if p["depth"] == row["depth"] and p["length"] == row["length"]]
        assert row["score"] == pytest.approx(sum(cell) / len(cell))
    assert niah["mean"] == pytest.approx(sum(r["score"] for r in niah["table"]) / 6)
    md = (out / "summary.md").read_text()
    assert "| niah_single_1 |" in md and "| kv_retrieval |" in md and "niah.png" in md
    assert "| task | 160 | 200 | mean |" in md and "RULER's offline tasks (niah_single_1)" in md
    assert res["recall"]["aggregate"]["overall"] == agg["overall"]


def test_second_model_reuses_the_generated_samples(model, tok, tmp_path, monkeypatch):
    from hybrid_distill.evaluation import suite

    made = []
    for name in ("generate_samples", "niah_grid_samples"):  # the generators the suite calls
        real = getattr(suite, name)
        monkeypatch.setattr(suite, name, lambda *a, _real=real, _name=name, **k: made.append(_name) or _real(*a, **k))
    tokenizer = copy.deepcopy(tiny_tokenizer())  # a new tokenizer object: nothing cached for it yet
    kw = dict(suite=["recall", "niah"], tasks=["kv_retrieval"], lengths=(160,), num_samples=2, niah_depths=(0, 100), batch_size=4)
    first = evaluate_model(model, tokenizer, tmp_path / "a", **kw)
    second = evaluate_model(model, tokenizer, tmp_path / "b", **kw)
    assert made == ["niah_grid_samples", "generate_samples"]  # once, for the first model (NIAH first: checked up front)
    for part in ("recall", "niah"):
        assert [p["answers"] for p in first[part]["predictions"]] == [p["answers"] for p in second[part]["predictions"]]
    evaluate_model(model, tokenizer, tmp_path / "c", **{**kw, "lengths": (200,)})
    assert made.count("generate_samples") == made.count("niah_grid_samples") == 2  # other lengths: generated anew
    assert len(suite._SAMPLES[tokenizer]) == 4


def test_evaluate_model_skips_too_short_lengths(model, tok, tmp_path):
    res = evaluate_model(model, tok, tmp_path, tasks=["niah_single_1"], lengths=(64,), num_samples=1)
    assert res["recall"]["predictions"] == [] and res["recall"]["skipped"][0]["length"] == 64
    assert "skipped niah_single_1 at 64" in (tmp_path / "summary.md").read_text()


def test_bad_suite_and_task(model, tok, tmp_path):
    with pytest.raises(ValueError, match="suite"):
        evaluate_model(model, tok, tmp_path, suite="nope")
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_model(model, tok, tmp_path, tasks=["nope"])


def _quality_batches(tok, tmp_path):
    return heldout_batches(tok, "default", seq_len=64, batch_size=4, max_sequences=8, max_tokens=64 * 400,
                           heldout_fraction=0.2, cache_dir=tmp_path / "cache")


def test_quality_all_softmax_student_matches_teacher(tok, tmp_path):
    from hybrid_distill.surgery import build_student

    teacher = tiny_teacher("llama-gqa", num_hidden_layers=2)
    student = build_student(teacher, ["softmax"] * 2).eval()
    batches = _quality_batches(tok, tmp_path)
    assert sum(b.shape[0] for b in batches) == 8 and batches[0].shape[1] == 64
    pt, ps = perplexity(teacher, batches), perplexity(student, batches)
    assert pt["tokens"] == ps["tokens"] == 8 * 63
    assert ps["perplexity"] == pytest.approx(pt["perplexity"], rel=1e-5)
    assert 1 < pt["perplexity"] < 10 * 512  # random model: around the vocab size
    assert teacher_student_kl(student, teacher, batches) == pytest.approx(0.0, abs=1e-6)
    q = evaluate_quality(student, batches, teacher=teacher)
    assert q["kl"] == pytest.approx(0.0, abs=1e-6) and q["teacher_perplexity"] == pytest.approx(q["perplexity"], rel=1e-5)
    other = tiny_teacher("llama-gqa", num_hidden_layers=2, seed=1)
    assert teacher_student_kl(other, teacher, batches) > 1e-3


def test_perplexity_respects_attention_mask(model):
    ids = torch.randint(3, 500, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    res = perplexity(model, [{"input_ids": ids, "attention_mask": mask}])
    assert res["tokens"] == 15 + 11 and math.isfinite(res["nll"])
    # the padded row scores as if it had come alone, unpadded, whatever the pad positions hold
    alone = [perplexity(model, [{"input_ids": ids[:1, 4:]}]), perplexity(model, [{"input_ids": ids[1:]}])]
    assert res["nll"] * 26 == pytest.approx(alone[0]["nll"] * 11 + alone[1]["nll"] * 15, rel=1e-5)
    other_pads = ids.clone()
    other_pads[0, :4] = torch.randint(3, 500, (4,))
    assert perplexity(model, [{"input_ids": other_pads, "attention_mask": mask}])["nll"] == pytest.approx(res["nll"], rel=1e-6)


def test_cli_eval_tiny_model_with_quality_and_compare(tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="hybrid-distill")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval_from_args)
    dirs = []
    for variant in ("llama-gqa", "mistral"):
        out = tmp_path / variant
        args = parser.parse_args(["eval", "--model", f"tiny:{variant}", "--suite", "recall,quality", "--lengths", "160",
                                  "--tasks", "kv_retrieval", "--num-samples", "2", "--out", str(out),
                                  "--teacher", "tiny:llama-gqa", "--quality-seq-len", "64", "--quality-sequences", "4",
                                  "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
        assert args.func(args) == 0
        dirs.append(out)
        res = json.loads((out / "results.json").read_text())
        assert res["model"] == f"tiny:{variant}" and res["quality"]["sequences"] == 4
        assert math.isfinite(res["quality"]["perplexity"])
    first = json.loads((dirs[0] / "results.json").read_text())
    assert first["quality"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the teacher against itself
    assert "KL(teacher" in (dirs[0] / "summary.md").read_text()
    assert "| kv_retrieval |" in capsys.readouterr().out

    comp = compare_results(dirs, tmp_path / "cmp")
    assert comp["models"] == ["tiny:llama-gqa", "tiny:mistral"]
    for f in ("comparison.md", "comparison.json", "comparison.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| metric | tiny:llama-gqa | tiny:mistral |" in md
    assert "recall/kv_retrieval@160" in comp["metrics"] and "quality/kl" in comp["metrics"]
    assert comp["metrics"]["quality/kl"]["tiny:llama-gqa"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(FileNotFoundError):
        compare_results([tmp_path / "missing"], tmp_path / "cmp2")

    from hybrid_distill.cli import main

    capsys.readouterr()
    assert main(["compare", *map(str, dirs), "--out", str(tmp_path / "cmp3"), "--names", "gqa,mistral"]) == 0
    assert "| metric | gqa | mistral |" in capsys.readouterr().out
    assert (tmp_path / "cmp3" / "comparison.png").stat().st_size > 0
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "cmp4")]) == 2
    assert "missing" in capsys.readouterr().err


def test_cli_efficiency_suite_with_teacher_baseline_and_compare(tmp_path):
    """`--suite efficiency` measures the model beside its teacher and writes table, plot and comparable metrics;
    `all` leaves it out (it times the device)."""
    parser = argparse.ArgumentParser(prog="hybrid-distill")
    add_eval_arguments(parser)
    out = tmp_path / "eff"
    args = parser.parse_args(["--model", "tiny:qwen2-bias-tied", "--teacher", "tiny:qwen2-bias-tied", "--suite", "efficiency",
                              "--lengths", "48", "--efficiency-batches", "1,3", "--decode-steps", "2", "--out", str(out),
                              "--device", "cpu", "--tokenizer", "tiny"])
    assert run_eval_from_args(args) == 0
    res = json.loads((out / "results.json").read_text())
    eff = res["efficiency"]
    assert res["suites"] == ["efficiency"] and res["config"]["efficiency_batches"] == [1, 3]
    assert [(r["model"], r["context"], r["batch"]) for r in eff["rows"]] == [
        ("teacher", 48, 1), ("tiny:qwen2-bias-tied", 48, 1), ("teacher", 48, 3), ("tiny:qwen2-bias-tied", 48, 3)
    ]
    assert all(r["peak_gib"] is None and r["decode_ms_per_step"] > 0 for r in eff["rows"])  # CPU: no peak memory
    summary = (out / "summary.md").read_text()
    assert "## Inference efficiency" in summary and "decode speed-up" in summary and "![efficiency](efficiency.png)" in summary
    assert (out / "efficiency.png").stat().st_size > 0

    comp = compare_results([out, out], tmp_path / "cmp", names=["a", "b"])
    metrics = comp["metrics"]
    assert set(metrics) == {f"efficiency/{k}@48x{b}" for k in ("decode_tok_s", "prefill_ms", "cache_gib", "peak_gib")
                            for b in (1, 3)}
    assert metrics["efficiency/cache_gib@48x3"]["a"] == eff["rows"][3]["cache_gib"]  # the model's row, not the teacher's
    assert parse_suite("all") == ["recall", "niah", "quality"]
    assert parse_suite("all,efficiency") == ["recall", "niah", "quality", "efficiency"]


def test_compare_orders_lengths_by_value_and_bolds_the_lower_cost(tmp_path):
    def run(name, tok_s, cache):
        rows = [{"model": name, "context": c, "batch": 8, "prefill_ms": 1.0, "decode_ms_per_step": 1.0,
                 "decode_tokens_per_s": tok_s, "cache_gib": cache, "peak_gib": 2.0, "oom": False, "min_read_gib": 1.0}
                for c in (4096, 16384)]
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"model": name, "efficiency": {"model": name, "rows": rows}}))
        return d

    comp = compare_results([run("fast", 300.0, 1.0), run("slow", 100.0, 4.0)], tmp_path / "cmp")
    keys = list(comp["metrics"])
    assert keys.index("efficiency/cache_gib@4096x8") < keys.index("efficiency/cache_gib@16384x8")
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| efficiency/decode_tok_s@4096x8 | **300.0** | 100.0 |" in md
    assert "| efficiency/cache_gib@4096x8 | **1.000** | 4.000 |" in md


def test_lm_eval_bridge_without_lm_eval_names_the_extra(monkeypatch, model, tok):
    from hybrid_distill.evaluation import lm_eval_bridge as b

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed, whether or not it is
    with pytest.raises(b.LmEvalUnavailable, match=r'pip install "lm_eval\[ruler\]"') as err:
        b.evaluate_with_lm_eval(model, ["ruler"], tokenizer=tok, max_length=256)
    assert "network" in str(err.value) and isinstance(err.value, ImportError)


def test_default_eval_folders_differ_for_each_stage_final_model():
    from hybrid_distill.evaluation.suite import default_eval_name

    assert default_eval_name("runs/a/stage1/final") == "a-stage1-final"
    assert default_eval_name("runs/a/stage2/final") == "a-stage2-final"
    assert default_eval_name("tiny:llama-gqa") == "tiny-llama-gqa"


def _recall_results(path, name, cells, niah=None):
    """A results.json with recall cells {(task, length): score} (and NIAH rows {(depth, length): score})."""
    from hybrid_distill.evaluation.scoring import aggregate

    agg = aggregate([{"task": t, "length": n, "score": v} for (t, n), v in cells.items()], ruler_tasks=["niah_single_1"])
    res = {"model": name, "suites": ["recall"], "config": {"num_samples": 4, "seed": 0},
           "recall": {"aggregate": json.loads(json.dumps(agg))}}
    if niah:
        res["niah"] = {"table": [{"depth": d, "length": n, "score": v} for (d, n), v in niah.items()],
                       "mean": sum(niah.values()) / len(niah)}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(res))
    return path


def test_compare_averages_only_the_cells_every_run_has(tmp_path):
    a = _recall_results(tmp_path / "a", "a", {("kv_retrieval", 256): 1.0}, niah={(50.0, 256): 1.0})
    b = _recall_results(tmp_path / "b", "b", {("kv_retrieval", 256): 1.0, ("kv_retrieval", 512): 0.2,
                                               ("niah_single_1", 256): 0.2, ("niah_single_1", 512): 0.2},
                        niah={(50.0, 256): 1.0, (50.0, 512): 0.0})
    comp = compare_results([a, b], tmp_path / "cmp")
    m = comp["metrics"]
    assert m["recall/overall"] == {"a": 1.0, "b": 1.0} and m["recall/kv_retrieval"] == {"a": 1.0, "b": 1.0}
    assert m["niah/mean"] == {"a": 1.0, "b": 1.0}
    assert m["recall/niah_single_1@512"] == {"a": None, "b": 0.2}  # every cell is still listed
    assert "recall/ruler" not in m  # no RULER task in the shared cells
    assert any("1 cells all of them have" in note for note in comp["notes"])
    assert "**Note:** The runs measured recall on different" in (tmp_path / "cmp" / "comparison.md").read_text()
    # the same cells everywhere: the runs' own averages, no note
    same = compare_results([a, _recall_results(tmp_path / "c", "c", {("kv_retrieval", 256): 0.5}, {(50.0, 256): 0.0})],
                           tmp_path / "cmp2")
    assert same["notes"] == [] and same["metrics"]["recall/overall"] == {"a": 1.0, "c": 0.5}
    other = _recall_results(tmp_path / "d", "d", {("kv_retrieval", 256): 0.5}, {(50.0, 256): 0.0})
    config = json.loads((other / "results.json").read_text())
    config["config"].update(num_samples=16, teacher="tiny:llama-gqa")  # a KL reference alone is no difference
    (other / "results.json").write_text(json.dumps(config))
    notes = compare_results([a, other], tmp_path / "cmp3")["notes"]
    assert notes == ["Settings differ between the runs: num_samples a: 4, d: 16."]


def test_compare_names_stay_unique_and_a_stale_plot_is_removed(tmp_path):
    dirs = [_recall_results(tmp_path / f"r{i}", name, {("kv_retrieval", 256): v})
            for i, (name, v) in enumerate([("m", 0.9), ("m", 0.5), ("m (2)", 0.1)])]
    comp = compare_results(dirs, tmp_path / "cmp")
    assert len(set(comp["models"])) == 3
    assert sorted(comp["metrics"]["recall/overall"].values()) == [0.1, 0.5, 0.9]
    assert (tmp_path / "cmp" / "comparison.png").is_file()
    quality_only = tmp_path / "q"
    quality_only.mkdir()
    (quality_only / "results.json").write_text(json.dumps({"model": "q", "quality": {"perplexity": 3.0}}))
    comp = compare_results([quality_only], tmp_path / "cmp")
    assert "plot" not in comp["files"] and not (tmp_path / "cmp" / "comparison.png").exists()
    assert "comparison.png" not in (tmp_path / "cmp" / "comparison.md").read_text()


def test_evaluation_keeps_finished_suites_when_a_later_one_fails(model, tok, tmp_path, monkeypatch):
    from hybrid_distill.evaluation import suite

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory in NIAH")

    monkeypatch.setattr(suite, "run_niah", fail)
    with pytest.raises(RuntimeError, match="NIAH"):
        evaluate_model(model, tok, tmp_path, suite=["recall", "niah"], tasks=["kv_retrieval"], lengths=(256,), num_samples=1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["partial"] == ["niah"] and saved["recall"]["aggregate"]["per_task"]["kv_retrieval"] is not None


def test_too_short_niah_length_fails_before_any_suite_runs(model, tok, tmp_path, monkeypatch):
    from hybrid_distill.evaluation import suite

    monkeypatch.setattr(suite, "run_recall", lambda *a, **k: pytest.fail("recall ran before the NIAH lengths were checked"))
    with pytest.raises(ValueError, match="niah length 64"):
        evaluate_model(model, tok, tmp_path / "out", suite=["recall", "niah"], lengths=(256,), niah_lengths=(64,))
    assert not (tmp_path / "out").exists()


def test_reevaluation_without_niah_removes_the_old_heatmap(model, tok, tmp_path, caplog):
    import logging

    evaluate_model(model, tok, tmp_path, suite=["niah"], lengths=(256,), niah_depths=(50.0,))
    assert (tmp_path / "niah.png").is_file()
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.evaluation.suite"):
        evaluate_model(model, tok, tmp_path, suite=["recall"], tasks=["kv_retrieval"], lengths=(128,), num_samples=1)
    assert "results of suite(s) niah that this evaluation replaces" in caplog.text
    assert not (tmp_path / "niah.png").exists()
    assert "partial" not in json.loads((tmp_path / "results.json").read_text())


def test_eval_loads_a_teacher_saved_as_pytorch_model_bin(tmp_path):
    from hybrid_distill.evaluation.suite import load_model

    teacher = tiny_teacher("llama-gqa", num_hidden_layers=2)
    teacher.save_pretrained(tmp_path / "t")
    torch.save(teacher.state_dict(), tmp_path / "t" / "pytorch_model.bin")  # as older checkpoints are stored
    (tmp_path / "t" / "model.safetensors").unlink()
    loaded = load_model(str(tmp_path / "t"))
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, teacher(ids).logits)
