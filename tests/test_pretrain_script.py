"""scripts/pretrain_teacher.py end to end on CPU at toy size: teacher, log, eval and the generic-text dump."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOY = [
    "model.num_hidden_layers=1", "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
    "model.num_key_value_heads=1", "data.text_chars=300000", "tokenizer.train_chars=100000", "tokenizer.synthetic_docs=20",
    "tokenizer.vocab_size=512", "data.synthetic_docs=40", "data.synthetic_seconds=10", "train.compile=false",
    "train.batch_size=4", "train.warmup_steps=2", "data.heldout_rows=4",
]


def test_pretrain_script_toy_run(tmp_path):
    out = tmp_path / "pt"
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain_teacher.py"), "--out", str(out), "--device", "cpu",
           "--workers", "1", "--skip-eval", "--max-minutes", "0.03", "--text-out", str(out / "text.jsonl.gz"), "--set", *TOY]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    from hybrid_distill.surgery import load_teacher, load_tokenizer

    teacher = load_teacher(str(out / "teacher"))
    assert teacher.config.num_hidden_layers == 1 and len(load_tokenizer(str(out / "teacher"))) <= 512
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "config" and any(r.get("event") == "done" for r in log)
    rows = [json.loads(line) for line in gzip.open(out / "text.jsonl.gz", "rt")]
    assert rows and all(set(r) == {"text"} for r in rows)
    assert not any("special magic" in r["text"].lower() for r in rows[:50])  # generic text only


def test_repro_config_is_a_valid_override():
    cfg = yaml.safe_load((ROOT / "scripts" / "pretrain_teacher_repro.yaml").read_text())
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from pretrain_teacher import load_config
    finally:
        sys.path.pop(0)
    merged = load_config(str(ROOT / "scripts" / "pretrain_teacher_repro.yaml"), [])
    assert merged["model"]["num_hidden_layers"] >= 16 and merged["model"]["num_key_value_heads"] < merged["model"]["num_attention_heads"]
    assert set(cfg) <= set(merged)


def test_loguniform_recall_document_lengths():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from pretrain_teacher import _synth_worker, load_config, synth_jobs
    finally:
        sys.path.pop(0)
    from hybrid_distill.tokenization import tiny_tokenizer

    tok = tiny_tokenizer(1024)  # the worker's tokenizer when it writes texts
    mean_tokens = {}
    for dist in ("uniform", "loguniform"):
        cfg = load_config(None, [f"data.prompt_length_dist={dist}", "data.prompt_tokens=[64,600]", "data.tasks={kv_retrieval: 1}"])
        texts = _synth_worker(synth_jobs(cfg, None, 24, 120, 123, 1)[0])  # same seeds for both
        assert len(texts) == 24
        lengths = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
        assert all(40 <= n <= 700 for n in lengths)
        mean_tokens[dist] = sum(lengths) / len(lengths)
    assert mean_tokens["loguniform"] < 0.8 * mean_tokens["uniform"]
    with pytest.raises(SystemExit, match="prompt_length_dist"):
        load_config(None, ["data.prompt_length_dist=normal"])
