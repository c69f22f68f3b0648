"""Where do the student's forward and backward go in Stage 2, eager vs compiled decoder layers? (GPU)

Builds the Stage-2 benchmark's all-GDN student (Qwen2.5-1.5B shape, fp32 master weights, bf16 autocast)
and, per mode, times its forward and backward on one micro-batch (CUDA events, median) and profiles
them with torch.profiler: kernel time by category, kernel count, top kernels, and dynamo's graph
and graph-break counts. Modes: ``eager``; ``layers`` (`compile_decoder_layers`, as
``compile_layers: all`` does to the student). ``--host`` adds where the host's time goes when the
GPU waits for it: the time until forward / backward return to Python without a sync, and the
functions with the most cumulative host time under cProfile.

    python benchmarks/profile_stage2.py --seq 4096 --batch 2 --modes eager layers
    python benchmarks/profile_stage2.py --tiny          # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch
from bench_stage2 import Timer, device_and_models
from profile_decode import _kernel_stats

from hybrid_distill.distill.compiling import compile_decoder_layers


def forward(student, ids, autocast) -> torch.Tensor:
    with autocast:
        return student.model(input_ids=ids, use_cache=False).last_hidden_state


def backward(hidden: torch.Tensor) -> None:
    hidden.float().square().mean().backward()


def measure(student, ids, autocast, device, iters: int, warmup: int) -> dict:
    """Median forward / backward ms of the student on ``ids`` (grads cleared between iterations)."""
    timer = Timer(device)
    runs = []
    for i in range(warmup + iters):
        timer.start()
        hidden = forward(student, ids, autocast)
        timer.mark("forward")
        backward(hidden)
        timer.mark("backward")
        student.zero_grad(set_to_none=True)
        if i >= warmup:
            runs.append(timer.phases_ms())
    return {name: round(statistics.median(r[name] for r in runs), 2) for name in runs[0]}


def host_profile(student, ids, autocast, device, top: int) -> dict:
    """Host ms until forward / backward return (no sync in between), and cProfile's top functions."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    hidden = forward(student, ids, autocast)
    t1 = time.perf_counter()
    backward(hidden)
    t2 = time.perf_counter()
    sync()
    t3 = time.perf_counter()
    student.zero_grad(set_to_none=True)
    profiler = cProfile.Profile()
    profiler.enable()
    backward(forward(student, ids, autocast))
    sync()
    profiler.disable()
    student.zero_grad(set_to_none=True)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(3 * top)
    stats.sort_stats("tottime").print_stats(top)
    print(text.getvalue(), flush=True)
    return {
        "host_forward_ms": round((t1 - t0) * 1e3, 2),
        "host_backward_ms": round((t2 - t1) * 1e3, 2),
        "wall_until_synced_ms": round((t3 - t0) * 1e3, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["eager", "layers"], choices=["eager", "layers"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--host", action="store_true", help="also profile the host side (see module doc)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test of this script)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    device, teacher, student = device_and_models(parser, args)
    del teacher
    ids = torch.randint(0, student.config.vocab_size, (args.batch, args.seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    results = {}
    for mode in args.modes:  # "layers" compiles in place, so it comes after "eager"
        from torch._dynamo.utils import counters

        counters.clear()
        if mode == "layers":
            compile_decoder_layers(student)
        times = measure(student, ids, autocast, device, args.iters, args.warmup)
        stats = {"kernel_ms_per_step": None}
        if device.type == "cuda":
            def step():
                backward(forward(student, ids, autocast))
                student.zero_grad(set_to_none=True)

            stats = _kernel_stats(step, 2, top_n=args.top)
        if args.host:
            stats.update(host_profile(student, ids, autocast, device, args.top))
        breaks = {k.split("\n")[0][:120]: v for k, v in counters["graph_break"].items()}
        results[mode] = {
            **times,
            **stats,
            "graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": breaks,
        }
        print(f"## {mode}\n{json.dumps(results[mode], indent=1)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seq": args.seq, "batch": args.batch, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
