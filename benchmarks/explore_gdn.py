"""Issue 3 exploration: where one GDN mixer's forward+backward time goes (B=1, T=4096, Qwen2.5-1.5B layer).

Times variants side by side: the mixer eager and compiled, fla's kernel alone, the projections alone,
fla's own GatedDeltaNet layer and SDPA; for each, GPU kernel time (torch.profiler) vs wall time. A layer whose
wall time is far above its kernel time is bound by the CPU launching kernels (benchmarks/RESULTS.md, issue 3).

    python benchmarks/explore_gdn.py --top 14             # table + each variant's top kernels
    python benchmarks/explore_gdn.py --cprofile fla_kernel # where the CPU time of one variant goes
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_mixers import make_layers


def timed(fn, iters=20, warmup=5):
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def busy(fn, top):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]  # kernels, not their CPU callers
    total = sum(e.self_device_time_total for e in events) / 1e3
    n = sum(e.count for e in events)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top) if top else ""
    return total, n, table


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--top", type=int, default=0)
    p.add_argument("--only", default="")
    p.add_argument("--cprofile", default="", help="cProfile this variant's CPU side (20 calls) instead")
    args = p.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    teacher, layers = make_layers(dev, dt)
    T = args.seq
    x = torch.randn(1, T, 1536, device=dev, dtype=dt, requires_grad=True)
    pos = torch.arange(T, device=dev)[None]
    pe = teacher.model.rotary_emb(x, position_ids=pos)

    def layer_step(module):
        def fn():
            x.grad = None
            out, _ = module(x, attention_mask=None, position_embeddings=pe)
            out.float().sum().backward()
        return fn

    variants = {}
    variants["sdpa"] = layer_step(layers["softmax (SDPA)"][1])
    gdn = layers["gdn"][1]
    variants["gdn_mixer"] = layer_step(gdn)
    variants["gdn_mixer_compiled"] = layer_step(torch.compile(gdn))

    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    H, D = 12, 128
    q = torch.randn(1, T, H, D, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, T, H, D, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, T, H, D, device=dev, dtype=dt, requires_grad=True)
    g = (-torch.rand(1, T, H, device=dev)).requires_grad_()
    beta = torch.rand(1, T, H, device=dev, dtype=dt).requires_grad_()

    def kernel():
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=D**-0.5, use_qk_l2norm_in_kernel=True)
        o.float().sum().backward()

    variants["fla_kernel"] = kernel

    def kernel_fwd():
        with torch.no_grad():
            chunk_gated_delta_rule(q, k, v, g, beta, scale=D**-0.5, use_qk_l2norm_in_kernel=True)

    variants["fla_kernel_fwd"] = kernel_fwd
    lins = [gdn.q_proj, gdn.k_proj, gdn.v_proj, gdn.g_proj, gdn.a_proj, gdn.b_proj]

    def projections():
        x.grad = None
        outs = [lin(x) for lin in lins]
        o = gdn.o_proj(outs[0])
        (o.float().sum() + sum(t.float().sum() for t in outs[1:])).backward()

    variants["projections"] = projections
    try:
        from fla.layers import GatedDeltaNet

        fl = GatedDeltaNet(hidden_size=1536, expand_v=1, head_dim=128, num_heads=12, mode="chunk",
                           use_short_conv=False).to(dev, dt)

        def fla_layer():
            x.grad = None
            out = fl(x)[0]
            out.float().sum().backward()

        variants["fla_GatedDeltaNet_layer"] = fla_layer
    except Exception as exc:  # noqa: BLE001
        print("fla layer:", type(exc).__name__, exc)

    if args.cprofile:
        import cProfile
        import pstats

        fn = variants[args.cprofile]
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        pstats.Stats(prof).sort_stats("cumtime").print_stats(40)
        return
    only = set(args.only.split(",")) if args.only else None
    print("| variant | wall ms | GPU kernel ms | kernels |\n|---|---:|---:|---:|")
    tables = []
    for name, fn in variants.items():
        if only and name not in only:
            continue
        try:
            ms = timed(fn)
            gpu, n, table = busy(fn, args.top)
            print(f"| {name} | {ms:.2f} | {gpu:.2f} | {n} |", flush=True)
            tables.append((name, table))
        except Exception as exc:  # noqa: BLE001
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:200]} | | |", flush=True)
    for name, table in tables:
        if table:
            print(f"\n## {name}\n{table}")


if __name__ == "__main__":
    main()
