"""The fixed teacher's whole path at toy size on CPU: pretrain (background) -> poll -> pack -> unpack -> gate evaluation."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "pretrain_teacher.py")
CONFIG = str(ROOT / "scripts" / "pretrain_teacher_fixed.yaml")
TOY = [
    "model.num_hidden_layers=1", "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
    "model.num_key_value_heads=1", "model.max_position_embeddings=1024", "tokenizer.vocab_size=512",
    "tokenizer.train_chars=100000", "tokenizer.synthetic_docs=20", "data.text_chars=300000", "data.seq_len=512",
    "data.prompt_tokens=[64,480]", "data.synthetic_tokens=30000", "data.synthetic_seconds=30", "data.heldout_rows=4",
    "train.target_tokens=16384", "train.batch_size=4", "train.warmup_steps=2", "train.log_every=2",
    "train.val_every=4", "train.compile=false", "eval.tasks=[kv_retrieval,mqar,vt_2chains,ar]",
    "eval.required=[kv_retrieval,vt_2chains]", "eval.lengths=[512]", "eval.num_samples=2", "eval.batch_size=4",
    "eval.niah_lengths=[512]", "eval.niah_depths=[0,100]", "eval.niah_samples=1",
]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONPROFILEIMPORTTIME": "1"}  # every import, on stderr
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.mark.slow
def test_fixed_teacher_path_at_toy_size(tmp_path):
    out, console, collected = tmp_path / "teacher", tmp_path / "teacher.log", tmp_path / "OUT"
    with open(console, "w") as log:  # the GPU command's `setsid nohup ... &`, then a poll
        run = subprocess.Popen([sys.executable, SCRIPT, "--config", CONFIG, "--out", str(out), "--device", "cpu",
                                "--workers", "1", "--set", *TOY], stdout=log, stderr=subprocess.STDOUT, env=_env(),
                               start_new_session=True)
    try:
        polled = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--poll", "170", "--every", "2",
                                 "--collect", str(collected)], capture_output=True, text=True, timeout=200)
        assert run.wait(timeout=30) == 0, console.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    assert polled.returncode == 0 and "run state: done" in polled.stdout, polled.stdout[-2000:]
    text = console.read_text()
    assert not re.search(r"import time:.*\|\s+datasets(\.|\s*$)", text, flags=re.M)  # the GPU machine may lack it
    assert re.search(r"import time:.*\|\s+hybrid_distill\.tasks", text, flags=re.M)  # the check sees imports

    # training stopped at its token target; every phase logged its wall time
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    done = next(r for r in log if r.get("event") == "done")
    assert done["stopped_by"] == "target_tokens" and done["tokens"] >= 16384 == done["target_tokens"]
    data = next(r for r in log if r.get("event") == "data")
    assert set(data["recall_docs_per_template"]) == {"eval", "train"}
    assert {"ar", "ar_multihop", "kv_retrieval", "vt", "cwe"} <= set(data["recall_docs_per_task"])
    assert "wall time per phase" in text and "pack: " in text

    # the pack, and the dequantized teacher it defines, which is what was evaluated
    report = json.loads((out / "eval.json").read_text())
    manifest = json.loads((out / "pack" / "manifest.json").read_text())
    sha = manifest["dequantized_weights_sha256"]
    assert report["teacher_weights_sha256"] == sha and report["pack"]["bytes"] > 0
    assert 0 < report["pack"]["logits_relative_error"] < 0.05
    redo = tmp_path / "unpacked"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "teacher_pack.py"), "unpack", str(out / "pack"), str(redo)],
                   check=True, capture_output=True, env=_env())
    teacher = AutoModelForCausalLM.from_pretrained(redo)
    tensors = load_file(str(out / "pack" / "teacher.int8.safetensors"))
    emb = tensors["model.embed_tokens.weight.qweight"].float() * tensors["model.embed_tokens.weight.scale"][:, None]
    assert torch.equal(teacher.model.embed_tokens.weight, emb)
    assert json.loads((redo / "teacher_pack.json").read_text())["dequantized_weights_sha256"] == sha

    # the gate: required tasks x lengths, reported tasks, the NIAH grid
    ev = report["eval"]
    assert set(ev["recall"]) == {"kv_retrieval", "mqar", "vt_2chains", "ar"}
    assert all(0.0 <= acc <= 1.0 for by_len in ev["recall"].values() for acc in by_len.values())
    assert ev["gate"]["required"] == ["kv_retrieval", "vt_2chains"] and isinstance(ev["gate"]["passed"], bool)
    assert len(ev["niah"]["table"]) == 2 and len(ev["predictions"]) == 8
    assert "| kv_retrieval * |" in (out / "eval.md").read_text()

    # evaluating the unpacked teacher again gives the same answers
    again = tmp_path / "again"
    subprocess.run([sys.executable, SCRIPT, "--config", CONFIG, "--out", str(again), "--device", "cpu",
                    "--evaluate", str(redo), "--set", *TOY], check=True, capture_output=True, env=_env())
    second = json.loads((again / "eval.json").read_text())
    assert second["teacher_weights_sha256"] == sha
    assert second["eval"]["predictions"] == ev["predictions"] and second["eval"]["recall"] == ev["recall"]

    # what the poll sent back: at most 8 files, the pack as one tar
    files = sorted(p.name for p in collected.iterdir())
    assert files == ["eval.json", "eval.md", "status.json", "teacher.log", "teacher_pack.tar", "training_log.jsonl"]
    with tarfile.open(collected / "teacher_pack.tar") as tar:
        assert sorted(tar.getnames()) == sorted(f"pack/{p.name}" for p in (out / "pack").iterdir())

    # attempt 3's path: continue training from the collected pack (its tokenizer and weights, a fresh optimizer)
    more = tmp_path / "more"
    cont = subprocess.run([sys.executable, SCRIPT, "--config", CONFIG, "--out", str(more), "--device", "cpu",
                           "--workers", "1", "--skip-eval", "--set", *TOY, "train.target_tokens=4096",
                           f"init_from={collected / 'teacher_pack.tar'}", "data.synthetic_seed=20000"],
                          capture_output=True, text=True, env=_env())
    assert cont.returncode == 0, cont.stdout[-3000:] + cont.stderr[-3000:]
    assert f"teacher weights sha256 {sha}" in cont.stdout  # it started from the pack's teacher
    assert (more / "teacher" / "tokenizer.json").read_text() == (out / "pack" / "tokenizer.json").read_text()
    continued = AutoModelForCausalLM.from_pretrained(more / "teacher")
    assert continued.config.num_hidden_layers == teacher.config.num_hidden_layers
    moved = [(continued.state_dict()[k] - v).abs().max().item() for k, v in teacher.state_dict().items()]
    assert max(moved) > 0  # and trained on
    first = json.loads((more / "training_log.jsonl").read_text().splitlines()[0])
    assert first["config"]["init_from"] == str(collected / "teacher_pack.tar")
    refused = subprocess.run([sys.executable, SCRIPT, "--config", CONFIG, "--out", str(tmp_path / "bad"), "--device",
                              "cpu", "--workers", "1", "--skip-eval", "--set", *TOY, "model.hidden_size=64",
                              f"init_from={collected / 'teacher_pack.tar'}"], capture_output=True, text=True, env=_env())
    assert refused.returncode != 0 and "model.hidden_size: 64 in the config, 32 in init_from" in refused.stderr
