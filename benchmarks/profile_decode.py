"""Where does one decode step go? Teacher vs a GDN hybrid at long context (GPU).

Prefills `batch` x `context` random tokens, then for a few greedy decode steps reports: wall time per
step (host clock after synchronize), GPU kernel time per step (torch.profiler, summed over kernels) and
the kernel time by category (attention, KV-cache copies, fla recurrent, matmuls, other). Wall >> kernel
time means the step is bound by host-side (Python / launch) overhead, not by the GPU.
    python benchmarks/profile_decode.py --context 32768 --batch 8 --ratio 0.25
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from hybrid_distill.modeling import CACHE_ARG, output_cache
from bench_inference import qwen25_teacher, uniform_hybrid

CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("fla recurrent", ("fused_recurrent", "gated_delta")),
    ("kv cat/copy", ("cat", "copy", "elementwise_kernel_with_index", "Memcpy")),
    ("matmul", ("gemm", "gemv", "sm90", "cutlass", "cublas", "nvjet")),
)


def category(name: str) -> str:
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
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            out = model(token, use_cache=True, **{CACHE_ARG: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    by_cat: dict[str, float] = {}
    top = []
    kernels = 0
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", None)
        if dev is None:
            dev = getattr(evt, "self_cuda_time_total", 0)
        if not dev or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kernels += evt.count
        by_cat[category(evt.key)] = by_cat.get(category(evt.key), 0.0) + dev / 1e3 / steps
        top.append((dev / 1e3 / steps, evt.key[:90], evt.count // steps))
    top.sort(reverse=True)
    del cache, out
    torch.cuda.empty_cache()
    return {
        "wall_ms_per_step": statistics.median(walls),
        "kernel_ms_per_step": sum(by_cat.values()),
        "kernels_per_step": kernels / steps,
        "kernel_ms_by_category": {k: round(v, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"ms": round(ms, 3), "name": n, "calls": c} for ms, n, c in top[:8]],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    teacher = qwen25_teacher()
    results = {}
    for name, model in (("teacher", teacher), uniform_hybrid(teacher, args.ratio)):
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
