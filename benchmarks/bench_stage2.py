"""Stage-2 (KL distillation) throughput, MFU and peak memory on one GPU, with a per-phase time breakdown.

Teacher: a Qwen2.5-1.5B-shaped Qwen2 with random weights (hidden 1536, intermediate 8960, 28 layers,
12 heads / 2 KV heads, vocab 151936, tied embeddings), bf16. Student: all 28 layers Gated DeltaNet,
fp32 master weights under bf16 autocast, AdamW. One run per micro-batch setting goes through the real
trainer (`hybrid_distill.distill.distill`); the breakdown re-runs the same Stage-2 step phase by phase
with CUDA events.

MFU counts 2·N_teacher + 6·N_student FLOPs per token with N = non-embedding parameters (the tied
embedding / lm_head matrix excluded), against 989 TFLOP/s (H100/H200 dense bf16) and against a bf16
matmul peak measured on the spot. A second column adds the lm_head matmuls (2·V·H teacher,
6·V·H student), which are large at V=152k. Softmax-attention FLOPs of the teacher are not counted.

    python benchmarks/bench_stage2.py --seq 4096 --batch 2 --accum 1 4 --markdown results.md
    python benchmarks/bench_stage2.py --batch 4 --compile-layers all --memory-cap-gib 79.11 --profile 30
        # within an 80 GB H100's memory on a bigger GPU; one step's kernels by category
    python benchmarks/bench_stage2.py --tiny            # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from common import provenance, publish
from transformers import Qwen2Config, Qwen2ForCausalLM

from hybrid_distill.cuda_allocator import expandable_segments_configured, prefer_expandable_segments
from hybrid_distill.distill import DistillConfig, TensorTokenDataset, distill, read_metrics
from hybrid_distill.distill.distributed import forward_hidden
from hybrid_distill.distill.losses import chunked_kl_div
from hybrid_distill.distill.stages import mixer_parameter_names
from hybrid_distill.distill.optim import build_optimizer
from hybrid_distill.surgery import build_student

NOMINAL_PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


def qwen25_15b_config(tiny: bool, layers: int | None = None) -> Qwen2Config:
    """Qwen2.5-1.5B's layer shapes (28 layers, or ``layers`` of them), or a 2-layer 64-wide model with ``tiny``."""
    if tiny:
        sizes = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
        )
    else:
        sizes = dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=layers or 28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
        )
    config = Qwen2Config(**sizes, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1_000_000.0)
    config._attn_implementation = "sdpa"
    return config


def non_embedding_params(model) -> int:
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb and p is not model.lm_head.weight)


class Timer:
    """CUDA events on GPU, perf_counter on CPU; `mark(name)` closes the phase since the last mark."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self):
        self.marks = [("start", self._now())]

    def mark(self, name: str):
        self.marks.append((name, self._now()))

    def phases_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


def measure_matmul_peak(device: torch.device) -> float | None:
    """TFLOP/s of an 8192³ bf16 matmul (mean of 10 after 3 warm-ups); None on CPU."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12


def build_models(device: torch.device, tiny: bool, layers: int | None = None):
    """A random-weight Qwen2.5-1.5B-shaped teacher (`qwen25_15b_config`) and its all-GDN student."""
    torch.manual_seed(0)
    config = qwen25_15b_config(tiny, layers)
    with torch.device(device):
        teacher = Qwen2ForCausalLM(config)  # fp32, so the student's master weights are fp32
    teacher.eval()
    student = build_student(teacher, ["gdn"] * config.num_hidden_layers)
    teacher.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    return teacher, student


def device_and_models(parser: argparse.ArgumentParser, args) -> tuple[torch.device, object, object]:
    """The CUDA device (CPU only with ``--tiny``, whose ``--seq`` is capped at 64) and `build_models` on it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        parser.error("needs a CUDA GPU (use --tiny for a CPU smoke test)")
    if args.tiny:
        args.seq = min(args.seq, 64)
    return (device, *build_models(device, args.tiny))


def trainer_run(
    teacher,
    student,
    seq: int,
    batch: int,
    accum: int,
    steps: int,
    warmup: int,
    chunk: int,
    ac: bool,
    device: torch.device,
    compile_layers: str = "off",
) -> dict:
    """Tokens/s (median over steps after `warmup`) and peak memory of `distill` (stage 2)."""
    global_batch = batch * accum
    tokens = torch.randint(
        0, teacher.config.vocab_size, (global_batch * steps, seq), generator=torch.Generator().manual_seed(0)
    )
    data = TensorTokenDataset(tokens)
    config = DistillConfig(
        stage=2,
        target_tokens=global_batch * seq * steps,
        seq_len=seq,
        global_batch_size=global_batch,
        micro_batch_size=batch,
        kl_chunk_size=chunk,
        activation_checkpointing=ac,
        compile_layers=compile_layers,
        progress=False,
        save_final_model=False,
        eval_max_batches=0,
        device=str(device),
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        distill(student, teacher, data, config, run_dir)
        rows = read_metrics(run_dir)
    tps = [r["tokens_per_s"] for r in rows[warmup:]] or [rows[-1]["tokens_per_s"]]
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    # what the caching allocator held at most: what must fit on the GPU (allocated + cache + fragmentation)
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    return {"tokens_per_s": statistics.median(tps), "peak_gib": peak, "reserved_gib": reserved, "loss": rows[-1]["loss"]}


def stage2_step(teacher, student, seq: int, batch: int, chunk: int, device: torch.device):
    """A function running one Stage-2 step (one micro-batch) phase by phase, the same calls as the trainer
    makes; it marks the phases on the `Timer` it is given."""
    config = DistillConfig(stage=2)
    optimizer = build_optimizer(student, config, mixer_parameter_names(student))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    ids = torch.randint(0, teacher.config.vocab_size, (batch, seq), device=device)
    hidden = teacher.config.hidden_size

    def step(timer: Timer) -> None:
        timer.start()
        with autocast:
            with torch.no_grad():
                t_hidden, t_head = forward_hidden(teacher, ids, None, head_fn=lambda h, w: (h.reshape(-1, hidden), w))
            timer.mark("teacher forward")
            s_hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
            timer.mark("student forward")
            loss = chunked_kl_div(
                s_hidden.reshape(-1, hidden), student.lm_head.weight, t_hidden, t_head, tau=1.0, chunk_size=chunk
            )
            timer.mark("KL loss (chunked, incl. head grads)")
        (loss / ids.numel()).backward()
        timer.mark("backward")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.mark("optimizer (clip + AdamW)")

    return step


def breakdown(step, iters: int, warmup: int, device: torch.device) -> dict:
    """Median ms per phase of ``iters`` calls of a `stage2_step` function after ``warmup`` calls."""
    timer = Timer(device)
    runs: list[dict[str, float]] = []
    for i in range(warmup + iters):
        step(timer)
        phases = timer.phases_ms()
        if i >= warmup:
            runs.append(phases)
    return {name: statistics.median(r[name] for r in runs) for name in runs[0]}


# Kernel categories (profile_decode.category) whose time an 80 GB H100 would not change: tensor-core GEMMs
# and fused attention run at the same clocks and peak on an H100 and an H200 (989 TFLOP/s dense bf16).
COMPUTE_BOUND_CATEGORIES = ("matmul", "attention")


def kernel_profile(step, device: torch.device, top: int) -> dict:
    """Kernel time of one `stage2_step` call by category (profile_decode's), and the top kernels."""
    from profile_decode import _kernel_stats

    timer = Timer(device)
    stats = _kernel_stats(lambda: step(timer), steps=1, top_n=top)
    by_cat = stats["kernel_ms_by_category"]
    stats["compute_bound_ms"] = sum(ms for cat, ms in by_cat.items() if cat in COMPUTE_BOUND_CATEGORIES)
    stats["other_ms"] = stats["kernel_ms_per_step"] - stats["compute_bound_ms"]
    return stats


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cap_device_memory(device: torch.device, cap_gib: float, headroom_gib: float = 0.5) -> float:
    """Let this process use at most ``cap_gib`` of device memory in all, as on a GPU of that size.

    The caching allocator is limited (``set_per_process_memory_fraction``) to ``cap_gib`` minus what the
    process already holds outside it (CUDA context, cuBLAS, loaded kernels) minus ``headroom_gib`` for
    kernels loaded later. Returns the allocator's limit in GiB; going over it raises an out-of-memory
    error, as the smaller GPU would.
    """
    index = _cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    free, _ = torch.cuda.mem_get_info(index)
    outside_allocator = (total - free) - torch.cuda.memory_reserved(index)
    limit = cap_gib * 2**30 - outside_allocator - headroom_gib * 2**30
    if not 0 < limit <= total:
        raise ValueError(
            f"--memory-cap-gib {cap_gib} leaves {limit / 2**30:.1f} GiB for the allocator on a "
            f"{total / 2**30:.1f} GiB GPU; pick a cap between {(outside_allocator / 2**30) + headroom_gib + 1:.0f} "
            f"and {total / 2**30:.1f} GiB"
        )
    torch.cuda.set_per_process_memory_fraction(limit / total, index)
    return limit / 2**30


def device_memory_in_use_gib(device: torch.device) -> float:
    """Device memory in use on the GPU (``mem_get_info``: every process; in the benchmark, this one's
    allocator reservations, CUDA context and loaded kernels)."""
    free, total = torch.cuda.mem_get_info(_cuda_index(device))
    return (total - free) / 2**30


def _segments_note(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (no CUDA)"
    return "expandable" if expandable_segments_configured() else "fixed-size (the allocator's default)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2, help="micro-batch size (sequences); 2 x 4096 tokens keeps fla off the CPU launch bound")
    parser.add_argument("--accum", type=int, nargs="+", default=[1], help="micro-batches per step to measure")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per trainer run")
    parser.add_argument("--warmup", type=int, default=2, help="steps / iterations left out of the medians")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations of the breakdown")
    parser.add_argument("--chunk", type=int, default=1024, help="kl_chunk_size (tokens per lm_head chunk)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument(
        "--compile-layers", choices=["off", "teacher", "all"], default="off",
        help="DistillConfig.compile_layers: torch.compile the decoder layers of the teacher / both (the breakdown then runs compiled too)",
    )
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument(
        "--memory-cap-gib", type=float,
        help="use at most this much device memory in all, as on a smaller GPU (79.11 = an 80 GB H100's capacity)",
    )
    parser.add_argument(
        "--profile", type=int, metavar="TOP", default=0,
        help="also profile one step's kernels (time by category, compute-bound share, TOP kernels)",
    )
    parser.add_argument(
        "--no-expandable-segments", action="store_true",
        help="keep the allocator's default fixed-size segments (hybrid-distill turns expandable segments on)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test of this script)")
    parser.add_argument("--markdown", help="append the results table to this Markdown file")
    args = parser.parse_args()
    if args.no_expandable_segments:  # configured, so the trainer leaves the allocator alone
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    else:
        prefer_expandable_segments()  # as the command line does; before the first CUDA tensor

    device, teacher, student = device_and_models(parser, args)
    n_t, n_s = non_embedding_params(teacher), non_embedding_params(student)
    vh = teacher.config.vocab_size * teacher.config.hidden_size
    flops_tok = 2 * n_t + 6 * n_s
    flops_tok_head = flops_tok + 8 * vh
    measured_peak = measure_matmul_peak(device)
    cap_note = "none"
    if args.memory_cap_gib:
        if device.type != "cuda":
            parser.error("--memory-cap-gib needs a CUDA GPU")
        limit = cap_device_memory(device, args.memory_cap_gib)
        cap_note = f"{args.memory_cap_gib:g} GiB in all (caching allocator limited to {limit:.2f} GiB)"

    rows = []
    for accum in args.accum:
        r = trainer_run(
            teacher,
            student,
            args.seq,
            args.batch,
            accum,
            args.steps,
            args.warmup,
            args.chunk,
            args.activation_checkpointing,
            device,
            args.compile_layers,
        )
        tflops = r["tokens_per_s"] * flops_tok / 1e12
        tflops_head = r["tokens_per_s"] * flops_tok_head / 1e12
        rows.append((accum, r, tflops, tflops_head))
        print(
            f"accum={accum}: {r['tokens_per_s']:,.0f} tok/s, {tflops:.1f} TFLOP/s, peak {r['peak_gib']:.1f} GiB",
            flush=True,
        )
    step = None if args.no_breakdown and not args.profile else stage2_step(
        teacher, student, args.seq, args.batch, args.chunk, device
    )
    phases = None if args.no_breakdown else breakdown(step, args.iters, args.warmup, device)
    kernels = kernel_profile(step, device, args.profile) if args.profile and device.type == "cuda" else None
    in_use = device_memory_in_use_gib(device) if device.type == "cuda" else float("nan")

    peak_note = f"{measured_peak:.0f} TFLOP/s measured (8192³ bf16 matmul)" if measured_peak else "n/a"
    lines = [
        f"### Stage-2 KL distillation, Qwen2.5-1.5B-shaped teacher → all-GDN student"
        f"{' (TINY smoke test)' if args.tiny else ''}, T={args.seq}, micro-batch {args.batch}, bf16 autocast",
        "",
        f"- {provenance()}",
        f"- N (non-embedding params): teacher {n_t / 1e9:.3f}B, student {n_s / 1e9:.3f}B; "
        f"FLOPs/token 2·N_t + 6·N_s = {flops_tok / 1e9:.2f} GFLOP; with lm_head matmuls (8·V·H more) "
        f"{flops_tok_head / 1e9:.2f} GFLOP",
        f"- peak: {NOMINAL_PEAK_TFLOPS:.0f} TFLOP/s nominal dense bf16; {peak_note}",
        f"- kl_chunk_size {args.chunk}; activation checkpointing {'on' if args.activation_checkpointing else 'off'}; "
        f"compiled decoder layers: {args.compile_layers}; "
        f"trainer runs of {args.steps} steps, first {args.warmup} left out",
        f"- memory cap: {cap_note}; device memory in use at the end (allocator cache included): {in_use:.1f} GiB; "
        f"allocator segments: {_segments_note(device)}",
        "",
        "| micro-batches/step | tokens/step | tokens/s | TFLOP/s | MFU (nominal) | MFU (measured peak) "
        "| MFU incl. lm_head (nominal) | peak GiB allocated | peak GiB reserved |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for accum, r, tflops, tflops_head in rows:
        mfu_m = f"{100 * tflops / measured_peak:.1f}%" if measured_peak else "n/a"
        lines.append(
            f"| {accum} | {accum * args.batch * args.seq:,} | {r['tokens_per_s']:,.0f} | {tflops:.1f} | "
            f"{100 * tflops / NOMINAL_PEAK_TFLOPS:.1f}% | {mfu_m} | {100 * tflops_head / NOMINAL_PEAK_TFLOPS:.1f}% | "
            f"{r['peak_gib']:.1f} | {r['reserved_gib']:.1f} |"
        )
    if phases:
        total = sum(phases.values())
        lines += [
            "",
            f"Breakdown of one step (one micro-batch of {args.batch}×{args.seq}, median of {args.iters}; "
            f"{args.batch * args.seq / total * 1e3:,.0f} tokens/s from these phases):",
            "",
            "| phase | ms | share |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {ms:.1f} | {100 * ms / total:.0f}% |" for name, ms in phases.items()]
        lines.append(f"| total | {total:.1f} | 100% |")
    if kernels:
        k_total = kernels["kernel_ms_per_step"]
        lines += [
            "",
            f"Kernels of one step (torch.profiler, one micro-batch): {k_total:.1f} ms in "
            f"{kernels['kernels_per_step']:.0f} kernels; compute-bound ({', '.join(COMPUTE_BOUND_CATEGORIES)}) "
            f"{kernels['compute_bound_ms']:.1f} ms, the rest {kernels['other_ms']:.1f} ms.",
            "",
            "| kernel category | ms | share |",
            "|---|---:|---:|",
        ]
        lines += [f"| {cat} | {ms:.1f} | {100 * ms / k_total:.0f}% |" for cat, ms in kernels["kernel_ms_by_category"].items()]
        lines += ["", "| top kernel | calls | ms |", "|---|---:|---:|"]
        lines += [f"| `{k['name']}` | {k['calls']} | {k['ms']:.2f} |" for k in kernels["top_kernels"]]
    table = "\n".join(lines) + "\n"
    publish(table, args.markdown)


if __name__ == "__main__":
    main()
