"""Linear-attention ops for hybrid students: Gated DeltaNet (gated delta rule) and GLA.

Semantics follow flash-linear-attention (fla) 0.6, head-last layout:
q, k: [B, T, H, K]; v: [B, T, H, V]; recurrent states: [B, H, K, V] (N rows instead of B when
``cu_seqlens`` packs N sequences into a batch of one).

- Gated delta rule, per step: ``S = S * exp(g_t); S = S + k_t (beta_t (v_t - S^T k_t))^T;
  o_t = S^T (q_t * scale)`` with optional L2 normalisation of q and k (fla's
  ``use_qk_l2norm_in_kernel``: ``x / sqrt(sum(x^2) + 1e-6)``).
- GLA, per step: ``S = diag(exp(gk_t)) S + k_t v_t^T; o_t = S^T (q_t * scale)``.

Backends: fla's Triton kernels on CUDA (imported lazily, only when used), or pure PyTorch
(a step loop and a chunkwise-parallel form, both differentiable with plain autograd).

Self-contained on purpose: this file is copied next to saved checkpoints and loaded as remote
code where ``hybrid_distill`` is not installed, so it imports only torch and the stdlib.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = [
    "fla_available",
    "gated_delta_rule",
    "gated_linear_attention",
    "l2norm",
    "torch_chunk_gated_delta_rule",
    "torch_chunk_gla",
    "torch_recurrent_gated_delta_rule",
    "torch_recurrent_gla",
]

_FLA_INSTALL_HINT = "pip install flash-linear-attention"
# With no grad needed and at most this many tokens, fla's fused recurrent kernels run (decode).
_FLA_RECURRENT_MAX_T = 64
# The torch backend runs the step loop up to this many tokens, the chunked form above it.
_TORCH_RECURRENT_MAX_T = 16
_GLA_SUBCHUNK = 16


# --------------------------------------------------------------------------------------------
# fla availability and dispatch
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _fla_status() -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    try:
        importlib.import_module("fla.ops.gated_delta_rule")
        importlib.import_module("fla.ops.gla")
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return False, f"importing fla failed ({type(exc).__name__}: {exc})"
    _register_hopper_dqkwg()  # outside the guard: a failure here must not pass for "no fla"
    return True, ""


# fla's gated backward kernel `chunk_bwd_dqkwg` miscompiles on Hopper with Triton >= 3.4 and < 3.7.1 when its
# tiles are 64 wide (fla issue #640: wrong dk and dg at tile width 64, right at 32 and 128), so fla refuses to run
# it there and dispatches to its TileLang version instead (36 MB of TileLang, TVM and z3). Where TileLang is not
# installed, this backend runs the same Triton kernel with tiles of 32 in place of 64 (128-wide tiles are kept).
# It is registered through fla's own backend registry, after fla's TileLang backend, so it serves only calls that
# fla would otherwise refuse. benchmarks/RESULTS.md records its gradients against the reference recurrence.
_HOPPER_SAFE_TILE = 32


def _hopper_tile(width: int) -> int:
    """The tile fla picks on Hopper for a dimension of ``width`` (a power of two in [16, 128]), 32 where it picks 64."""
    tile = min(max(1 << max(0, int(width) - 1).bit_length(), 16), 128)
    return _HOPPER_SAFE_TILE if tile == 64 else tile


def _hopper_chunk_bwd_dqkwg(q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None, scale=None,
                            state_v_first=False, cu_seqlens=None, chunk_size=64, chunk_indices=None):
    """fla's `chunk_bwd_dqkwg` (same arguments and results: dq, dk, dw, dg) with Hopper-safe tiles."""
    import triton
    from fla.ops.common.chunk_o import chunk_bwd_kernel_dqkwg
    from fla.ops.utils import prepare_chunk_indices

    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    if chunk_indices is None and cu_seqlens is not None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    NT = triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices)
    BK, BV = _hopper_tile(K), _hopper_tile(V)
    NK = triton.cdiv(K, BK)
    # one block of K per program: dq and dk are disjoint slices, the gate gradient a partial sum per block
    dq = q.new_empty(B, T, HV, K)
    dk = k.new_empty(B, T, HV, K)
    dg = torch.empty(NK, *g.shape, dtype=torch.float32, device=g.device) if g is not None else None
    dw = torch.empty_like(w) if w is not None else None
    chunk_bwd_kernel_dqkwg[(NK * NT, B * HV)](
        q=q, k=k, v=v, g=g, g_gamma=g_gamma, h=h, do=do, dh=dh, dq=dq, dk=dk, dw=dw, dv=dv, dg=dg,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, scale=scale, B=B, T=T, H=H, HV=HV, K=K, V=V,
        BT=chunk_size, BK=BK, BV=BV, STATE_V_FIRST=state_v_first,
    )
    if H != HV:  # grouped values: the query/key heads' gradients are summed over their value heads
        dq = dq.view(B, T, H, HV // H, K).sum(3)
        dk = dk.view(B, T, H, HV // H, K).sum(3)
    return dq, dk, dw, (dg.sum(0) if dg is not None else None)


@functools.lru_cache(maxsize=None)
def _register_hopper_dqkwg() -> bool:
    """Register `_hopper_chunk_bwd_dqkwg` with fla for the Hopper + Triton versions fla refuses (once); whether it
    was registered."""
    try:
        from fla.backends import BaseBackend, register
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:  # an fla without the backend registry: its own behaviour stands
        return False
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return False

    class HopperSafeTiles(BaseBackend):
        backend_type = "hybrid_distill_hopper_tiles"

        def chunk_bwd_dqkwg_verifier(self, *args, **kwargs):
            gated = kwargs.get("g", args[7] if len(args) > 7 else None) is not None
            return (True, None) if gated else (False, "ungated: fla's own kernel is right at every tile width")

        def chunk_bwd_dqkwg(self, *args, **kwargs):
            return _hopper_chunk_bwd_dqkwg(*args, **kwargs)

    register("common")(HopperSafeTiles)
    return True


# A constant to torch.compile: traced, the import in `_fla_status` would be a graph break in every
# linear mixer's forward.
@torch.compiler.assume_constant_result
def fla_available() -> bool:
    """Whether CUDA is available and fla's kernels import (cached; never imports fla without CUDA)."""
    return _fla_status()[0]


def _use_fla(backend: str, x: Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and fla_available()
    if backend == "fla":
        if not fla_available():
            why = _fla_status()[1]
            raise RuntimeError(
                f"backend='fla' needs flash-linear-attention with Triton and a CUDA GPU, but {why}. "
                f"Install it with `{_FLA_INSTALL_HINT}`, or use backend='torch' / 'auto'."
            )
        if not x.is_cuda:
            raise RuntimeError(f"backend='fla' needs CUDA tensors, got tensors on {x.device}.")
        return True
    raise ValueError(f"backend must be 'auto', 'fla' or 'torch', got {backend!r}")


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fla_cu_seqlens(cu_seqlens: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    if cu_seqlens is None:
        return None
    return torch.as_tensor(cu_seqlens, device=device).long()


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Optional[Tensor] = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Gated delta rule (Gated DeltaNet) with fla 0.6 semantics.

    Args:
        q, k: [B, T, H, K]. v: [B, T, HV, V] (HV a multiple of H; HV > H is fla's GVA).
        g: [B, T, HV] log decay (<= 0). beta: [B, T, HV] write strength.
        scale: query scale, default K ** -0.5.
        initial_state: [B|N, HV, K, V]. output_final_state: return the last state.
        use_qk_l2norm: L2-normalise q and k over K first.
        cu_seqlens: [N + 1] offsets of N packed sequences (B must be 1).
        backend: "auto" (fla on CUDA when importable, else torch), "fla" or "torch".
        chunk_size: chunk length of the chunked algorithms.

    Returns:
        o: [B, T, HV, V] in v's dtype; final state [B|N, HV, K, V] in float32 (float64 on the
        torch path for float64 inputs), or None.
    """
    if _use_fla(backend, q):
        return _fla_gated_delta_rule(
            q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, chunk_size
        )
    fn = torch_recurrent_gated_delta_rule if q.shape[1] <= _TORCH_RECURRENT_MAX_T else torch_chunk_gated_delta_rule
    kwargs = dict(
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
        cu_seqlens=cu_seqlens,
    )
    if fn is torch_chunk_gated_delta_rule:
        kwargs["chunk_size"] = chunk_size
    return fn(q, k, v, g, beta, **kwargs)


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    backend: str = "auto",
    chunk_size: int = 64,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Gated linear attention (GLA) with fla 0.6 semantics.

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V]. gk: [B, T, H, K] log decay per key dim (<= 0).
        scale, initial_state, output_final_state, cu_seqlens, backend: as in `gated_delta_rule`.
        chunk_size: chunk length of the torch chunked algorithm (fla picks its own).

    Returns:
        o: [B, T, H, V] in v's dtype; final state [B|N, H, K, V] in float32 (float64 on the torch
        path for float64 inputs), or None.
    """
    if _use_fla(backend, q):
        return _fla_gla(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)
    if q.shape[1] <= _TORCH_RECURRENT_MAX_T:
        return torch_recurrent_gla(
            q, k, v, gk, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    return torch_chunk_gla(
        q, k, v, gk, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )


# --------------------------------------------------------------------------------------------
# fla path
# --------------------------------------------------------------------------------------------


@torch.compiler.disable  # Triton kernels with their own autotuning: run them as they are under torch.compile
def _fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                          cu_seqlens, chunk_size):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    # fla's kernels (and its TileLang backward) want q, k, v in one dtype.
    q, k = q.to(v.dtype), k.to(v.dtype)
    h0 = None if initial_state is None else initial_state.float()
    kwargs = dict(
        q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=h0,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
        cu_seqlens=_fla_cu_seqlens(cu_seqlens, q.device),
    )
    # The fused recurrent GDN kernel has no backward, so it serves grad-free short calls only.
    if q.shape[1] <= _FLA_RECURRENT_MAX_T and not _needs_grad(q, k, v, g, beta, h0):
        o, ht = fused_recurrent_gated_delta_rule(**kwargs)
    else:
        if chunk_size in (16, 32, 64):
            kwargs["chunk_size"] = chunk_size
        o, ht = chunk_gated_delta_rule(**kwargs)
    return o.to(v.dtype), ht


@torch.compiler.disable
def _fla_gla(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens):
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    q, k = q.to(v.dtype), k.to(v.dtype)
    h0 = None if initial_state is None else initial_state.float()  # chunk_gla asserts fp32
    common = dict(
        q=q, k=k, v=v, scale=scale, initial_state=h0, output_final_state=output_final_state,
        cu_seqlens=_fla_cu_seqlens(cu_seqlens, q.device),
    )
    if q.shape[1] <= _FLA_RECURRENT_MAX_T and not _needs_grad(q, k, v, gk, h0):
        o, ht = fused_recurrent_gla(gk=gk, **common)
    else:
        o, ht = chunk_gla(g=gk, **common)
    return o.to(v.dtype), ht


# --------------------------------------------------------------------------------------------
# Shared torch helpers
# --------------------------------------------------------------------------------------------


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """fla's L2 norm over the last dim: ``x / sqrt(sum(x^2) + eps)``."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_shapes(q, k, v, state_shape, initial_state, cu_seqlens):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"expected q, k [B, T, H, K] and v [B, T, HV, V]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1, got {q.shape[0]}")
    n = q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and tuple(initial_state.shape) != (n, *state_shape):
        raise ValueError(f"initial_state must have shape {(n, *state_shape)}, got {tuple(initial_state.shape)}")


def _pack_varlen(xs, cu_seqlens):
    """[1, T, ...] tensors -> zero-padded [N, Tmax, ...] per sequence, plus the validity mask [N, Tmax].

    Zero padding at a sequence's end is inert for both ops (zero k and beta write nothing, zero log
    gates keep the state), so final states come out right.
    """
    cu = [int(c) for c in torch.as_tensor(cu_seqlens).tolist()]
    if cu[0] != 0 or cu[-1] != xs[0].shape[1] or any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={xs[0].shape[1]}, got {cu}")
    device = xs[0].device
    starts = torch.tensor(cu[:-1], device=device)
    lens = torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:])], device=device)
    t_max = max(max(b - a for a, b in zip(cu[:-1], cu[1:])), 1)
    pos = torch.arange(t_max, device=device)
    mask = pos[None, :] < lens[:, None]
    idx = torch.where(mask, starts[:, None] + pos[None, :], torch.zeros_like(mask, dtype=torch.long))
    packed = []
    for x in xs:
        y = x[0][idx]
        m = mask.view(*mask.shape, *([1] * (y.dim() - 2)))
        packed.append(torch.where(m, y, torch.zeros((), dtype=y.dtype, device=device)))
    return packed, mask


def _pad_time(xs, multiple: int):
    """Zero-pad [B, T, ...] tensors on T up to a multiple of ``multiple``."""
    t = xs[0].shape[1]
    pad = (-t) % multiple
    if pad == 0:
        return xs
    return [torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1) for x in xs]


def _run(core, q, k, v, gates, initial_state, output_final_state, cu_seqlens, out_dtype, chunk_size):
    """Varlen packing, padding and [B,T,H,*] <-> [B,H,T,*] transposes around a core op.

    ``core(q, k, v, gates, h0) -> (o, ht)`` works on head-first tensors whose T is a multiple of
    ``chunk_size`` (1 for the step loop).
    """
    B, T, HV, K = q.shape
    V = v.shape[3]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    h0 = q.new_zeros(N, HV, K, V) if initial_state is None else initial_state.to(q.dtype)
    if T == 0:
        return v.new_zeros(B, 0, HV, V).to(out_dtype), (h0 if output_final_state else None)
    mask = None
    if cu_seqlens is not None:
        (q, k, v, *gates), mask = _pack_varlen([q, k, v, *gates], cu_seqlens)
    Tn = q.shape[1]
    q, k, v, *gates = _pad_time([q, k, v, *gates], chunk_size)
    q, k, v, *gates = [x.transpose(1, 2).contiguous() for x in (q, k, v, *gates)]
    o, ht = core(q, k, v, gates, h0)
    o = o.transpose(1, 2)[:, :Tn]
    if mask is not None:
        o = o[mask].unsqueeze(0)
    return o.to(out_dtype), (ht if output_final_state else None)


def _prep_gdn(q, k, v, g, beta, scale, initial_state, use_qk_l2norm, cu_seqlens):
    _check_shapes(q, k, v, (v.shape[2], q.shape[3], v.shape[3]), initial_state, cu_seqlens)
    HV = v.shape[2]
    if HV % q.shape[2] != 0 or g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        raise ValueError(
            f"expected g, beta [B, T, HV] with HV a multiple of H; got q {tuple(q.shape)}, v {tuple(v.shape)}, "
            f"g {tuple(g.shape)}, beta {tuple(beta.shape)}"
        )
    dt = _compute_dtype(q, k, v)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q = q * scale
    if HV != q.shape[2]:  # GVA: value head i reads query/key head i // (HV // H), as in fla
        q = q.repeat_interleave(HV // q.shape[2], dim=2)
        k = k.repeat_interleave(HV // k.shape[2], dim=2)
    return q, k, v, g, beta


def _prep_gla(q, k, v, gk, scale, initial_state, cu_seqlens):
    _check_shapes(q, k, v, (q.shape[2], q.shape[3], v.shape[3]), initial_state, cu_seqlens)
    if v.shape[2] != q.shape[2] or gk.shape != q.shape:
        raise ValueError(
            f"expected v [B, T, H, V] and gk like q; got q {tuple(q.shape)}, v {tuple(v.shape)}, gk {tuple(gk.shape)}"
        )
    dt = _compute_dtype(q, k, v)
    q, k, v, gk = (x.to(dt) for x in (q, k, v, gk))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return q * scale, k, v, gk


def _masked_exp(x: Tensor, mask: Tensor) -> Tensor:
    """exp(x) where mask else 0; masked entries never reach exp, so no overflow and no NaN grads."""
    return torch.exp(x.masked_fill(~mask, float("-inf")))


# --------------------------------------------------------------------------------------------
# Gated delta rule in PyTorch
# --------------------------------------------------------------------------------------------


def _gdn_recurrent_core(q, k, v, gates, h0):
    g, beta = gates
    S = h0
    outs = []
    for t in range(q.shape[2]):
        S = S * torch.exp(g[:, :, t])[..., None, None]
        kv = torch.einsum("bhk,bhkv->bhv", k[:, :, t], S)
        u = beta[:, :, t, None] * (v[:, :, t] - kv)
        S = S + k[:, :, t, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, dim=2), S


def _gdn_chunk_core(q, k, v, gates, h0, C):
    r"""Chunkwise gated delta rule.

    Within a chunk with cumulative log gates ``c`` and start state ``S0``, the write vectors
    ``d_j = beta_j (v_j - S_{j-1}'^T k_j)`` solve the unit-lower-triangular system
    ``(I + A) d = beta*v - beta*exp(c)*k S0`` with ``A_ji = beta_j exp(c_j - c_i) k_j.k_i`` (i < j),
    so ``d = U - W S0`` (UT transform). Then ``o = (q exp(c)) S0 + (q k^T * decay) d`` and
    ``S_end = exp(c_last) S0 + (k exp(c_last - c))^T d``.
    """
    g, beta = gates
    B, H, T, K = k.shape
    V = v.shape[-1]
    N = T // C
    q, k = q.view(B, H, N, C, K), k.view(B, H, N, C, K)
    v, beta = v.view(B, H, N, C, V), beta.view(B, H, N, C)
    c = g.view(B, H, N, C).cumsum(-1)

    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    incl, strict = ones.tril(), ones.tril(-1)
    decay = _masked_exp(c[..., :, None] - c[..., None, :], incl)  # exp(c_t - c_j), j <= t
    kt = k.transpose(-1, -2)
    A = (beta[..., None] * (k @ kt) * decay).masked_fill(~strict, 0)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * c.exp())[..., None] * k], dim=-1)
    U, W = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True).split([V, K], -1)

    c_last = c[..., -1]  # [B, H, N]
    kd_t = (k * torch.exp(c_last[..., None] - c)[..., None]).transpose(-1, -2)  # [B, H, N, K, C]
    # Chunk-to-chunk: S' = exp(c_last) S - (kd^T W) S + kd^T U; only these small products are serial.
    M, R = kd_t @ W, kd_t @ U
    a = c_last.exp()[..., None, None]
    S = h0
    starts = []
    for n in range(N):
        starts.append(S)
        S = a[:, :, n] * S - M[:, :, n] @ S + R[:, :, n]
    S0 = torch.stack(starts, dim=2)  # [B, H, N, K, V]
    d = U - W @ S0
    o = (q * c.exp()[..., None]) @ S0 + ((q @ kt) * decay) @ d
    return o.reshape(B, H, T, V), S


def torch_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Gated delta rule as a plain step loop (the reference; also fine for decoding a few tokens).

    Same arguments and returns as `gated_delta_rule`; computes in float32 (float64 for float64 inputs).
    """
    out_dtype = v.dtype
    q, k, v, g, beta = _prep_gdn(q, k, v, g, beta, scale, initial_state, use_qk_l2norm, cu_seqlens)
    return _run(_gdn_recurrent_core, q, k, v, [g, beta], initial_state, output_final_state, cu_seqlens,
                out_dtype, 1)


def torch_chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Optional[Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Chunkwise-parallel gated delta rule (WY/UT transform per chunk, serial state passing).

    Same arguments and returns as `gated_delta_rule`; computes in float32 (float64 for float64 inputs).
    """
    out_dtype = v.dtype
    q, k, v, g, beta = _prep_gdn(q, k, v, g, beta, scale, initial_state, use_qk_l2norm, cu_seqlens)
    C = _effective_chunk(q.shape[1] if cu_seqlens is None else _max_len(cu_seqlens), chunk_size)
    core = functools.partial(_gdn_chunk_core, C=C)
    return _run(core, q, k, v, [g, beta], initial_state, output_final_state, cu_seqlens, out_dtype, C)


def _max_len(cu_seqlens) -> int:
    cu = torch.as_tensor(cu_seqlens).tolist()
    return max([b - a for a, b in zip(cu[:-1], cu[1:])] + [1])


def _effective_chunk(T: int, chunk_size: int) -> int:
    """Shrink the chunk for short inputs (less padding), keeping it a multiple of 16 when it was."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if T >= chunk_size:
        return chunk_size
    unit = _GLA_SUBCHUNK if chunk_size % _GLA_SUBCHUNK == 0 else 1
    return max(unit, math.ceil(T / unit) * unit)


# --------------------------------------------------------------------------------------------
# GLA in PyTorch
# --------------------------------------------------------------------------------------------


def _gla_recurrent_core(q, k, v, gates, h0):
    (gk,) = gates
    S = h0
    outs = []
    for t in range(q.shape[2]):
        S = S * torch.exp(gk[:, :, t])[..., None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, dim=2), S


def _gla_chunk_core(q, k, v, gates, h0, C):
    r"""Chunkwise GLA with secondary chunking for the intra-chunk scores.

    Scores ``A_tj = sum_d q_td k_jd exp(b_td - b_jd)`` (j <= t, ``b`` the in-chunk cumulative log
    gate). Diagonal sub-chunk blocks form the [c, c, K] decay tensor with masked differences; an
    off-diagonal block (I > J) factors through the last row ``r`` of sub-chunk J:
    ``(q exp(b_I - r)) (k exp(r - b_J))^T``, where both exponents are <= 0. Nothing overflows.
    """
    (gk,) = gates
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = T // C
    c = _GLA_SUBCHUNK if C % _GLA_SUBCHUNK == 0 else C
    n = C // c
    q, k, v = q.view(B, H, N, C, K), k.view(B, H, N, C, K), v.view(B, H, N, C, V)
    b = gk.view(B, H, N, C, K).cumsum(-2)

    qs, ks, bs = q.view(B, H, N, n, c, K), k.view(B, H, N, n, c, K), b.view(B, H, N, n, c, K)
    tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    diag_decay = _masked_exp(bs[..., :, None, :] - bs[..., None, :, :], tril[..., None])  # [.., n, c, c, K]
    A_diag = torch.einsum("...td,...jd,...tjd->...tj", qs, ks, diag_decay)  # [.., n, c, c]
    if n == 1:
        A = A_diag.squeeze(-3)
    else:
        r = bs[..., -1, :]  # [.., n, K]
        k_ref = ks * torch.exp(r[..., None, :] - bs)  # [.., n(J), c, K]
        below = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # I > J
        q_ref = qs[..., :, None, :, :] * _masked_exp(
            bs[..., :, None, :, :] - r[..., None, :, None, :], below[:, :, None, None]
        )  # [.., n(I), n(J), c, K]
        blocks = q_ref @ k_ref[..., None, :, :, :].transpose(-1, -2)  # [.., n(I), n(J), c, c]
        eye_n = torch.eye(n, dtype=q.dtype, device=q.device)
        blocks = blocks + A_diag[..., :, None, :, :] * eye_n[:, :, None, None]
        A = blocks.transpose(-3, -2).reshape(B, H, N, C, C)
    o = A @ v

    b_last = b[..., -1, :]  # [B, H, N, K]
    dS = (k * torch.exp(b_last[..., None, :] - b)).transpose(-1, -2) @ v  # [B, H, N, K, V]
    a = b_last.exp()[..., None]
    S = h0
    starts = []
    for i in range(N):
        starts.append(S)
        S = a[:, :, i] * S + dS[:, :, i]
    o = o + (q * b.exp()) @ torch.stack(starts, dim=2)
    return o.reshape(B, H, T, V), S


def torch_recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """GLA as a plain step loop (the reference). Same arguments and returns as `gated_linear_attention`."""
    out_dtype = v.dtype
    q, k, v, gk = _prep_gla(q, k, v, gk, scale, initial_state, cu_seqlens)
    return _run(_gla_recurrent_core, q, k, v, [gk], initial_state, output_final_state, cu_seqlens, out_dtype, 1)


def torch_chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Chunkwise-parallel GLA. Same arguments and returns as `gated_linear_attention`."""
    out_dtype = v.dtype
    q, k, v, gk = _prep_gla(q, k, v, gk, scale, initial_state, cu_seqlens)
    C = _effective_chunk(q.shape[1] if cu_seqlens is None else _max_len(cu_seqlens), chunk_size)
    core = functools.partial(_gla_chunk_core, C=C)
    return _run(core, q, k, v, [gk], initial_state, output_final_state, cu_seqlens, out_dtype, C)
