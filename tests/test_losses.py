"""Chunked KL / CE against naive full-logits references (values and gradients), and the Stage-1 loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybrid_distill.distill.losses import (
    alignment_loss_sum,
    chunked_cross_entropy,
    chunked_kl_div,
    kl_div_reference,
    select_tokens,
    shifted_targets,
)

B, T, H, V = 3, 11, 16, 97


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_(True)
    ws = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    ht = torch.randn(B, T, H, generator=g, dtype=dtype)
    wt = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 8:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return hs, ws, ht, wt, mask


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_kl_matches_full_logits(tau, chunk_size, padded):
    hs, ws, ht, wt, mask = _inputs()
    mask = mask if padded else None
    ref = kl_div_reference(hs @ ws.T, ht @ wt.T, tau=tau, mask=mask)
    ref_grads = torch.autograd.grad(ref, (hs, ws))

    n = int(mask.sum()) if mask is not None else B * T
    out = chunked_kl_div(select_tokens(hs, mask), ws, select_tokens(ht, mask), wt, tau=tau, chunk_size=chunk_size) / n
    grads = torch.autograd.grad(out, (hs, ws))

    assert abs(out.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    if padded:  # padded positions get no gradient
        assert grads[0][mask == 0].abs().max() == 0


def test_kl_zero_for_identical_models():
    hs, ws, _, _, mask = _inputs()
    h = select_tokens(hs, mask)
    loss = chunked_kl_div(h, ws, h.detach(), ws.detach(), tau=2.0, chunk_size=5)
    assert loss.item() == 0.0


def test_kl_temperature_scaling_matches_definition():
    hs, ws, ht, wt, _ = _inputs(1)
    tau = 3.0
    zs, zt = (hs @ ws.T).detach(), ht @ wt.T
    p, logq = F.softmax(zt / tau, -1), F.log_softmax(zs / tau, -1)
    direct = (tau**2) * F.kl_div(logq, p, reduction="sum")  # τ² Σ_t KL(p ‖ q)
    out = chunked_kl_div(
        select_tokens(hs, None).detach(), ws.detach(), select_tokens(ht, None), wt, tau=tau, chunk_size=6
    )
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)


def test_chunked_kl_keeps_no_logits_for_backward():
    """Tensors saved for backward are at most the size of the inputs ([N, H] and [V, H]), never [chunk, V]."""
    n, h, v = 64, 8, 1000
    hs = torch.randn(n, h, requires_grad=True)
    ws = torch.randn(v, h, requires_grad=True)
    ht, wt = torch.randn(n, h), torch.randn(v, h)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_kl_div(hs, ws, ht, wt, chunk_size=16)
    loss.backward()
    assert saved and max(saved) <= max(n * h, v * h)
    assert 16 * v > v * h  # a single chunk's logits would have been larger than anything saved


def test_no_grad_path_equals_grad_path():
    hs, ws, ht, wt, mask = _inputs(2)
    args = (select_tokens(hs, mask), ws, select_tokens(ht, mask), wt)
    with_grad = chunked_kl_div(*args, tau=1.5, chunk_size=5)
    with torch.no_grad():
        without = chunked_kl_div(*args, tau=1.5, chunk_size=5)
    assert with_grad.item() == pytest.approx(without.item(), rel=1e-6)


def test_bf16_autocast_close_to_fp32():
    hs, ws, ht, wt, _ = _inputs(3)
    ref = chunked_kl_div(hs.reshape(-1, H), ws, ht.reshape(-1, H), wt, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = chunked_kl_div(hs.reshape(-1, H), ws, ht.reshape(-1, H), wt, chunk_size=8)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=5e-2)
    low.backward()
    assert ws.grad.dtype == ws.dtype and torch.isfinite(ws.grad).all()


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_chunked_cross_entropy_matches_full_logits(chunk_size):
    hs, ws, _, _, mask = _inputs(4)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    valid, labels = shifted_targets(ids, mask)
    logits = hs @ ws.T
    ref = F.cross_entropy(logits[valid], labels[valid], reduction="sum")
    ref_grads = torch.autograd.grad(ref, (hs, ws))
    out = chunked_cross_entropy(select_tokens(hs, valid), ws, labels[valid], chunk_size=chunk_size)
    grads = torch.autograd.grad(out, (hs, ws))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_shifted_targets():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    valid, labels = shifted_targets(ids, mask)
    assert valid.tolist() == [[True, True, False, False], [False, True, True, False]]
    assert labels[0, :3].tolist() == [6, 7, 8]


def test_alignment_loss_normalisation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    expected = ((s - t) ** 2).sum(-1)[mask.bool()].sum()
    torch.testing.assert_close(alignment_loss_sum(s, t, mask), expected)
    torch.testing.assert_close(alignment_loss_sum(s, t, mask, normalize="hidden"), expected / 8)
    torch.testing.assert_close(alignment_loss_sum(s, t), ((s - t) ** 2).sum())
    with pytest.raises(ValueError, match="normalize"):
        alignment_loss_sum(s, t, normalize="tokens")


def test_kl_input_errors():
    hs, ws, ht, wt, _ = _inputs()
    with pytest.raises(ValueError, match="tau"):
        chunked_kl_div(hs[0], ws, ht[0], wt, tau=0.0)
    with pytest.raises(ValueError, match="token rows"):
        chunked_kl_div(hs[0], ws, ht[1, :5], wt)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_kl_div(hs[0], ws, ht[0], wt, chunk_size=0)


def _compiled_vs_eager(device, dtype, n, h, v, chunk_size, tau, autocast):
    g = torch.Generator().manual_seed(4)
    hs = torch.randn(n, h, generator=g).to(device).requires_grad_(True)
    ws = (torch.randn(v, h, generator=g) * 0.3).to(device).requires_grad_(True)
    ht, wt = torch.randn(n, h, generator=g).to(device), (torch.randn(v, h, generator=g) * 0.3).to(device)
    out = {}
    for compile in (False, True):
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            loss = chunked_kl_div(hs, ws, ht, wt, tau=tau, chunk_size=chunk_size, compile=compile)
        grads = torch.autograd.grad(loss, (hs, ws))
        out[compile] = (loss.detach(), grads)
    return out


def test_compiled_kl_chunks_match_eager():
    """torch.compile'd chunk arithmetic (the CUDA default) gives the eager values and gradients; ragged last chunk."""
    out = _compiled_vs_eager("cpu", torch.bfloat16, n=37, h=16, v=301, chunk_size=16, tau=2.5, autocast=False)
    (le, ge), (lc, gc) = out[False], out[True]
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_compiled_kl_chunks_match_eager_cuda_bf16():
    """On CUDA under bf16 autocast (Stage 2's setting), compiled and eager chunk losses agree to bf16 rounding."""
    out = _compiled_vs_eager("cuda", torch.bfloat16, n=3000, h=256, v=50_000, chunk_size=1024, tau=2.0, autocast=True)
    (le, ge), (lc, gc) = out[False], out[True]
    torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-4)
    for a, b in zip(gc, ge):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_kl_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    """A broken torch.compile (no inductor/Triton) costs speed, never the run: same loss, one warning."""
    from hybrid_distill.distill import losses

    def broken_compile(fn):
        def run(*args):
            raise RuntimeError("inductor unavailable")

        return run

    monkeypatch.setattr(losses, "_compiled_kl_terms", None)
    monkeypatch.setattr(losses, "_compile_failed", False)
    monkeypatch.setattr(losses.torch, "compile", broken_compile)
    hs, ws, ht, wt, mask = _inputs(5)
    args = (select_tokens(hs, mask), ws, select_tokens(ht, mask), wt)
    with caplog.at_level("WARNING", logger=losses.__name__):
        out = chunked_kl_div(*args, tau=2.0, chunk_size=4, compile=True)
    ref = chunked_kl_div(*args, tau=2.0, chunk_size=4, compile=False)
    assert out.item() == ref.item()
    assert sum("torch.compile of the KL chunk loss failed" in r.message for r in caplog.records) == 1


def test_add_product_fp32_matches_the_fp32_product():
    """acc += a @ b: exact addmm for fp32 inputs; bf16 inputs off CUDA add a bf16-rounded product."""
    from hybrid_distill.distill.losses import add_product_fp32_

    g = torch.Generator().manual_seed(0)
    acc, a, b = torch.randn(40, 24, generator=g), torch.randn(40, 16, generator=g), torch.randn(16, 24, generator=g)
    out = acc.clone()
    add_product_fp32_(out, a, b)
    torch.testing.assert_close(out, acc + a @ b)
    low = acc.clone()
    add_product_fp32_(low, a.bfloat16(), b.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, acc + (a.bfloat16() @ b.bfloat16()).float())


@pytest.mark.gpu
def test_add_product_fp32_accumulates_in_fp32_on_cuda():
    """On CUDA the lm_head weight gradient of bf16 chunks is accumulated by one fp32-output GEMM."""
    from hybrid_distill.distill import losses

    g = torch.Generator(device="cuda").manual_seed(0)
    acc = torch.randn(4096, 512, device="cuda", generator=g)
    a = torch.randn(4096, 1024, device="cuda", generator=g).bfloat16()
    b = torch.randn(1024, 512, device="cuda", generator=g).bfloat16()
    ref = acc.double() + a.double() @ b.double()
    out = acc.clone()
    losses.add_product_fp32_(out, a, b)
    assert losses._fp32_accumulating_addmm is True
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5  # a bf16-rounded product: ~1.6e-3
