"""Stage logic on tiny teachers: Stage-1 hooks and frozen parameters, Stage-2 KL and Stage-3 CE against
full-logits references (values and parameter gradients), and evaluate_kl."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_distill.distill import DistillConfig, TensorTokenDataset, distill, evaluate_kl, read_metrics
from hybrid_distill.distill.config import ConfigError
from hybrid_distill.distill.losses import kl_div_reference
from hybrid_distill.distill.stages import (
    Stage1Alignment,
    Stage2KL,
    Stage3CE,
    attention_parameter_names,
    mixer_parameter_names,
)
from hybrid_distill.surgery import build_student
from hybrid_distill.tiny_teachers import tiny_teacher


def _pair(variant="qwen2-bias-tied", mixers=("gdn", "softmax", "gla", "gdn"), seed=0, **overrides):
    teacher = tiny_teacher(variant, seed=seed, **overrides)
    torch.manual_seed(seed)
    return build_student(teacher, list(mixers)), teacher


def _tokens(n=4, t=12, seed=0, vocab=512):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _padding(ids):
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    mask[-1, -1:] = 0
    return mask


# ----------------------------------------------------------------------------- Stage 1


@pytest.mark.parametrize("mixers", [("gdn", "softmax", "gla", "gdn"), ("gla", "gdn", "softmax", "softmax")])
def test_stage1_matches_manual_teacher_inputs(mixers):
    """Each mixer gets the normed hidden states the teacher's attention got; the loss is Σ_ℓ Σ_t ‖Δ‖²."""
    student, teacher = _pair("llama-gqa", mixers)
    ids = _tokens()
    mask = _padding(ids)
    stage = Stage1Alignment(student, teacher, DistillConfig(stage=1))
    later_calls = []
    handle = teacher.model.layers[-1].mlp.register_forward_hook(lambda *a: later_calls.append(1))
    got = stage.run(ids, mask, grad_scale=None)
    stage.close()
    handle.remove()
    # With softmax last layers the teacher stops after the last linear layer; otherwise it runs through.
    assert later_calls == ([] if mixers[-1] == "softmax" else [1])

    with torch.no_grad():
        out = teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        pos = teacher.model.rotary_emb(out.hidden_states[0], torch.arange(ids.shape[1])[None])
        expected = 0.0
        for i, m in enumerate(mixers):
            if m == "softmax":
                continue
            x = teacher.model.layers[i].input_layernorm(out.hidden_states[i])
            target = teacher.model.layers[i].self_attn(
                hidden_states=x, attention_mask=_causal_mask(teacher, x, mask), position_embeddings=pos
            )[0]
            pred = student.model.layers[i].self_attn(hidden_states=x, attention_mask=mask, position_embeddings=pos)[0]
            expected += (((pred - target) ** 2).sum(-1) * mask).sum()
    torch.testing.assert_close(got, torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def _causal_mask(teacher, x, mask):
    from transformers.masking_utils import create_causal_mask

    from hybrid_distill.modeling import CACHE_ARG

    return create_causal_mask(
        config=teacher.config,
        inputs_embeds=x,
        attention_mask=mask,
        position_ids=torch.arange(x.shape[1])[None],
        **{CACHE_ARG: None},
    )


def test_stage1_trains_only_mixers_and_loss_decreases(tmp_path):
    student, teacher = _pair("qwen3-qknorm", ("gdn", "softmax", "gla", "gdn"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = TensorTokenDataset(_tokens(24, 16), heldout_sequences=4)
    cfg = DistillConfig(
        stage=1,
        target_tokens=4 * 16 * 15,
        global_batch_size=4,
        micro_batch_size=2,
        lr_mixer=3e-3,
        progress=False,
        save_final_model=False,
    )
    result = distill(student, teacher, data, cfg, tmp_path / "s1")
    losses = [r["loss"] for r in read_metrics(tmp_path / "s1")]
    assert result.steps == 15 and len(losses) == 15
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])

    mixer_names = mixer_parameter_names(student)
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= mixer_names, f"non-mixer parameters changed: {sorted(changed - mixer_names)}"
    new_params = {
        k for k in mixer_names if any(s in k for s in ("A_log", "dt_bias", "a_proj", "b_proj", "g_proj", "gk_proj"))
    }
    assert new_params & changed, "new mixer parameters did not train"
    assert any(".q_proj." in k for k in changed), "transferred q/k/v/o of mixers did not train"
    assert not any(k.startswith("model.layers.1.") for k in changed), "the softmax layer changed"
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


def test_stage1_needs_a_linear_layer():
    student, teacher = _pair(mixers=("softmax",) * 4)
    with pytest.raises(ValueError, match="linear"):
        Stage1Alignment(student, teacher, DistillConfig(stage=1))


# ----------------------------------------------------------------------------- Stage 2


@pytest.mark.parametrize("tau,chunk,padded", [(1.0, 5, False), (2.0, 7, True), (0.5, 1000, True)])
def test_stage2_kl_and_grads_match_full_logits(tau, chunk, padded):
    student, teacher = _pair("llama3-rope-tied", ("gdn", "gla", "softmax", "gdn"))
    ids = _tokens(3, 13)
    mask = _padding(ids) if padded else None
    cfg = DistillConfig(stage=2, tau=tau, kl_chunk_size=chunk)
    n = int(mask.sum()) if mask is not None else ids.numel()

    stage = Stage2KL(student, teacher, cfg)
    loss = stage.run(ids, mask, grad_scale=1.0 / n) / n
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=mask).logits
    zs = student(input_ids=ids, attention_mask=mask).logits
    ref = kl_div_reference(zs, zt, tau=tau, mask=mask)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, ref.item())
    ref_grads = {k: p.grad for k, p in student.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.parametrize("variant", ["qwen2-bias-tied", "mistral"])
def test_all_softmax_student_has_zero_kl(variant):
    student, teacher = _pair(variant, ("softmax",) * 4)
    ids = _tokens(3, 10)
    batches = [ids, {"input_ids": ids, "attention_mask": _padding(ids)}]
    assert evaluate_kl(student, teacher, batches, tau=1.0, chunk_size=7) < 1e-7
    assert evaluate_kl(student, teacher, batches, tau=2.0) < 1e-7


def test_evaluate_kl_matches_reference_and_restores_mode():
    student, teacher = _pair()
    student.train()
    ids = _tokens(4, 9)
    mask = _padding(ids)
    got = evaluate_kl(
        student,
        teacher,
        [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}],
        tau=1.0,
        chunk_size=4,
    )
    with torch.no_grad():
        ref = kl_div_reference(
            student(input_ids=ids, attention_mask=mask).logits,
            teacher(input_ids=ids, attention_mask=mask).logits,
            mask=mask,
        )
    assert got == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    assert student.training


def test_stage2_trains_all_parameters(tmp_path):
    student, teacher = _pair()
    before = {k: v.clone() for k, v in student.named_parameters()}
    data = TensorTokenDataset(_tokens(16, 12))
    cfg = DistillConfig(
        stage=2,
        target_tokens=4 * 12 * 3,
        global_batch_size=4,
        lr_other=1e-3,
        progress=False,
        save_final_model=False,
        eval_max_batches=0,
    )
    distill(student, teacher, data, cfg, tmp_path / "s2")
    after = dict(student.named_parameters())
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    row = read_metrics(tmp_path / "s2")[0]
    assert row["lr_mixer"] == 1e-4 and row["lr_other"] == 1e-3
    for key in ("step", "tokens", "loss", "grad_norm", "tokens_per_s", "elapsed"):
        assert key in row


def test_bf16_distillation_keeps_the_teachers_rotary_frequencies_fp32(tmp_path):
    """The frozen teacher is cast to bf16 for bf16 training; its rope inv_freq must not be rounded with it."""
    student, teacher = _pair()
    inv_freq = teacher.model.rotary_emb.inv_freq.clone()
    cfg = DistillConfig(stage=2, target_tokens=4 * 12, global_batch_size=4, precision="bf16", progress=False,
                        save_final_model=False, eval_max_batches=0)
    distill(student, teacher, TensorTokenDataset(_tokens(8, 12)), cfg, tmp_path / "s2")
    assert teacher.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(teacher.model.rotary_emb.inv_freq, inv_freq)


# ----------------------------------------------------------------------------- Stage 3


def test_stage3_cross_entropy_matches_hf_loss():
    student, teacher = _pair()
    ids = _tokens(2, 10)
    stage = Stage3CE(student, None, DistillConfig(stage=3, kl_chunk_size=3))
    n = stage.count_tokens(ids, None)
    assert n == 2 * 9
    loss = stage.run(ids, None, grad_scale=1.0 / n) / n
    ref = student(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref.detach().float(), rtol=1e-5, atol=1e-6)
    g = student.model.embed_tokens.weight.grad.clone()
    student.zero_grad(set_to_none=True)
    ref.backward()
    torch.testing.assert_close(g, student.model.embed_tokens.weight.grad, atol=1e-6, rtol=1e-4)


def test_stage3_padding_excluded():
    student, _ = _pair()
    ids = _tokens(2, 8)
    mask = _padding(ids)
    stage = Stage3CE(student, None, DistillConfig(stage=3))
    logits = student(input_ids=ids, attention_mask=mask).logits.detach()
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    ref = F.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid], reduction="sum")
    with torch.no_grad():
        got = stage.run(ids, mask, grad_scale=None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert stage.count_tokens(ids, mask) == int(valid.sum())


def test_mixer_parameter_names_cover_mixers_only():
    student, _ = _pair()
    names = mixer_parameter_names(student)  # gdn, softmax, gla, gdn
    assert {n.split(".")[2] for n in names} == {"0", "2", "3"}  # not the softmax layer
    assert all(".self_attn." in n for n in names)
    for i in (0, 3):  # GDN: the transferred projections and its own gates
        assert {f"model.layers.{i}.self_attn.{p}" for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight",
                "o_proj.weight", "A_log", "dt_bias")} <= names
    assert "model.layers.2.self_attn.o_proj.weight" in names
    assert "model.layers.1.self_attn.q_proj.weight" not in names and "model.layers.0.mlp.up_proj.weight" not in names
    assert attention_parameter_names(student) - names == {
        f"model.layers.1.self_attn.{n}" for n, _ in student.model.layers[1].self_attn.named_parameters()}


def test_stage2_compiled_layers_follow_the_eager_loss_curve(tmp_path, monkeypatch):
    """``compile_layers`` compiles the decoder layers of the teacher ("teacher") or of both models ("all"),
    once per layer type (not per layer), and trains the same trajectory as eager. Inductor itself runs in
    the GPU test; here the graphs go through AOT autograd's decompositions and partitioner, the parts
    that can change numerics or fail."""
    from hybrid_distill.distill import compiling

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager_decomp_partition")
    data = TensorTokenDataset(_tokens(16, 12))
    curves, graphs = {}, {}
    for run in ("off", "teacher", "all", "all+checkpointing"):
        mode = run.split("+")[0]
        student, teacher = _pair(mixers=("gdn", "softmax", "gla", "gdn", "gdn", "softmax"), num_hidden_layers=6)
        cfg = DistillConfig(
            stage=2, target_tokens=4 * 12 * 3, global_batch_size=4, lr_other=1e-3, progress=False,
            save_final_model=False, eval_max_batches=0, compile_layers=mode,
            activation_checkpointing=run.endswith("checkpointing"),
        )
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        distill(student, teacher, data, cfg, tmp_path / run)
        curves[run] = [r["loss"] for r in read_metrics(tmp_path / run)]
        graphs[run] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert all((layer._compiled_call_impl is not None) == (mode == "all") for layer in student.model.layers)
        assert all((layer._compiled_call_impl is not None) == (mode != "off") for layer in teacher.model.layers)
    for run in ("teacher", "all", "all+checkpointing"):
        assert curves[run] == pytest.approx(curves["off"], rel=1e-5), run
    # one graph for the (no-grad) teacher layers; one per student layer type: GDN, softmax, GLA
    assert (graphs["off"], graphs["teacher"], graphs["all"]) == (0, 1, 4)
    assert graphs["all+checkpointing"] <= 2 * graphs["all"]
    with pytest.raises(ConfigError, match="compile_layers"):
        DistillConfig(stage=2, compile_layers=True)


def test_stage1_runs_a_teacher_compiled_by_an_earlier_stage2(monkeypatch):
    """A pipeline can run Stage 1 after a Stage 2 compiled the shared teacher's layers; its hooks
    (and the early stop) must see the same tensors as with an uncompiled teacher."""
    from hybrid_distill.distill import compiling

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager_decomp_partition")
    ids = _tokens()
    losses = []
    for compiled in (False, True):
        student, teacher = _pair("llama-gqa", ("gdn", "gla", "softmax", "softmax"))
        if compiled:
            compiling.compile_decoder_layers(teacher)
            with torch.no_grad():
                teacher(ids)  # compiles
        stage = Stage1Alignment(student, teacher, DistillConfig(stage=1))
        losses.append(stage.run(ids, None, grad_scale=None).item())  # a Python float: pytest.approx refuses 0-d tensors
        stage.close()
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


@pytest.mark.gpu
def test_stage2_compiled_layers_with_inductor_and_fla_cuda(tmp_path):
    """On a GPU: inductor-compiled decoder layers (the teacher's; and the student's around fla's kernels)
    train the eager trajectory (bf16)."""
    # 12 heads of 128 as a Qwen2.5-1.5B layer: the carried fla kernel cache covers this shape.
    teacher = tiny_teacher("qwen2-bias-tied", hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, intermediate_size=512)
    students = {}
    for compiled in ("off", "teacher", "all"):  # "off" first: the later runs compile the shared teacher
        torch.manual_seed(0)
        students[compiled] = build_student(teacher, ["gdn", "softmax", "gdn", "gdn"], {"kernel_backend": "fla"}).float()
    data = TensorTokenDataset(_tokens(12, 256))
    curves = {}
    for compiled, student in students.items():
        cfg = DistillConfig(
            stage=2, target_tokens=4 * 256 * 3, global_batch_size=4, lr_other=1e-4, progress=False,
            save_final_model=False, eval_max_batches=0, compile_layers=compiled, device="cuda",
        )
        distill(student, teacher, data, cfg, tmp_path / f"compiled-{compiled}")
        curves[compiled] = [r["loss"] for r in read_metrics(tmp_path / f"compiled-{compiled}")]
    assert all(layer._compiled_call_impl is not None for layer in [*students["all"].model.layers, *teacher.model.layers])
    assert all(layer._compiled_call_impl is None for layer in students["teacher"].model.layers)
    assert curves["teacher"] == pytest.approx(curves["off"], rel=2e-2)
    assert curves["all"] == pytest.approx(curves["off"], rel=2e-2)
