"""Distillation losses: Stage-1 attention-output alignment, chunked KL (Stage 2) and chunked CE (Stage 3).

All losses here return a *sum over tokens*; the trainer divides by the global number of valid
tokens of the optimizer step, so micro-batching and data parallelism give the same gradient as
one big batch.

The chunked head losses never hold [N, V] logits of the whole batch: a custom autograd function
walks over the tokens in chunks of ``chunk_size``, computes both models' logits for one chunk in
fp32, the chunk's loss and — right there, in the forward pass — the gradient of that loss with
respect to the student's hidden states and lm_head weight. The backward pass only scales the
stored gradients ([N, H] and [V, H], the sizes of the inputs), so no logits survive a chunk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 1024
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------


def select_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """Rows of ``x`` [B, T, ...] at valid positions (``mask`` [B, T] non-zero), flattened to [N, ...]."""
    if mask is None:
        return x.reshape(-1, *x.shape[2:])
    return x[mask.to(torch.bool)]


def shifted_targets(input_ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(positions mask [B, T], labels [B, T]) for next-token prediction: position t predicts token t+1.

    A position counts when it and the next position are both real tokens; the last position never does.
    """
    labels = torch.roll(input_ids, -1, dims=1)
    valid = torch.ones_like(input_ids, dtype=torch.bool)
    if mask is not None:
        m = mask.to(torch.bool)
        valid = m & torch.roll(m, -1, dims=1)
    valid[:, -1] = False
    return valid, labels


# --------------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------------


def alignment_loss_sum(
    student_out: Tensor, teacher_out: Tensor, mask: Tensor | None = None, normalize: str = "none"
) -> Tensor:
    """Sum over valid tokens of ``‖U_teacher,t − U_student,t‖²`` (squared L2 over the hidden dimension).

    ``normalize="hidden"`` divides each token's squared norm by the hidden size (a per-element MSE).
    Computed in fp32. Dividing the result by the number of valid tokens gives the paper's
    ``(1/T)‖U_teacher − U_student‖²`` for one layer (Eq. 4), averaged over the batch.
    """
    if normalize not in ("none", "hidden"):
        raise ValueError(f"normalize must be 'none' or 'hidden', got {normalize!r}")
    diff = student_out.float() - teacher_out.float()
    per_token = diff.pow(2).sum(-1)
    if normalize == "hidden":
        per_token = per_token / diff.shape[-1]
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    return per_token.sum()


# --------------------------------------------------------------------------------------------
# Chunked lm_head losses
# --------------------------------------------------------------------------------------------


def compute_dtype_for(x: Tensor) -> torch.dtype:
    """The matmul dtype of the lm_head: the autocast dtype when autocast is on, else ``x``'s dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# A chunk loss gets the student's logits [C, V] in the matmul dtype and the chunk's [start, end)
# rows; it returns (summed fp32 loss, d loss / d logits [C, V] or None).
ChunkLoss = Callable[[Tensor, int, int, bool], tuple[Tensor, Tensor | None]]


_fp32_accumulating_addmm: bool | None = None  # unknown until the first CUDA call


def add_product_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` and ``a``, ``b`` in fp32 or a lower precision.

    Low-precision inputs on CUDA go through one GEMM that adds into ``acc`` in fp32 (``addmm`` with
    ``out_dtype``, in torch builds whose CUDA kernel accepts an fp32 ``self``). The fallback rounds the
    product to the input dtype, upcasts and adds it: at a 152k vocabulary that is ~4.7 GB of extra
    memory traffic per lm_head chunk, and a rounding of each chunk's gradient to bf16.
    """
    global _fp32_accumulating_addmm
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _fp32_accumulating_addmm is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _fp32_accumulating_addmm = True
            return
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            if _fp32_accumulating_addmm:  # it worked before: this is a real error
                raise
            _fp32_accumulating_addmm = False
            logger.info("addmm with an fp32 accumulator is not available here (%s); using a bf16 product", exc)
    acc += (a @ b).to(acc.dtype)


def _head_loss_pass(
    h: Tensor,
    w: Tensor,
    chunk_loss: ChunkLoss,
    chunk_size: int,
    dtype: torch.dtype,
    need_grad_h: bool,
    need_grad_w: bool,
):
    """One pass over the rows of ``h`` [N, H]: summed loss, and the gradients wrt ``h`` and ``w`` if asked."""
    n = h.shape[0]
    w_c = w.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_grad_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad_w else None
    want_grad = need_grad_h or need_grad_w
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            hc = h[s:e].to(dtype)
            logits = hc @ w_c.t()
            loss, grad_logits = chunk_loss(logits, s, e, want_grad)
            total += loss
            if want_grad:
                g = grad_logits.to(dtype)
                if grad_h is not None:
                    grad_h[s:e] = (g @ w_c).to(h.dtype)
                if grad_w is not None:
                    add_product_fp32_(grad_w, g.t(), hc)
            del logits, grad_logits
    return total, grad_h, grad_w


class _FusedHeadLoss(torch.autograd.Function):
    """Loss of ``h @ w.T`` computed chunk by chunk; gradients are formed in forward (see module doc)."""

    @staticmethod
    def forward(ctx, h, w, chunk_loss, chunk_size, dtype):
        total, grad_h, grad_w = _head_loss_pass(
            h, w, chunk_loss, chunk_size, dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def fused_head_loss(h: Tensor, w: Tensor, chunk_loss: ChunkLoss, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Summed ``chunk_loss`` of the logits ``h @ w.T`` ([N, H] x [V, H]), chunked over rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = compute_dtype_for(h)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        return _FusedHeadLoss.apply(h, w, chunk_loss, chunk_size, dtype)
    return _head_loss_pass(h.detach(), w.detach(), chunk_loss, chunk_size, dtype, False, False)[0]


def _to_log_probs_(z: Tensor) -> Tensor:
    """``z`` [C, V] fp32 -> log softmax over V, in place.

    Spelled out as amax / subtract / exp / sum (not ``torch.logsumexp``, whose decomposition clamps
    infinite maxima): that is the pattern inductor turns into one online-softmax pass on CUDA.
    """
    z.sub_(z.amax(dim=-1, keepdim=True))
    return z.sub_(z.exp().sum(dim=-1, keepdim=True).log_())


def kl_terms(z_s: Tensor, z_t: Tensor, tau: float, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """One chunk's ``τ² Σ KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` and its gradient wrt ``z_s`` (in z_s's dtype).

    ``z_s``, ``z_t``: [C, V] logits in any float dtype; the arithmetic is fp32. Eager, the in-place
    ops hold three fp32 [C, V] buffers (the two upcasts and p) and one temporary; compiled, inductor
    fuses it into a few passes over the low-precision logits (Stage 2 of a 152k-vocabulary model: KL
    phase 80 -> 37 ms; 29 ms with the head gradient accumulated by `add_product_fp32_`).
    """
    grad_dtype = z_s.dtype
    # Always copies: the inputs are never modified (inductor's CPU backend in torch 2.11 fails on a
    # compiled function that mutates its inputs, which .float() of fp32 logits would make it do).
    z_s, z_t = z_s.to(torch.float32, copy=True), z_t.to(torch.float32, copy=True)
    if tau != 1.0:
        z_s.mul_(1.0 / tau)
        z_t.mul_(1.0 / tau)
    log_q = _to_log_probs_(z_s)  # student
    log_p = _to_log_probs_(z_t)  # teacher
    p = log_p.exp()
    diff = log_p.sub_(log_q)  # log p - log q
    grad = None
    if want_grad:  # d(τ² KL)/dz_s = τ (q − p)
        grad = log_q.exp_().sub_(p)
        if tau != 1.0:
            grad.mul_(tau)
        grad = grad.to(grad_dtype)
    loss = diff.mul_(p).sum() * (tau * tau)
    return loss, grad


_compiled_kl_terms = None
_compile_failed = False


def _compiled_or_eager_kl_terms(*args):
    """The compiled `kl_terms`; if compiling fails (no working inductor/Triton), warn once and run eager."""
    global _compiled_kl_terms, _compile_failed
    if not _compile_failed:
        try:
            if _compiled_kl_terms is None:
                _compiled_kl_terms = torch.compile(kl_terms)
            return _compiled_kl_terms(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # an inductor/Triton failure: the eager path computes the same thing
            _compile_failed = True
            logger.warning(
                "torch.compile of the KL chunk loss failed (%s: %s); using the eager path "
                "(same result, slower). Set HYBRID_DISTILL_COMPILE_LOSS=0 to skip the attempt.",
                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
            )
    return kl_terms(*args)


def _kl_terms_for(x: Tensor, compile: bool | None):
    """`kl_terms`, compiled when asked (or, for None, on CUDA unless HYBRID_DISTILL_COMPILE_LOSS=0)."""
    if compile is None:
        compile = x.is_cuda and os.environ.get("HYBRID_DISTILL_COMPILE_LOSS", "1") != "0"
    return _compiled_or_eager_kl_terms if compile else kl_terms


def chunked_kl_div(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    tau: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compile: bool | None = None,
) -> Tensor:
    """``Σ_t τ² KL(softmax(z_teacher,t/τ) ‖ softmax(z_student,t/τ))`` over the N rows (paper Eq. 5 × T).

    ``*_hidden`` are the final (normed) hidden states of the selected tokens, [N, H_s] and [N, H_t];
    ``*_head`` the lm_head weights [V, H]. Logits are formed one chunk of rows at a time, in fp32
    after a matmul in the autocast (or input) dtype. Gradients flow to the student's hidden states
    and head weight only. ``compile``: run each chunk's softmax/KL arithmetic through
    ``torch.compile`` (None = on CUDA only, unless ``HYBRID_DISTILL_COMPILE_LOSS=0``); see `kl_terms`.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student has {student_hidden.shape[0]} token rows, teacher {teacher_hidden.shape[0]}")
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(f"vocabulary sizes differ: student {student_head.shape[0]}, teacher {teacher_head.shape[0]}")
    t_hidden = teacher_hidden.detach()
    t_head = teacher_head.detach()
    t_dtype = compute_dtype_for(t_hidden)
    t_head_c = t_head.to(t_dtype)
    terms = _kl_terms_for(student_hidden, compile)

    def kl_chunk(z_s: Tensor, s: int, e: int, want_grad: bool):
        with torch.no_grad():
            z_t = t_hidden[s:e].to(t_dtype) @ t_head_c.t()
            return terms(z_s, z_t, tau, want_grad)

    return fused_head_loss(student_hidden, student_head, kl_chunk, chunk_size)


def chunked_cross_entropy(hidden: Tensor, head: Tensor, labels: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """``Σ_t −log softmax(h_t W^T)[label_t]`` over the N rows of ``hidden`` [N, H], chunked over rows."""
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {hidden.shape[0]} hidden rows")
    labels = labels.to(hidden.device)

    def ce_chunk(z: Tensor, s: int, e: int, want_grad: bool):
        with torch.no_grad():
            lab = labels[s:e]
            rows = torch.arange(e - s, device=z.device)
            z = z.float()
            z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # log-probs
            loss = -z[rows, lab].sum()
            grad = None
            if want_grad:  # softmax − one-hot
                grad = z.exp_()
                grad[rows, lab] -= 1.0
        return loss, grad

    return fused_head_loss(hidden, head, ce_chunk, chunk_size)


# --------------------------------------------------------------------------------------------
# Naive references (small vocabularies; tests and sanity checks)
# --------------------------------------------------------------------------------------------


def kl_div_reference(
    student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Mean over valid tokens of ``τ² KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` from full [B, T, V] logits."""
    log_q = torch.log_softmax(student_logits.float() / tau, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float() / tau, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1) * tau * tau
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum()
