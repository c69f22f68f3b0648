"""Where does a prefill go? Wall time and the top ops (CPU and CUDA) of one prefill, per model (GPU).

    python benchmarks/profile_prefill.py --context 2048 --ratios 0,0.125
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_inference import qwen25_teacher, uniform_hybrid
from torch.profiler import ProfilerActivity, profile


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ratios", default="0,0.125")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    teacher = qwen25_teacher()
    ids = torch.randint(3, 1000, (args.batch, args.context), device="cuda")
    for r in (float(x) for x in args.ratios.split(",")):
        name, model = uniform_hybrid(teacher, r)
        with torch.no_grad():
            walls = []
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - t)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(ids, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
        print(f"\n## {name}: prefill wall s {[round(w, 3) for w in walls]}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
