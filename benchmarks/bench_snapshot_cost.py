"""What a layer-scoring candidate's held-out KL snapshots cost, as a share of its compute.

A candidate (hybrid_distill.selection) trains Stage 2 and, every ``snapshot_interval`` tokens, scores the held-out
KL on ``eval_batches`` batches; `SelectionConfig.snapshot_schedule` decides both. This runs a candidate's Stage-2
trainer on a Qwen2.5-1.5B-shaped teacher (random weights; ``--layers`` of its 28 layers) with an all-GDN student
for ``--intervals`` snapshot intervals and reads, from the trainer's own metrics, the time its optimizer steps and
its snapshots took, for each schedule:

- ``default``: the schedule `SelectionConfig` gives for ``--candidate-tokens`` per candidate;
- ``every-step``: a snapshot after every step over ``--every-step-batches`` batches of a whole optimizer step's
  sequences (the earlier default).

    source .gpu/setup.sh && python3 benchmarks/bench_snapshot_cost.py --markdown OUT.md
    python3 benchmarks/bench_snapshot_cost.py --tiny        # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from bench_stage2 import build_models
from common import provenance, publish

from hybrid_distill.distill import DistillConfig, TensorTokenDataset, Trainer, read_metrics
from hybrid_distill.distill.stages import evaluate_kl
from hybrid_distill.selection import SelectionConfig


def run_schedule(teacher, student, stage2: DistillConfig, interval: int, eval_batches: int, eval_bs: int,
                 intervals: int, device: torch.device, warmup_steps: int) -> dict:
    """Train ``intervals`` snapshot intervals (after ``warmup_steps`` untimed steps and one untimed held-out
    batch, so that kernel compilation is not timed) and return the seconds of each phase."""
    step_tokens = stage2.global_batch_size * stage2.seq_len
    steps = warmup_steps + intervals * max(1, interval // step_tokens)
    gen = torch.Generator().manual_seed(0)
    vocab = teacher.config.vocab_size
    train = TensorTokenDataset(torch.randint(0, vocab, (stage2.global_batch_size * (steps + 1), stage2.seq_len),
                                             generator=gen))
    heldout = [torch.randint(0, vocab, (eval_bs, stage2.seq_len), generator=gen) for _ in range(eval_batches)]
    cfg = stage2.replace(target_tokens=steps * step_tokens, eval_every_tokens=interval, eval_max_batches=eval_batches,
                         eval_batch_size=eval_bs,
                         log_every_steps=1, save_final_model=False, save_every_minutes=0, progress=False,
                         device=str(device))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(student, teacher, train, cfg, run_dir, eval_data=heldout)
        trainer.run(until_tokens=warmup_steps * step_tokens, checkpoint_at_pause=False)  # compile / autotune
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            evaluate_kl(student, teacher, heldout[:1], cfg.tau, cfg.kl_chunk_size)  # the snapshots' kernels too
        trainer.run(checkpoint_at_pause=False)
        phases = phase_seconds(read_metrics(run_dir, "train"), read_metrics(run_dir, "eval"), warmup_steps)
    return {**phases, "step_tokens": step_tokens, "snapshot_tokens": eval_batches * eval_bs * stage2.seq_len}


def phase_seconds(train: list[dict], evals: list[dict], skip_steps: int) -> dict:
    """Seconds in optimizer steps and in snapshots after the first ``skip_steps`` steps, from the trainer's metrics
    (one train record a step; ``elapsed`` is the trained time when a record was written, so a snapshot took its
    record's elapsed minus its step's, and a step its elapsed minus the previous record's)."""
    after = {e["step"]: e["elapsed"] for e in evals}
    out = {"steps": 0, "snapshots": 0, "train_s": 0.0, "snapshot_s": 0.0}
    prev = None
    for r in train:
        if prev is not None and r["step"] > skip_steps:
            out["steps"] += 1
            out["train_s"] += r["elapsed"] - after.get(prev["step"], prev["elapsed"])
        if r["step"] in after and r["step"] > skip_steps:
            out["snapshots"] += 1
            out["snapshot_s"] += after[r["step"]] - r["elapsed"]
        prev = r
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="teacher layers (of Qwen2.5-1.5B's shape)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=1, help="1: the shape the GPU kit's kernel cache holds")
    parser.add_argument("--candidate-tokens", type=int, default=None,
                        help="Stage-2 tokens per candidate (default: SelectionConfig's)")
    parser.add_argument("--intervals", type=int, default=2, help="snapshot intervals timed per schedule")
    parser.add_argument("--every-step-batches", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model on the CPU")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        parser.error("needs a CUDA GPU (use --tiny for a CPU smoke test)")
    if args.tiny:
        args.seq, args.global_batch, args.micro_batch = 64, 4, 2
    teacher, student = build_models(device, args.tiny, None if args.tiny else args.layers)  # the ratio is per layer
    stage2 = {"seq_len": args.seq, "global_batch_size": args.global_batch, "micro_batch_size": args.micro_batch}
    if args.candidate_tokens is not None:
        stage2["target_tokens"] = args.candidate_tokens
    if args.tiny:
        stage2["target_tokens"] = 40 * 4 * args.global_batch * args.seq  # 4 steps between snapshots
    selection = SelectionConfig(stage2=stage2)
    cfg2 = selection.stage_config(2)
    interval, batches = selection.snapshot_schedule()
    schedules = {"default": (interval, batches, cfg2.eval_batch_size or cfg2.micro_batch(1)),
                 "every-step": (args.global_batch * args.seq, args.every_step_batches, args.global_batch)}
    rows = {}
    for name, (every, n, eval_bs) in schedules.items():
        r = run_schedule(teacher, student, cfg2, every, n, eval_bs, args.intervals, device, args.warmup_steps)
        # per interval: one snapshot and the steps between two (the run also ends with one, so not the raw sums)
        snapshot = r["snapshot_s"] / max(r["snapshots"], 1)
        steps = r["train_s"] / max(r["steps"], 1) * max(1, every // r["step_tokens"])
        r.update(interval_tokens=every, eval_batches=n, share=snapshot / (snapshot + steps))
        rows[name] = r
        print(name, json.dumps(r))
    per_token = {name: (r["snapshot_s"] / max(r["snapshots"], 1) / r["snapshot_tokens"]) /
                 (r["train_s"] / max(r["steps"], 1) / r["step_tokens"]) for name, r in rows.items()}
    result = {"provenance": provenance(), "layers": args.layers if not args.tiny else "tiny", "seq": args.seq,
              "global_batch": args.global_batch, "micro_batch": args.micro_batch,
              "candidate_tokens": cfg2.target_tokens, "rows": rows, "snapshot_vs_train_seconds_per_token": per_token}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    lines = [f"### Snapshot cost of a layer-scoring candidate ({provenance()})", "",
             f"`python3 benchmarks/bench_snapshot_cost.py --layers {args.layers} --seq {args.seq} "
             f"--global-batch {args.global_batch} --micro-batch {args.micro_batch} --intervals {args.intervals}`"
             + (" (tiny)" if args.tiny else ""), "",
             f"Qwen2.5-1.5B-shaped teacher ({result['layers']} layers, random weights), all-GDN student, "
             f"{cfg2.target_tokens:,} Stage-2 tokens per candidate.", "",
             "| schedule | tokens between snapshots | held-out tokens per snapshot | steps | snapshots | "
             "train s | snapshot s | snapshot share of an interval's compute | snapshot / train seconds per token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['interval_tokens']:,} | {r['snapshot_tokens']:,} | {r['steps']} | {r['snapshots']} | "
                     f"{r['train_s']:.1f} | {r['snapshot_s']:.1f} | {100 * r['share']:.1f}% | {per_token[name]:.2f} |")
    publish("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
