"""fla 0.6 kernels (bf16 inputs) against the float32 PyTorch step-loop reference on a CUDA GPU."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybrid_distill.modeling import hybrid_ops as ops

pytestmark = pytest.mark.gpu

DEV = "cuda"
# Heads and head size as a Qwen2.5-1.5B layer (12 heads of 128): the carried kernel cache covers them.
H = 12
TOL = 1e-2  # rel. error ||fla - ref|| / ||ref|| for outputs, states and every gradient


@pytest.fixture(autouse=True)
def _need_fla():
    if not ops.fla_available():
        pytest.skip("flash-linear-attention (with Triton) is not importable")


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def gdn_inputs(B, T, H, D, N=None, seed=0):
    torch.manual_seed(seed)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    return dict(
        q=torch.randn(B, T, H, D, **bf),
        k=torch.randn(B, T, H, D, **bf),
        v=torch.randn(B, T, H, D, **bf),
        g=F.logsigmoid(torch.rand(B, T, H, device=DEV)),  # float32 log decay, as fla's GDN layer passes it
        beta=torch.rand(B, T, H, **bf).sigmoid(),
        initial_state=torch.randn(N or B, H, D, D, device=DEV),
    )


def gla_inputs(B, T, H, D, N=None, seed=0):
    torch.manual_seed(seed)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    return dict(
        q=torch.randn(B, T, H, D, **bf),
        k=torch.randn(B, T, H, D, **bf),
        v=torch.randn(B, T, H, D, **bf),
        gk=(F.logsigmoid(torch.randn(B, T, H, D, device=DEV)) / 16).to(torch.bfloat16),  # fla GLA normaliser
        initial_state=torch.randn(N or B, H, D, D, device=DEV),
    )


def run(fn, inputs, grad, seed=123, **kwargs):
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in inputs.items()}
    o, ht = fn(**leaves, output_final_state=True, **kwargs)
    if not grad:
        return o, ht, {}
    gen = torch.Generator(device=DEV).manual_seed(seed)
    do = torch.randn(o.shape, device=DEV, generator=gen)
    dht = torch.randn(ht.shape, device=DEV, generator=gen)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    return o, ht, {n: t.grad for n, t in leaves.items()}


def compare(fla_fn, ref_fn, inputs, grad, fla_kwargs=(), ref_kwargs=()):
    """Runs fla on the bf16 inputs and the reference on float32 copies; checks every rel. error."""
    o, ht, grads = run(fla_fn, inputs, grad, **dict(fla_kwargs))
    ref_inputs = {n: t.float() for n, t in inputs.items()}
    o_ref, ht_ref, grads_ref = run(ref_fn, ref_inputs, grad, **dict(ref_kwargs))
    assert o.dtype == inputs["v"].dtype and o.shape == o_ref.shape
    assert ht.dtype == torch.float32 and ht.shape == ht_ref.shape
    errs = {"o": rel(o, o_ref), "ht": rel(ht, ht_ref)}
    errs.update({f"d{n}": rel(grads[n], grads_ref[n]) for n in grads_ref})
    # Collect all errors first so one failing run reports the whole picture.
    assert all(math.isfinite(e) and e < TOL for e in errs.values()), errs


# --------------------------------------------------------------------------------------------
# Chunk kernels (training / prefill): outputs, final states and all gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [512, 300])
@pytest.mark.parametrize("D", [128])
def test_gdn_fla_chunk_matches_reference(T, D):
    x = gdn_inputs(2, T, H, D)
    compare(
        ops.gated_delta_rule,
        ops.torch_recurrent_gated_delta_rule,
        x,
        grad=True,
        fla_kwargs=dict(backend="fla", use_qk_l2norm=True),
        ref_kwargs=dict(use_qk_l2norm=True),
    )


@pytest.mark.parametrize("T", [512, 300])
@pytest.mark.parametrize("D", [128])
def test_gla_fla_chunk_matches_reference(T, D):
    x = gla_inputs(2, T, H, D)
    compare(ops.gated_linear_attention, ops.torch_recurrent_gla, x, grad=True, fla_kwargs=dict(backend="fla"))


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("tilelang", ["0", "1"])
def test_gdn_fla_chunk_backward_without_tilelang(D, tilelang, monkeypatch):
    """fla's gated backward on every path it can take: TileLang where installed and enabled, else its Triton kernel
    (on Hopper with Triton 3.4-3.7.0, which fla refuses, through hybrid_ops' 32-wide tiles)."""
    import importlib.util

    if tilelang == "1" and importlib.util.find_spec("tilelang") is None:
        pytest.skip("TileLang is not installed")
    monkeypatch.setenv("FLA_TILELANG", tilelang)
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    affected = IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
    assert ops._register_hopper_dqkwg() == affected
    x = gdn_inputs(2, 512, 4, D, seed=2)
    compare(ops.gated_delta_rule, ops.torch_recurrent_gated_delta_rule, x, grad=True,
            fla_kwargs=dict(backend="fla", use_qk_l2norm=True), ref_kwargs=dict(use_qk_l2norm=True))


def test_gdn_fla_chunk_varlen():
    cu = torch.tensor([0, 37, 200, 300, 512], device=DEV)
    x = gdn_inputs(1, 512, H, 128, N=4, seed=1)
    compare(
        ops.gated_delta_rule,
        ops.torch_recurrent_gated_delta_rule,
        x,
        grad=True,
        fla_kwargs=dict(backend="fla", cu_seqlens=cu),
        ref_kwargs=dict(cu_seqlens=cu),
    )


def test_gla_fla_chunk_varlen():
    cu = torch.tensor([0, 37, 200, 300, 512], device=DEV)
    x = gla_inputs(1, 512, H, 128, N=4, seed=1)
    compare(
        ops.gated_linear_attention,
        ops.torch_recurrent_gla,
        x,
        grad=True,
        fla_kwargs=dict(backend="fla", cu_seqlens=cu),
        ref_kwargs=dict(cu_seqlens=cu),
    )


def test_torch_chunk_on_gpu_matches_reference():
    x = gdn_inputs(2, 300, H, 128)
    x = {n: t.float() for n, t in x.items()}
    compare(ops.torch_chunk_gated_delta_rule, ops.torch_recurrent_gated_delta_rule, x, grad=True)


# --------------------------------------------------------------------------------------------
# Fused recurrent kernels (decode)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 5, 64])
def test_gdn_fla_decode_path_matches_reference(T):
    """Grad-free short calls go through fla's fused recurrent kernel."""
    with torch.no_grad():
        compare(
            ops.gated_delta_rule, ops.torch_recurrent_gated_delta_rule, gdn_inputs(2, T, H, 128), grad=False,
            fla_kwargs=dict(backend="fla"),
        )


@pytest.mark.parametrize("T", [1, 5, 64])
def test_gla_fla_decode_path_matches_reference(T):
    with torch.no_grad():
        compare(
            ops.gated_linear_attention, ops.torch_recurrent_gla, gla_inputs(2, T, H, 128), grad=False,
            fla_kwargs=dict(backend="fla"),
        )


@pytest.mark.parametrize("D", [128])
def test_fla_fused_recurrent_kernels_long(D):
    """The fused recurrent kernels themselves at T=300 (GDN forward only: fla has no backward for it)."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    from fla.ops.gla import fused_recurrent_gla

    def fla_gdn(q, k, v, g, beta, initial_state, output_final_state):
        return fused_recurrent_gated_delta_rule(
            q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state,
            output_final_state=output_final_state, use_qk_l2norm_in_kernel=True,
        )

    with torch.no_grad():
        compare(fla_gdn, ops.torch_recurrent_gated_delta_rule, gdn_inputs(2, 300, H, D), grad=False)

    def fla_gla(q, k, v, gk, initial_state, output_final_state):
        return fused_recurrent_gla(q=q, k=k, v=v, gk=gk, initial_state=initial_state,
                                   output_final_state=output_final_state)

    compare(fla_gla, ops.torch_recurrent_gla, gla_inputs(2, 300, H, D), grad=True)


def test_fla_varlen_decode_path():
    cu = torch.tensor([0, 1, 5, 20], device=DEV)
    with torch.no_grad():
        compare(
            ops.gated_delta_rule, ops.torch_recurrent_gated_delta_rule, gdn_inputs(1, 20, H, 128, N=3), grad=False,
            fla_kwargs=dict(backend="fla", cu_seqlens=cu), ref_kwargs=dict(cu_seqlens=cu),
        )
        compare(
            ops.gated_linear_attention, ops.torch_recurrent_gla, gla_inputs(1, 20, H, 128, N=3), grad=False,
            fla_kwargs=dict(backend="fla", cu_seqlens=cu), ref_kwargs=dict(cu_seqlens=cu),
        )


@pytest.mark.parametrize("op", ["gdn", "gla"])
def test_fla_prefill_then_decode_equals_one_pass(op):
    """Chunk-kernel prefill, then fused-recurrent steps fed the returned fp32 state."""
    fn = ops.gated_delta_rule if op == "gdn" else ops.gated_linear_attention
    x = (gdn_inputs if op == "gdn" else gla_inputs)(2, 203, 4, 64)
    x["initial_state"] = None
    seq = {n: t for n, t in x.items() if t is not None}
    with torch.no_grad():
        o_full, s_full = fn(**seq, output_final_state=True, backend="fla")
        outs = []
        o, s = fn(**{n: t[:, :200] for n, t in seq.items()}, output_final_state=True, backend="fla")
        outs.append(o)
        for t in range(200, 203):
            o, s = fn(**{n: x_[:, t : t + 1] for n, x_ in seq.items()}, initial_state=s,
                      output_final_state=True, backend="fla")
            outs.append(o)
    assert rel(torch.cat(outs, 1), o_full) < TOL and rel(s, s_full) < TOL


def test_auto_picks_fla_on_cuda():
    x = gdn_inputs(2, 128, H, 128)
    with torch.no_grad():
        o_auto, _ = ops.gated_delta_rule(**x, backend="auto")
        o_fla, _ = ops.gated_delta_rule(**x, backend="fla")
    assert torch.equal(o_auto, o_fla)
