"""Where does one decode step go? Teacher vs a GDN hybrid at long context (GPU).

Prefills `batch` x `context` random tokens, then for a few greedy decode steps reports: wall time per
step (host clock after synchronize), GPU kernel time per step (torch.profiler, summed over kernels) and
the kernel time by category (`CATEGORIES`: attention, fla, inductor-fused, KV-cache copies, matmuls, other). Wall >> kernel
time means the step is bound by host-side (Python / launch) overhead, not by the GPU.
    python benchmarks/profile_decode.py --context 32768 --batch 8 --ratio 0.25

``--static`` profiles `StaticDecoder` instead of HF's eager loop: the wall time is a CUDA-graph replay
per step and the kernels are those of the (``--compile``d) step function called without the graph.
``--linear-kernels torch fla`` profiles the hybrid once per linear-kernel backend, and
``--fuse-projections on off`` both models with and without the step's one-GEMM input projections.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from hybrid_distill.modeling import CACHE_ARG, output_cache
from bench_inference import qwen25_teacher, uniform_hybrid

# Kernels are classified by name, first match wins. `decode_attention`'s q·kᵀ and p·v are GEMMs and land
# in "matmul" (with the projections and MLPs); its softmax is an inductor kernel with a max reduction
# ("amax") when the step is compiled. Other inductor kernels (norms, gates, recurrences, residuals, Stage 2's
# KL, whose online-softmax kernels have "softmax" in their names) have names like
# "triton_poi_fused__to_copy_add_..." and are neither attention nor cache copies.
CATEGORIES = (
    ("attn softmax (inductor)", ("triton_red_fused_amax", "triton_per_fused_amax", "_amax_")),
    ("inductor fused", ("triton_poi_fused", "triton_red_fused", "triton_per_fused")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("fla chunk", ("chunk", "tilelang", "l2norm", "solve_tril", "wy_fast")),  # training / prefill
    ("fla recurrent", ("fused_recurrent", "gated_delta")),
    ("kv cat/copy", ("cat", "copy", "elementwise_kernel_with_index", "Memcpy")),
    ("matmul", ("gemm", "gemv", "sm90", "cutlass", "cublas", "nvjet")),
)


def category(name: str) -> str:
    """The `CATEGORIES` entry of a CUDA kernel's name (case-insensitive substring match), else "other"."""
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


@torch.no_grad()
def profile(model, context: int, batch: int, steps: int) -> dict:
    ids = torch.randint(3, 1000, (batch, context), device="cuda")
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    del out
    walls = []
    for _ in range(steps + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(token, use_cache=True, **{CACHE_ARG: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t) * 1e3)
    walls = walls[3:]

    def one_step():
        nonlocal out, token
        out = model(token, use_cache=True, **{CACHE_ARG: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)

    stats = _kernel_stats(one_step, steps)
    del cache, out
    torch.cuda.empty_cache()
    return {"wall_ms_per_step": statistics.median(walls), **stats}


def _kernel_stats(step_fn, steps: int, top_n: int = 12) -> dict:
    """Kernel time by category, kernels per step and the top kernels of ``steps`` calls of ``step_fn``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step_fn()
        torch.cuda.synchronize()
    by_cat: dict[str, float] = {}
    top = []
    kernels = 0
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", None)
        if dev is None:
            dev = getattr(evt, "self_cuda_time_total", 0)
        if not dev or evt.device_type != torch.autograd.DeviceType.CUDA or getattr(evt, "is_user_annotation", False):
            continue  # not a kernel (user annotations such as "Optimizer.step#AdamW.step" span kernels)
        kernels += evt.count
        by_cat[category(evt.key)] = by_cat.get(category(evt.key), 0.0) + dev / 1e3 / steps
        top.append((dev / 1e3 / steps, evt.key[:90], evt.count // steps))
    top.sort(reverse=True)
    return {
        "kernel_ms_per_step": sum(by_cat.values()),
        "kernels_per_step": kernels / steps,
        "kernel_ms_by_category": {k: round(v, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"ms": round(ms, 3), "name": n, "calls": c} for ms, n, c in top[:top_n]],
    }


@torch.no_grad()
def profile_static(
    model, context: int, batch: int, steps: int, compile: bool, linear_kernels: str | None, fuse_projections: bool = True,
    compile_mode: str | None = None,
) -> dict:
    from hybrid_distill.modeling.static_decode import StaticDecoder

    dec = StaticDecoder(
        model, batch, context + 4 * steps + 16, compile=compile, linear_kernels=linear_kernels,
        fuse_projections=fuse_projections, compile_mode=compile_mode,
    )
    dec.prefill(torch.randint(3, 1000, (batch, context), device="cuda"), rows_per_forward=1)
    for _ in range(3):  # two warm-up steps, then the capture
        dec.step()
    walls = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dec.step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t) * 1e3)
    stats = _kernel_stats(lambda: dec.step(graph=False), steps)  # the step function itself: its kernels are visible
    del dec
    if compile:
        torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"wall_ms_per_step": statistics.median(walls), **stats}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--static", action="store_true", help="profile StaticDecoder (CUDA-graph step) instead of HF's loop")
    parser.add_argument("--compile", action="store_true", help="with --static: torch.compile the step")
    parser.add_argument("--compile-mode", default=None, help="with --compile: torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--linear-kernels", nargs="+", default=[None], help="with --static: hybrid runs per backend (torch, fla, auto)")
    parser.add_argument(
        "--fuse-projections", nargs="+", choices=["on", "off"], default=["on"],
        help="with --static: StaticDecoder(fuse_projections=...) settings to profile, each for teacher and hybrid",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    teacher = qwen25_teacher()
    hybrid_name, hybrid = uniform_hybrid(teacher, args.ratio)
    fuse_settings = args.fuse_projections if args.static else ["on"]
    runs = []
    for fuse in fuse_settings:
        suffix = ", unfused projections" if fuse == "off" else ""
        runs.append(("teacher" + suffix, teacher, None, fuse == "on"))
        runs += [
            (hybrid_name + (f", {lk} kernels" if lk else "") + suffix, hybrid, lk, fuse == "on")
            for lk in (args.linear_kernels if args.static else [None])
        ]
    results = {}
    for name, model, lk, fuse in runs:
        if args.static:
            results[name] = profile_static(
                model, args.context, args.batch, args.steps, args.compile, lk, fuse, compile_mode=args.compile_mode
            )
        else:
            profile(model, 256, args.batch, 2)  # warm-up
            results[name] = profile(model, args.context, args.batch, args.steps)
        print(name, json.dumps(results[name], indent=1), flush=True)
    print(f"\n| model (ctx {args.context}, batch {args.batch}) | wall ms/step | GPU kernel ms/step | kernels/step | " + " | ".join(c for c, _ in CATEGORIES) + " | other |")
    print("|---|---:|---:|---:|" + "---:|" * (len(CATEGORIES) + 1))
    for name, r in results.items():
        cats = r["kernel_ms_by_category"]
        print(f"| {name} | {r['wall_ms_per_step']:.2f} | {r['kernel_ms_per_step']:.2f} | {r['kernels_per_step']:.0f} | "
              + " | ".join(f"{cats.get(c, 0.0):.2f}" for c, _ in CATEGORIES) + f" | {cats.get('other', 0.0):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
