"""Forward+backward throughput of one GDN and one GLA mixer next to the teacher's SDPA attention layer.

Shape: a Qwen2.5-1.5B-like layer (hidden 1536, 12 query heads, 2 KV heads, head_dim 128), bf16.
Run on a GPU with fla installed:  python benchmarks/bench_mixers.py --seq 4096 --batch 1 [--markdown FILE]
Where a layer's time goes (kernel vs launch time, top kernels, CPU profile): benchmarks/explore_gdn.py.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import provenance, publish
from transformers import Qwen2Config, Qwen2ForCausalLM

from hybrid_distill.surgery import build_student


def make_layers(device, dtype):
    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=1,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    teacher = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    layers = {"softmax (SDPA)": (teacher, teacher.model.layers[0].self_attn)}
    for mixer in ("gdn", "gla"):
        student = build_student(teacher, [mixer])
        layers[mixer] = (student, student.model.layers[0].self_attn)
    return teacher, layers


def time_fwd_bwd(module, x, position_embeddings, iters: int, warmup: int) -> float:
    """Median milliseconds of forward + backward (events around each iteration)."""
    times = []
    for i in range(warmup + iters):
        x.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out, _ = module(x, attention_mask=None, position_embeddings=position_embeddings)
        out.float().sum().backward()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--markdown", help="append a results table to this Markdown file")
    args = parser.parse_args()
    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    teacher, layers = make_layers(device, dtype)
    x = torch.randn(args.batch, args.seq, 1536, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(args.seq, device=device)[None].expand(args.batch, -1)
    position_embeddings = teacher.model.rotary_emb(x, position_ids=pos)
    rows = []
    for name, (_, module) in layers.items():
        torch.cuda.reset_peak_memory_stats()
        ms = time_fwd_bwd(module, x, position_embeddings, args.iters, args.warmup)
        peak = torch.cuda.max_memory_allocated() / 2**30
        tokens = args.batch * args.seq
        rows.append((name, ms, tokens / ms * 1e3, peak))
    header = (
        f"### Mixer forward+backward, Qwen2.5-1.5B-like layer (hidden 1536, 12 heads / 2 KV, head_dim 128), "
        f"B={args.batch}, T={args.seq}, bf16\n\n"
        f"- {provenance()}\n"
        f"- command: `python benchmarks/bench_mixers.py --seq {args.seq} --batch {args.batch}`\n\n"
        "| mixer | fwd+bwd ms (median) | tokens/s | peak GiB |\n|---|---:|---:|---:|\n"
    )
    table = header + "".join(f"| {n} | {ms:.2f} | {tps:,.0f} | {peak:.2f} |\n" for n, ms, tps, peak in rows)
    publish(table, args.markdown)


if __name__ == "__main__":
    main()
