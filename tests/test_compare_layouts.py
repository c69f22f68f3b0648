"""scripts/compare_layouts.py: a Llama teacher rewritten as Qwen2 is the same function; rewritten as Qwen3 it gets
least-squares q/k norm weights and is healed by training; the layouts' comparison pairs each model's runs over
samples and seeds."""

from __future__ import annotations

import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hybrid_distill.artifacts import Step
from hybrid_distill.modeling import layout_mixer_options
from hybrid_distill.pipeline import RunConfig
from hybrid_distill.surgery import build_student, load_teacher
from hybrid_distill.tiny_teachers import tiny_teacher
from hybrid_distill.tokenization import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import compare_layouts as cl  # noqa: E402

sys.path.pop(0)


def _student_weights(teacher_dir: Path, endings: tuple[str, ...]) -> dict[str, list[str]]:
    """Per layout: the all-GDN student's weights (of ``teacher_dir``'s teacher) whose names end in ``endings``."""
    teacher = load_teacher(str(teacher_dir))
    out = {}
    for layout in cl.LAYOUTS:
        student = build_student(teacher, ["gdn"] * teacher.config.num_hidden_layers, layout_mixer_options(layout, None))
        out[layout] = [n for n, _ in student.named_parameters() if n.endswith(endings)]
    return out


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
    biases = _student_weights(tmp_path / "qwen2", ("q_proj.bias", "k_proj.bias"))
    assert biases["default"] and not biases["qwen3_5"]
    with pytest.raises(SystemExit, match="rewrites a Llama teacher"):
        cl.llama_as_qwen2(tmp_path / "qwen2", tmp_path / "again")


def _tiny_llama(path: Path) -> Path:
    tiny_teacher("llama-gqa").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _tiny_run(tmp_path: Path) -> RunConfig:
    """The run config healing reads (data and eval settings), small enough for a test."""
    return RunConfig.from_dict({
        "teacher": "tiny:llama-gqa", "run_dir": str(tmp_path / "run"),
        "data": {"source": "default", "max_tokens": 40_000, "cache_dir": str(tmp_path / "tokens")},
        "eval": {"suite": ["recall", "quality"], "tasks": ["kv_retrieval"], "lengths": [128], "num_samples": 2,
                 "quality_seq_len": 64, "quality_sequences": 4},
    })


def _layer0_q(model, ids: torch.Tensor, module: str) -> torch.Tensor:
    """Layer 0's per-head q before RoPE, the output of ``self_attn.<module>`` (its input is the same in the Llama
    and its rewrite: the embeddings through the same RMSNorm)."""
    out = []
    hook = getattr(model.model.layers[0].self_attn, module).register_forward_hook(lambda m, a, o: out.append(o))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return out[0].reshape(*ids.shape, -1, model.config.head_dim)


def test_qk_norm_weights_are_the_least_squares_fit_of_the_llamas_q(tmp_path):
    llama, qwen, missing = cl.llama_rewritten(_tiny_llama(tmp_path / "llama"), "qwen3")
    assert sorted(missing) == sorted(f"model.layers.{i}.self_attn.{n}_norm.weight" for i in range(4) for n in "qk")
    ids = torch.randint(3, llama.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    weights = cl.qk_norm_weights(llama, ids, qwen.config.rms_norm_eps)
    assert sorted(weights) == sorted(missing)
    target = _layer0_q(llama, ids, "q_proj")
    norm = qwen.model.layers[0].self_attn.q_norm

    def error(w: torch.Tensor) -> float:
        with torch.no_grad():
            norm.weight.copy_(w)
        return (_layer0_q(qwen, ids, "q_norm") - target).pow(2).sum().item()

    fitted = weights["model.layers.0.self_attn.q_norm.weight"]
    best = error(fitted)
    assert best < error(torch.ones_like(fitted))
    bump = torch.zeros_like(fitted)
    bump[::3] = 0.02
    for other in (fitted * 1.02, fitted * 0.98, fitted + bump, fitted - bump):  # a minimum in every direction tried
        assert best < error(other)


def test_llama_rewritten_as_qwen3_is_a_healed_qwen3_checkpoint_with_the_llamas_tokenizer(tmp_path):
    source = _tiny_llama(tmp_path / "llama")
    run = _tiny_run(tmp_path)
    healing = cl.Healing(steps=4, batch_size=4, seq_len=64, check_every=2, calibration_sequences=4,
                         loss_margin=10.0, recall_margin=1.0)
    dest = cl.llama_as_qwen3(source, tmp_path / "teacher-qwen3", run, healing)
    qwen = AutoModelForCausalLM.from_pretrained(dest)
    assert qwen.config.model_type == "qwen3" and qwen.model.layers[0].self_attn.q_norm is not None
    assert (dest / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    text = "The key 4821 opens door 77 of the red house."
    assert (PreTrainedTokenizerFast(tokenizer_file=str(dest / "tokenizer.json"))(text)["input_ids"]
            == cl.load_tokenizer(str(source))(text)["input_ids"])
    record = Step(dest, {}).record()
    assert record.state == "done" and {"llama", "checks", "seconds"} <= set(record.result)
    assert (tmp_path / "teacher-qwen3-healing" / "llama" / "results.json").is_file()
    weights = (dest / "model.safetensors").stat().st_mtime_ns
    assert cl.llama_as_qwen3(source, dest, run, healing) == dest  # the same settings: reused, not trained again
    assert (dest / "model.safetensors").stat().st_mtime_ns == weights
    norms = _student_weights(dest, ("q_norm.weight", "k_norm.weight"))
    assert norms["default"] and not norms["qwen3_5"]
    with pytest.raises(SystemExit, match="rewrites a Llama teacher"):
        cl.llama_as_qwen3(dest, tmp_path / "again", run, healing)


def test_healing_lowers_the_held_out_loss_until_it_reaches_the_reference_or_refuses(tmp_path):
    source = _tiny_llama(tmp_path / "llama")
    run = _tiny_run(tmp_path)
    tokenizer = cl.load_tokenizer(str(source))
    healing = cl.Healing(steps=30, batch_size=4, seq_len=64, lr=3e-3, check_every=5)
    _, qwen, _ = cl.llama_rewritten(source, "qwen3")
    start = cl.teacher_scores(qwen, tokenizer, run, tmp_path / "start")
    target = {"loss": start["loss"] - 0.6, "recall": 0.0}  # within loss_margin (0.05): 0.55 below the start
    result = cl.heal(qwen, tokenizer, run, healing, target, tmp_path / "healing")
    losses = [c["loss"] for c in result["checks"]]
    assert result["checks"][0]["step"] == 0 and losses[0] == pytest.approx(start["loss"])
    assert all(b < a for a, b in pairwise(losses)) and losses[-1] <= target["loss"] + healing.loss_margin
    assert result["checks"][-1]["step"] < healing.steps  # it stopped once there
    with pytest.raises(SystemExit, match="after 10 healing steps the held-out loss"):
        cl.heal(qwen, tokenizer, run, cl.Healing(steps=10, batch_size=4, seq_len=64, check_every=5),
                {"loss": 0.0, "recall": 0.0}, tmp_path / "unreachable")


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
