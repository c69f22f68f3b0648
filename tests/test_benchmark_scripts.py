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
    }
    assert {name: category(name) for name in named} == named
