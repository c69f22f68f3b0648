"""Distillation throughput at the reproduction teacher's shape, with the project's own torch GDN kernels and with
fla's, to decide whether GPU runs at this size need the fla kit (38 MiB of every GPU command's 64 MiB).

Teacher: a Llama with random weights at the fixed reproduction teacher's shape (16 layers, hidden 256, 4 heads of
64 / 2 KV heads, MLP 512, vocab 4096, tied embeddings). Student: all-GDN. For each kernel backend, Stage 1 and
Stage 2 through the real trainer (`hybrid_distill.distill.distill`), tokens/s as the median over the steps after
the warm-up ones.

    python benchmarks/bench_small_shape.py --backends torch fla --seq 2048 --batch 16 --markdown results.md
    python benchmarks/bench_small_shape.py --tiny --backends torch     # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from common import provenance, publish
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.distill import DistillConfig, TensorTokenDataset, distill, read_metrics
from hybrid_distill.surgery import build_student


def teacher_config(tiny: bool) -> LlamaConfig:
    sizes = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512) if tiny else
             dict(hidden_size=256, intermediate_size=512, num_hidden_layers=16, vocab_size=4096))
    config = LlamaConfig(**sizes, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return config


def run(stage: int, backend: str, seq: int, batch: int, steps: int, warmup: int, tiny: bool, compile_layers: str) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        teacher = LlamaForCausalLM(teacher_config(tiny)).eval()
    student = build_student(teacher, ["gdn"] * teacher.config.num_hidden_layers, {"kernel_backend": backend})
    tokens = torch.randint(0, teacher.config.vocab_size, (batch * (steps + 1), seq))
    data = TensorTokenDataset(tokens, heldout_sequences=batch)
    config = DistillConfig(stage=stage, target_tokens=steps * batch * seq, seq_len=seq, global_batch_size=batch,
                           progress=False, save_final_model=False, eval_max_batches=0, save_every_minutes=0,
                           compile_layers=compile_layers if stage != 1 else "off")
    with tempfile.TemporaryDirectory() as tmp:
        distill(student, teacher, data, config, tmp)
        rows = read_metrics(tmp)
    speeds = [r["tokens_per_s"] for r in rows[warmup:] if r.get("tokens_per_s")]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {"stage": stage, "backend": backend, "tokens_per_s": statistics.median(speeds) if speeds else None,
            "first_step_s": rows[0]["elapsed"] if rows else None, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["torch", "fla"], choices=["torch", "fla"])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median (compilation, autotuning)")
    parser.add_argument("--compile-layers", default="off", choices=["off", "teacher", "all"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    if args.tiny:
        args.seq, args.batch, args.steps, args.warmup = 64, 2, 4, 1
    results = [run(stage, backend, args.seq, args.batch, args.steps, args.warmup, args.tiny, args.compile_layers)
               for backend in args.backends for stage in args.stages]
    lines = [f"### Distillation at the reproduction teacher's shape ({provenance()})", "",
             f"`python benchmarks/bench_small_shape.py --backends {' '.join(args.backends)} --seq {args.seq} "
             f"--batch {args.batch} --steps {args.steps} --compile-layers {args.compile_layers}`", "",
             "| stage | GDN kernels | tokens/s (median) | first step incl. compile/autotune (s) | peak GiB |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "–"
        first = f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "–"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "–"
        lines.append(f"| {r['stage']} | {r['backend']} | {tps} | {first} | {peak} |")
    publish("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
