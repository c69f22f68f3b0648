"""scripts/pretrain_teacher.py end to end on CPU at toy size: teacher, log, eval and the generic-text dump."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOY = [
    "model.num_hidden_layers=1", "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
    "model.num_key_value_heads=1", "data.text_chars=300000", "tokenizer.train_chars=100000", "tokenizer.synthetic_docs=20",
    "tokenizer.vocab_size=512", "data.synthetic_docs=40", "data.synthetic_seconds=10", "train.compile=false",
    "train.batch_size=4", "train.warmup_steps=2", "data.heldout_rows=4",
]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_pretrain_script_toy_run(tmp_path, family):
    out = tmp_path / "pt"
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain_teacher.py"), "--out", str(out), "--device", "cpu",
           "--workers", "1", "--skip-eval", "--max-minutes", "0.03", "--text-out", str(out / "text.jsonl.gz"), "--set",
           *TOY, f"model.family={family}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    from hybrid_distill.surgery import load_teacher, load_tokenizer

    teacher = load_teacher(str(out / "teacher"))
    assert teacher.config.num_hidden_layers == 1 and len(load_tokenizer(str(out / "teacher"))) <= 512
    assert teacher.config.model_type == family  # a teacher of the family asked for, which surgery can convert
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "config" and any(r.get("event") == "done" for r in log)
    rows = [json.loads(line) for line in gzip.open(out / "text.jsonl.gz", "rt")]
    assert rows and all(set(r) == {"text"} for r in rows)
    assert not any("special magic" in r["text"].lower() for r in rows[:50])  # generic text only
    if family != "llama":
        return
    # --text-only remakes the same text on this machine (the distillation data of a reproduction) and checks it
    digest = next(r for r in log if r.get("event") == "data")["text_sources"]["sha256"]
    def text_only(dest, sha):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_teacher.py"), "--out", str(tmp_path / "t"),
                               "--text-only", "--text-out", str(dest), "--text-sha256", sha, "--set", *TOY],
                              capture_output=True, text=True, timeout=300)

    assert text_only(tmp_path / "again.jsonl.gz", digest).returncode == 0
    assert gzip.open(tmp_path / "again.jsonl.gz", "rt").read() == gzip.open(out / "text.jsonl.gz", "rt").read()
    refused = text_only(tmp_path / "other.jsonl.gz", "0" * 64)
    assert refused.returncode != 0 and "TextMismatch" in refused.stderr and "not the expected" in refused.stderr
    assert not (tmp_path / "other.jsonl.gz").exists()


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


def _script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import pretrain_teacher
    finally:
        sys.path.pop(0)
    return pretrain_teacher


def test_fixed_teacher_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_distill.tasks import TASKS

    pt = _script()
    cfg = pt.load_config(str(ROOT / "scripts" / "pretrain_teacher_fixed.yaml"), [])
    m = cfg["model"]
    config = LlamaConfig(vocab_size=cfg["tokenizer"]["vocab_size"], hidden_size=m["hidden_size"],
                         intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_hidden_layers"],
                         num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_key_value_heads"],
                         tie_word_embeddings=m["tie_word_embeddings"])
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert 10.0e6 < params < 11.0e6 and m["hidden_size"] // m["num_attention_heads"] == 64
    assert cfg["train"]["target_tokens"] >= 30 * params and cfg["pack"] is True
    d = cfg["data"]
    assert {"ar", "ar_multihop", "kv_retrieval", "vt", "cwe"} <= set(d["tasks"])  # every bypass baseline's task
    assert set(d["templates"]) == {"eval", "train"} and d["exact_length"] is False
    longest_answer = 45  # cwe (10 words) takes up to about 40 tokens of a 4096-token BPE; the worker drops longer documents
    assert d["prompt_tokens"][1] + longest_answer + 2 <= d["seq_len"] + 1
    e = cfg["eval"]
    assert set(e["required"]) <= set(e["tasks"]) <= set(TASKS) and e["lengths"] == [1024, 2048]
    assert e["num_samples"] == 64 and e["seed"] < d["synthetic_seed"]


def test_config_errors_name_the_field():
    pt = _script()
    fixed = str(ROOT / "scripts" / "pretrain_teacher_fixed.yaml")
    for sets, field in ((["data.tasks={nope: 1}"], "data.tasks"), (["eval.required=[cwe_x]"], "eval.required"),
                        (["data.templates={eval: 1, exam: 1}"], "data.templates"),
                        (["train.target_tokens=-5"], "train.target_tokens"),
                        (["data.synthetic_tokens=1.5"], "data.synthetic_tokens")):
        with pytest.raises(SystemExit, match=field.replace(".", r"\.")):
            pt.load_config(fixed, sets)
    with pytest.raises(SystemExit, match=r"init_from: .*nope.tar does not exist"):
        pt.load_config(fixed, ["init_from=/nonexistent/nope.tar"])


def test_attempt3_config_continues_the_fixed_teacher(tmp_path):
    """Attempt 3 layers onto the fixed config: the same model, its own recall documents, a pack to start from whose
    model must match (the pack's config.json is checked before any data is made)."""
    pt = _script()
    files = [str(ROOT / "scripts" / "pretrain_teacher_fixed.yaml"), str(ROOT / "scripts" / "pretrain_teacher_attempt3.yaml")]
    fixed = pt.load_config(files[0], [])
    pack = tmp_path / "pack"
    pack.mkdir()
    m = fixed["model"]
    config = {**{k: v for k, v in m.items() if k not in ("rope_theta", "family")}, "model_type": m["family"],
              "rope_parameters": {"rope_theta": m["rope_theta"]}}
    (pack / "config.json").write_text(json.dumps(config))
    cfg = pt.load_config(files, [f"init_from={pack}"])
    assert cfg["model"] == fixed["model"] and cfg["eval"] == fixed["eval"] and cfg["pack"] is True
    assert cfg["data"]["synthetic_seed"] > fixed["data"]["synthetic_seed"] + 10 * fixed["data"]["synthetic_docs"]
    assert {"ar", "ar_multihop", "kv_retrieval", "vt", "cwe"} <= set(cfg["data"]["tasks"])
    (pack / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 12}))
    with pytest.raises(SystemExit, match="model.num_hidden_layers: 16 in the config, 12 in init_from"):
        pt.load_config(files, [f"init_from={pack}"])


def test_training_budget_stops_at_the_target_and_cuts_a_target_the_cap_cannot_fit():
    pt = _script()
    b = pt.TrainingBudget(target_tokens=1000, cap_s=100, step_tokens=10)
    assert b.fraction(0, 0.0) == 0.0 and b.fraction(500, 1.0) == 0.5
    assert b.fraction(1000, 2.0) is None and b.stopped_by == "target_tokens" and not b.summary()["cut_by_max_minutes"]

    b = pt.TrainingBudget(target_tokens=100_000, cap_s=100, step_tokens=10)  # 10 tokens/s: 10k s needed
    assert not b.needs_timing(9) and b.needs_timing(10) and b.needs_timing(40)
    assert b.observe(10, 100, 10.0) == []
    msgs = b.observe(40, 400, 40.0)
    assert msgs[-1].startswith("WARNING: max_minutes") and b.target == 980  # 400 + 10 * (98 - 40)
    assert b.fraction(400, 40.0) == pytest.approx(400 / 980)
    assert b.fraction(980, 98.0) is None and b.stopped_by == "target_tokens" and b.summary()["cut_by_max_minutes"]

    b = pt.TrainingBudget(target_tokens=100_000, cap_s=100, step_tokens=10)
    assert b.fraction(50, 100.0) is None and b.stopped_by == "max_minutes" and b.summary()["cut_by_max_minutes"]

    b = pt.TrainingBudget(target_tokens=None, cap_s=100, step_tokens=10)  # the wall-clock schedule of older configs
    assert b.fraction(10**9, 50.0) == 0.5 and not b.needs_timing(10)
    assert b.fraction(0, 100.0) is None and b.stopped_by == "max_minutes"
