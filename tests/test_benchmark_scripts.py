"""The benchmark scripts' own logic that decides what their tables say."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from profile_decode import category  # noqa: E402


def test_decode_profile_kernel_categories():
    # kernel names from an H200 profile of the compiled static decode step (RESULTS.md, session 12)
    named = {
        "triton_red_fused__to_copy_amax_bitwise_not_clone_exp_isinf_le_masked_fill_mul_sub_sum_tran": "attn softmax (inductor)",
        "triton_per_fused_amax_exp_gt_isinf_masked_fill_mul_squeeze_sub_sum_7": "attn softmax (inductor)",
        "triton_poi_fused__to_copy_add_clone_copy__expand_mul_permute_rsqrt_select_sigmoid_silu_spl": "inductor fused",
        "triton_per_fused_add_mul_pow_rsqrt_silu_split_with_sizes_sum_view_3": "inductor fused",
        "nvjet_sm90_tst_128x8_64x12_4x1_v_bz_TNT": "matmul",
        "std::enable_if<!(false), void>::type internal::gemvx::kernel<int, int, float, float, float": "matmul",
        "Memcpy DtoD (Device -> Device)": "kv cat/copy",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<": "kv cat/copy",
        "flash_fwd_kernel": "attention",
        "fused_recurrent_gated_delta_rule_fwd_kernel": "fla recurrent",
        "chunk_gated_delta_rule_fwd_kernel_h_blockdim64": "fla chunk",
        "Memset (Device)": "other",
        # Stage 2 (H200 profile, session 13): the compiled KL chunk is an online-softmax inductor kernel
        "triton_red_fused__to_copy_exp_log_mul_prepare_softmax_online_sub_sum_0": "inductor fused",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1": "attention",
        "kernel_kernel": "other",  # fla's TileLang backward: its generated name says nothing
    }
    assert {name: category(name) for name in named} == named


def test_stage2_memory_cap_leaves_room_for_memory_outside_the_allocator(monkeypatch):
    import types

    import pytest
    import torch
    from bench_stage2 import cap_device_memory

    gib = 2**30
    total = 139.8 * gib
    set_calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=total))
    # 4 GiB in use, 3 of them the allocator's: 1 GiB (context, cuBLAS, kernels) lies outside it
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (total - 4 * gib, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 3 * gib)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: set_calls.append((f, i)))

    limit = cap_device_memory(torch.device("cuda"), 79.11)
    assert limit == pytest.approx(79.11 - 1.0 - 0.5)
    assert set_calls == [(pytest.approx(limit * gib / total), 0)]
    with pytest.raises(ValueError, match="--memory-cap-gib 1"):
        cap_device_memory(torch.device("cuda"), 1.0)


def test_snapshot_cost_reads_step_and_snapshot_time_from_the_trainer_metrics():
    from bench_snapshot_cost import phase_seconds

    # steps 1..6 of 1 s each, a snapshot after steps 2, 4 (0.25 s each) and 6 (the final one, 0.5 s)
    train, evals, t = [], [], 0.0
    for step in range(1, 7):
        t += 1.0
        train.append({"step": step, "elapsed": t})
        if step % 2 == 0:
            t += 0.5 if step == 6 else 0.25
            evals.append({"step": step, "elapsed": t})
    out = phase_seconds(train, evals, skip_steps=2)  # steps 3-6 and the snapshots after 4 and 6
    assert out == {"steps": 4, "snapshots": 2, "train_s": 4.0, "snapshot_s": 0.75}
