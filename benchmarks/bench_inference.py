"""Prefill latency, decode throughput and cache size: teacher vs hybrids (0/12.5/25/50% softmax).

Qwen2.5-1.5B-shaped model with random weights (speed does not depend on the values), bf16.
    python benchmarks/bench_inference.py --contexts 1024,4096,8192,16384,32768 --batches 1,8 --markdown FILE

``--decode static`` (default) decodes through `StaticDecoder` (preallocated cache, CUDA-graph step),
``--decode hf`` through the models' own HF caches in eager mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch._dynamo
from transformers import Qwen2Config, Qwen2ForCausalLM

from common import provenance, publish

from hybrid_distill.dtypes import cast_model
from hybrid_distill.evaluation.efficiency import fit_step_cost, measure, plot_efficiency, results_markdown
from hybrid_distill.surgery import build_student, mixers_from_softmax_layers

QWEN25_15B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)


def uniform_layers(num_layers: int, k: int) -> list[int]:
    """k evenly spaced layers (the last of each group), as a uniform interleave would place them."""
    if k == 0:
        return []
    step = num_layers / k
    return sorted({min(num_layers - 1, int(round((i + 1) * step)) - 1) for i in range(k)})


def qwen25_teacher() -> Qwen2ForCausalLM:
    """The Qwen2.5-1.5B-shaped teacher with random weights, bf16, on CUDA."""
    config = Qwen2Config(**QWEN25_15B)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        return cast_model(Qwen2ForCausalLM(config), torch.bfloat16).eval()


def uniform_hybrid(teacher, ratio: float):
    """(name, GDN hybrid with round(ratio * L) uniformly placed softmax layers)."""
    n = teacher.config.num_hidden_layers
    k = round(ratio * n)
    student = build_student(teacher, mixers_from_softmax_layers(n, uniform_layers(n, k), "gdn")).eval()
    return f"hybrid {ratio:.1%} ({k} softmax)", student


def _gdn_step_kernel(args) -> str:
    kernels = args.linear_kernels or "fla"  # the models' own backend, "auto": fla on CUDA
    return "the compiled PyTorch recurrence" if kernels == "torch" else "fla's fused recurrent kernel"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", default="1024,4096,8192,16384,32768")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--ratios", default="0,0.125,0.25,0.5")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--decode", choices=["static", "hf"], default="static")
    parser.add_argument("--prefill-rows", type=int, default=None, help="prompt rows per prefill forward (bounds memory)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the static decode step")
    parser.add_argument(
        "--compile-mode", default=None,
        help="torch.compile mode of the step with --compile, e.g. max-autotune-no-cudagraphs (default: inductor's default)",
    )
    parser.add_argument(
        "--linear-kernels", choices=["torch", "fla", "auto"], default=None,
        help="GDN kernels inside the static step (default: the model's backend, fla on CUDA)",
    )
    parser.add_argument(
        "--no-fuse-projections", action="store_true",
        help="StaticDecoder(fuse_projections=False): one GEMM per input projection in the step",
    )
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    ratios = [float(x) for x in args.ratios.split(",")]

    teacher = qwen25_teacher()
    models = {"teacher": teacher, **dict(uniform_hybrid(teacher, r) for r in ratios)}
    if not args.compile:  # warm up kernels (fla autotuning / compilation) at every batch size before timing
        for model in models.values():
            for b in batches:
                measure(model, "warmup", 256, b, decode_steps=2, warmup_steps=3, decode=args.decode)
    gdn_model = next((m for name, m in models.items() if name != "teacher"), None)
    results = []
    for ctx in contexts:
        for b in batches:
            if gdn_model is not None:  # fla tunes its chunk kernels per new length: keep that out of the timings
                rows = min(b, args.prefill_rows or b)
                with torch.no_grad():
                    gdn_model(torch.randint(3, 1000, (rows, ctx), device="cuda"), use_cache=True, logits_to_keep=1)
                torch.cuda.empty_cache()
            for name, model in models.items():
                t0 = time.perf_counter()
                r = measure(model, name, ctx, b, decode_steps=args.decode_steps, decode=args.decode,
                            prefill_rows=args.prefill_rows, compile=args.compile, linear_kernels=args.linear_kernels,
                            fuse_projections=not args.no_fuse_projections, compile_mode=args.compile_mode)
                results.append(r)
                print(json.dumps(r.to_dict()), flush=True)
                print(f"  ({name}, {ctx} x {b}: {time.perf_counter() - t0:.0f} s with compile and prefill)", file=sys.stderr, flush=True)
    table = results_markdown(results, baseline="teacher")
    fits = fit_step_cost(results)
    if fits:
        table += "\nStep time as a fixed cost plus the min read at one bandwidth (`fit_step_cost`):\n" + "".join(
            f"- {fit.describe()}\n" for fit in fits
        )
    header = (
        "### Inference efficiency: Qwen2.5-1.5B-shaped teacher vs GDN hybrids (uniformly placed softmax layers)\n\n"
        f"- {provenance()}\n"
        f"- command: `python benchmarks/bench_inference.py --contexts {args.contexts} --batches {args.batches} "
        f"--ratios {args.ratios} --decode {args.decode}" + (f" --prefill-rows {args.prefill_rows}" if args.prefill_rows else "")
        + (" --compile" if args.compile else "")
        + (f" --compile-mode {args.compile_mode}" if args.compile_mode else "")
        + (f" --linear-kernels {args.linear_kernels}" if args.linear_kernels else "")
        + (" --no-fuse-projections" if args.no_fuse_projections else "") + "`\n"
        + (
            "- prefill: the prompt through the model's forward (`logits_to_keep=1`) and its cache copied into preallocated "
            f"buffers; decode: mean step time over {args.decode_steps} greedy steps of `StaticDecoder` (static KV buffers for "
            f"softmax layers, {_gdn_step_kernel(args)} for GDN layers, one CUDA graph per step, same code for teacher and "
            "hybrids); cache = bytes of the preallocated buffers.\n\n"
            if args.decode == "static"
            else "- prefill: one forward over the prompt with `logits_to_keep=1`; decode: median per-step time of "
            f"{args.decode_steps} greedy single-token steps through the model's cache in eager mode (HF `DynamicLayer` KV "
            "cache for softmax layers, fla fused recurrent kernel for GDN layers); cache = bytes held after decoding.\n\n"
        )
        + "- min read = the least bytes a step must read at this context (weights, visible keys/values, linear states "
        "read and written), read TB/s = that per step time; bandwidth-bound speed-up = the teacher's min read over the "
        "model's, what the speed-up would be if both steps ran at the same bandwidth.\n\n"
    )
    publish(header + table, args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=1)
    if args.plot:
        plot_efficiency(results, args.plot, batch=max(batches), baseline="teacher")


if __name__ == "__main__":
    main()
