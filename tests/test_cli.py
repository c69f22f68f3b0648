"""The `hybrid-distill` command line on tiny teachers."""

import json


from hybrid_distill.cli import main


def test_convert_then_inspect(tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["convert", "--teacher", "tiny:qwen3-qknorm", "--softmax-layers", "1,3", "--out", str(out)]) == 0
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["mixers"] == ["gdn", "softmax", "gdn", "softmax"]
    assert info["softmax_layers"] == [1, 3] and info["teacher"]["model_type"] == "qwen3"
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "mixers": config["mixers"][:3]}))
    assert main(["inspect", str(out)]) == 2
    assert "do not list one mixer for each of its 4 layers" in capsys.readouterr().err


def test_convert_reports_bad_input(tmp_path, capsys):
    assert main(["convert", "--teacher", "tiny:llama-gqa", "--mixers", "gdn,foo,gdn,gdn", "--out", str(tmp_path / "x")]) == 2
    assert "Unknown mixer 'foo' for layer 1" in capsys.readouterr().err
    assert main(["convert", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "missing' does not exist" in capsys.readouterr().err
    (tmp_path / "not-a-model").mkdir()
    assert main(["convert", "--teacher", str(tmp_path / "not-a-model"), "--out", str(tmp_path / "y")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_distill_stage1_then_stage2(tmp_path, capsys):
    common = ["--teacher", "tiny:llama-gqa", "--seq-len", "64", "--global-batch-size", "4", "--data-cache-dir", str(tmp_path / "cache"), "--max-data-tokens", "20000"]
    run1 = tmp_path / "s1"
    assert main(["distill", *common, "--run-dir", str(run1), "--stage", "1", "--target-tokens", "2048", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stage"] == 1 and result["tokens"] >= 2048
    run2 = tmp_path / "s2"
    args = ["distill", *common, "--student", str(run1 / "final"), "--run-dir", str(run2), "--stage", "2", "--target-tokens", "1024"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["eval_metric"]
    from transformers import AutoTokenizer

    from hybrid_distill.surgery import load_teacher, load_tokenizer

    saved = AutoTokenizer.from_pretrained(run2 / "final")  # the final model carries its tokenizer
    vocab = load_teacher("tiny:llama-gqa").config.vocab_size
    assert saved.get_vocab() == load_tokenizer("tiny:llama-gqa", None, vocab).get_vocab()
    assert main(["eval", "--model", str(run2 / "final"), "--tasks", "kv_retrieval", "--lengths", "128",
                 "--num-samples", "1", "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    assert "| kv_retrieval |" in capsys.readouterr().out
    assert main(args) == 0  # a finished run is a no-op that returns its result
    assert json.loads(capsys.readouterr().out)["already_done"] is True


def test_command_line_turns_on_expandable_segments_unless_the_allocator_is_configured(tmp_path, monkeypatch):
    from hybrid_distill.cuda_allocator import (
        ALLOCATOR_ENV_VARS,
        expandable_segments_configured,
        prefer_expandable_segments,
    )

    for name in ALLOCATOR_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not expandable_segments_configured()
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert expandable_segments_configured()

    user = {"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}
    assert not prefer_expandable_segments(user) and user == {"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}
    assert not expandable_segments_configured(user)
    assert expandable_segments_configured({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64, expandable_segments:True"})
    # torch reads the first variable that is set; a later one does not count
    assert not expandable_segments_configured(
        {"PYTORCH_ALLOC_CONF": "expandable_segments:False", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    )


def test_bad_paths_and_stage_names_are_clear_errors(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "runs" / "nonexistent" / "final")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", "runs/nonexistent/final"]) == 2  # relative, not a hub id
    assert "Model path 'runs/nonexistent/final' does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a hybrid-distill run directory" in capsys.readouterr().err
    from hybrid_distill.pipeline.config import DEFAULT_CONFIG

    for stages, message in (("bogus,stage1", "unknown stage(s) ['bogus']"), ("", "no stages given")):
        assert main(["run", str(DEFAULT_CONFIG), "--run-dir", str(tmp_path / "r"), "--stages", stages]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_convert_names_a_truncated_teacher_weight_file(tmp_path, capsys):
    from hybrid_distill.tiny_teachers import tiny_teacher

    teacher = tmp_path / "teacher"
    tiny_teacher("llama-gqa").save_pretrained(teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["convert", "--teacher", str(teacher), "--out", str(tmp_path / "x")]) == 2
    assert "Corrupt weight file" in capsys.readouterr().err


def _jsonl_corpus(path, field: str, docs: int = 300):
    """Documents of varied text under ``field`` (the held-out split hashes content, so no two alike)."""
    import random

    rng = random.Random(0)
    words = "alpha beta gamma delta river stone cloud paper engine garden yellow seven".split()
    lines = [json.dumps({field: f"note {i}: " + " ".join(rng.choice(words) for _ in range(60)), "id": i})
             for i in range(docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_options_reach_distill_and_eval(tmp_path, capsys):
    """A .jsonl corpus whose text is not under "text": --text-field carries it through distill and eval,
    and the quality suite scores exactly the text distillation held out."""
    corpus = _jsonl_corpus(tmp_path / "docs.jsonl", "content")
    common = ["--teacher", "tiny:llama-gqa", "--seq-len", "64", "--global-batch-size", "4", "--data", str(corpus),
              "--data-cache-dir", str(tmp_path / "cache"), "--heldout-fraction", "0.1"]
    run = tmp_path / "s1"
    assert main(["distill", *common, "--run-dir", str(run), "--stage", "1", "--target-tokens", "512"]) == 2
    err = capsys.readouterr().err
    assert "no field 'text'" in err and "'content'" in err  # names the fields there are
    assert main(["distill", *common, "--text-field", "content", "--run-dir", str(run), "--stage", "1",
                 "--target-tokens", "512"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] >= 512

    out = tmp_path / "eval"
    assert main(["eval", "--model", "tiny:llama-gqa", "--suite", "quality", "--corpus", str(corpus), "--text-field", "content",
                 "--heldout-fraction", "0.1", "--cache-dir", str(tmp_path / "cache"), "--quality-seq-len", "64",
                 "--quality-sequences", "3", "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["data"]["text_field"] == "content" and res["config"]["data"]["heldout_fraction"] == 0.1
    assert res["quality"]["sequences"] == 3 and res["quality"]["heldout_fraction"] == 0.1
    assert "held out by content hash" in (out / "summary.md").read_text()

    from hybrid_distill.data import DataConfig
    from hybrid_distill.evaluation.quality import heldout_batches
    from hybrid_distill.surgery import load_teacher, load_tokenizer

    tok = load_tokenizer("tiny:llama-gqa", None, load_teacher("tiny:llama-gqa").config.vocab_size)
    spec = DataConfig(source=str(corpus), text_field="content", heldout_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    ds = spec.load(tok, 64)
    trained = {tuple(ds[int(i)].tolist()) for i in ds.train_indices}
    scored = [tuple(row.tolist()) for b in heldout_batches(tok, spec, seq_len=64, max_sequences=3) for row in b]
    assert scored == [tuple(ds[int(i)].tolist()) for i in ds.heldout_indices[:3]]
    assert not set(scored) & trained


def test_student_checkpoint_with_layout_flags_and_torchrun_drivers_are_refused(tmp_path, capsys, monkeypatch):
    student = tmp_path / "student"
    assert main(["convert", "--teacher", "tiny:llama-gqa", "--mixers", "gdn,gdn,gdn,gdn", "--out", str(student)]) == 0
    capsys.readouterr()
    args = ["distill", "--teacher", "tiny:llama-gqa", "--student", str(student), "--softmax-layers", "1", "--mixer-options",
            '{"gdn_use_short_conv": true}', "--run-dir", str(tmp_path / "r"), "--stage", "2", "--target-tokens", "64"]
    assert main(args) == 2
    assert "--softmax-layers, --mixer-options would be ignored" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

    from hybrid_distill.pipeline.config import DEFAULT_CONFIG

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    assert main(["run", str(DEFAULT_CONFIG), "--run-dir", str(tmp_path / "run")]) == 2
    assert "start it without torchrun" in capsys.readouterr().err
    assert main(["select", "--teacher", "tiny:llama-gqa", "--run-dir", str(tmp_path / "sel"), "--selector", "uniform",
                 "--budget", "1"]) == 2
    assert "start it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sel").exists()


def test_every_subcommand_prints_its_help():
    """``--help`` renders for the top-level parser and every subcommand (argparse %-formats each help string,
    so a literal ``%`` in a setting's help must reach it escaped)."""
    import argparse

    from hybrid_distill.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"run", "select", "distill", "eval", "export"} <= set(subcommands)
    for name, sub in subcommands.items():
        text = sub.format_help()
        assert f"hybrid-distill {name}" in text, name
    select_help = subcommands["select"].format_help()
    assert "percentages (25%)" in select_help and "under 10% of the compute" in select_help
