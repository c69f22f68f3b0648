"""scripts/compare_layouts.py: a Llama teacher rewritten as Qwen2 is the same function, and the layouts' comparison
pairs each model's runs over samples and seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hybrid_distill.modeling import layout_mixer_options
from hybrid_distill.surgery import build_student, load_teacher
from hybrid_distill.tiny_teachers import tiny_teacher
from hybrid_distill.tokenization import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import compare_layouts as cl  # noqa: E402

sys.path.pop(0)


def test_llama_rewritten_as_qwen2_is_the_same_function_and_only_the_default_layout_keeps_gdn_biases(tmp_path):
    tiny_teacher("llama-gqa").save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    cl.llama_as_qwen2(tmp_path / "llama", tmp_path / "qwen2")
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    qwen = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2").eval()
    assert qwen.config.model_type == "qwen2" and qwen.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, llama.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(qwen(ids).logits, llama(ids).logits)
    teacher = load_teacher(str(tmp_path / "qwen2"))
    biases = {}
    for layout in cl.LAYOUTS:
        student = build_student(teacher, ["gdn"] * teacher.config.num_hidden_layers, layout_mixer_options(layout, None))
        biases[layout] = [n for n, _ in student.named_parameters() if n.endswith(("q_proj.bias", "k_proj.bias"))]
    assert biases["default"] and not biases["qwen3_5"]
    with pytest.raises(SystemExit, match="rewrites a Llama teacher"):
        cl.llama_as_qwen2(tmp_path / "qwen2", tmp_path / "again")


def test_compare_pairs_models_over_samples_and_seeds():
    def run(acc: float, kl: float, seed: int) -> dict:
        scores = {("kv_retrieval", 256, i): float((i * 7 + seed) % 10 < acc * 10) for i in range(40)}
        return {"all-gdn": {"scores": scores, "kl": kl}, "only-default": {"scores": scores, "kl": kl}}

    runs = {"default": [run(0.5, 1.0, s) for s in (0, 1)], "qwen3_5": [run(0.8, 0.9, s) for s in (0, 1)]}
    for r in runs["qwen3_5"]:
        del r["only-default"]  # evaluated in one layout only: not compared
    rows = cl.compare(runs, resamples=200)
    assert [r["model"] for r in rows] == ["all-gdn"]
    row = rows[0]
    assert row["recall"] == {"default": pytest.approx(0.5), "qwen3_5": pytest.approx(0.8)}
    assert row["kl"] == {"default": pytest.approx(1.0), "qwen3_5": pytest.approx(0.9)}
    assert row["recall_difference"]["mean"] == pytest.approx(0.3) and row["recall_difference"]["seeds"] == 2
    assert "+0.300" in cl.markdown(rows, {"teacher": "t", "teacher_family": "qwen2", "config": "default",
                                          "seeds": [0, 1], "resamples": 200})
