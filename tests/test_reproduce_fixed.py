"""scripts/reproduce.py step / session: one GPU session of the fixed-teacher reproduction at toy size on the CPU --
the teacher from its pack, the teacher's generic text remade and checked, the pipeline under a time limit, the run
folder handed back as a state pack -- and a second session on a bare machine that continues from that pack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from hybrid_distill.tiny_teachers import tiny_teacher
from hybrid_distill.tokenization import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import teacher_pack as tp  # noqa: E402

sys.path.pop(0)
sys.path.insert(0, str(ROOT / "tests"))
from test_pipeline import _config  # noqa: E402
from test_pretrain_script import TOY  # noqa: E402

sys.path.pop(0)


def _text_config(path: Path) -> Path:
    """A pretraining config whose text collection is toy-sized (the TOY overrides of the pretraining test)."""
    cfg: dict = {}
    for item in TOY:
        key, value = item.split("=", 1)
        section, field = key.split(".")
        cfg.setdefault(section, {})[field] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _reproduce(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


def test_session_hands_back_state_that_a_bare_machine_continues(tmp_path):
    source = tmp_path / "teacher-src"
    tiny_teacher("llama-gqa").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    pack = tmp_path / "pack"
    sha = tp.pack(source, pack)["dequantized_weights_sha256"]
    text_cfg = _text_config(tmp_path / "text.yaml")

    work = tmp_path / "r30"
    cfg = _config(work, teacher=str(work / "teacher"), tokenizer="tiny", run_dir=str(work / "pipeline"))
    cfg["data"] = {**cfg["data"], "source": str(work / "text.jsonl.gz"), "max_tokens": 20_000}
    cfg["eval"]["suite"] = ["recall"]
    cfg["selection"] = {**cfg["selection"], "selectors": ["uniform"], "null_candidates": 0}  # no candidates: fast
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    common = ["--work", str(work), "--config", str(config), "--teacher-pack", str(pack), "--pretrain-config", str(text_cfg)]

    # session 1 (through `step`: started in the background, watched, its outbox handed back)
    out1 = tmp_path / "out1"
    step = _reproduce("step", *common, "--time-limit", "900", "--seconds", "500", "--every", "2", "--out", str(out1))
    assert step.returncode == 0, step.stdout[-3000:] + step.stderr[-3000:]
    session = json.loads((out1 / "session.json").read_text())
    assert session["state"] == "done", session
    assert [p["phase"] for p in session["phases"]][:2] == ["teacher", "text"] and session["phases"][0]["sha256"] == sha
    state = json.loads((out1 / "state" / "manifest.json").read_text())
    pipeline = json.loads((work / "pipeline" / "pipeline.json").read_text())
    assert set(pipeline["stages"]) == {"stage1", "stage2", "selection", "final", "export", "eval", "report"}
    text_digest = json.loads((work / "text.jsonl.gz.json").read_text())["sha256"]
    assert session["phases"][1]["sha256"] == text_digest

    # session 2 on a bare machine: the same paths, nothing but the tree, the pack and the state that came back
    shutil.rmtree(work)
    second = _reproduce("session", *common, "--state", str(out1 / "state"), "--text-sha256", text_digest,
                        "--time-limit", "900")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    session2 = json.loads((work / "session.json").read_text())
    assert session2["state"] == "done" and "state_unpacked" in [p["phase"] for p in session2["phases"]]
    resumed = json.loads((work / "pipeline" / "pipeline.json").read_text())
    # every stage reused as it was: the same run ids, nothing trained again
    assert {s: e["run_id"] for s, e in resumed["stages"].items()} == {s: e["run_id"] for s, e in pipeline["stages"].items()}
    assert json.loads((work / "outbox" / "state" / "manifest.json").read_text())["files"].keys() >= state["files"].keys()

    # a machine whose text differs is refused before the pipeline runs (its teacher unpacked already: the check of
    # the text does not depend on it, and unpacking it again would cost a process that loads torch)
    (work / "teacher").rename(tmp_path / "teacher")
    shutil.rmtree(work)
    work.mkdir()
    (tmp_path / "teacher").rename(work / "teacher")
    refused = _reproduce("session", *common, "--state", str(out1 / "state"), "--text-sha256", "0" * 64,
                         "--time-limit", "900")
    assert refused.returncode != 0
    failed = json.loads((work / "session.json").read_text())
    assert failed["state"] == "failed" and "not the expected" in failed["error"]
    assert not (work / "pipeline").exists()


def test_session_refuses_a_pack_of_another_teacher(tmp_path):
    source = tmp_path / "teacher-src"
    tiny_teacher("llama-gqa").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    pack = tmp_path / "pack"
    sha = tp.pack(source, pack)["dequantized_weights_sha256"]
    work = tmp_path / "r30"
    cfg = _config(work, teacher=str(work / "teacher"), tokenizer="tiny", run_dir=str(work / "pipeline"))
    cfg["data"] = {**cfg["data"], "source": str(work / "text.jsonl.gz")}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    refused = _reproduce("session", "--work", str(work), "--config", str(config), "--teacher-pack", str(pack),
                         "--teacher-sha256", "0" * 64, "--time-limit", "900")
    assert refused.returncode == 2
    failed = json.loads((work / "session.json").read_text())
    assert failed["state"] == "failed" and sha in failed["error"] and "0" * 64 in failed["error"]
    assert not (work / "teacher").exists() and not (work / "pipeline").exists()
