"""GA-S2 layer selection on one GPU with the local executor: wall time and tokens/s per candidate.

A small random-weight teacher with Qwen2.5-1.5B layer shapes (hidden 1536, 12 heads, 2 KV heads,
head_dim 128) but only ``--layers`` layers, the offline default corpus, GDN probe, seq 4096:
    python benchmarks/bench_selection.py --layers 8 --candidate-steps 8 --markdown FILE
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences) per step")
    parser.add_argument("--base-steps", type=int, default=4)
    parser.add_argument("--candidate-steps", type=int, default=8)
    parser.add_argument("--snapshot-steps", type=int, default=2)
    parser.add_argument("--early-stop", action="store_true")
    parser.add_argument("--executor", default="local")
    parser.add_argument("--work", default="/tmp/bench-selection")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()

    from hybrid_distill.selection import SelectionConfig, run_selection, train_base_student

    work = Path(args.work)
    teacher_dir = work / "teacher"
    if not (teacher_dir / "config.json").is_file():
        config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=args.layers,
                             num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                             tie_word_embeddings=True)
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(teacher_dir)
    tokens_per_step = args.batch * args.seq
    stage = {"seq_len": args.seq, "global_batch_size": args.batch, "micro_batch_size": 1, "eval_max_batches": 2,
             "eval_batch_size": 1}
    data = {"source": "default", "cache_dir": str(work / "tokens"), "heldout_fraction": 0.02}
    t0 = time.perf_counter()
    stage1, base = train_base_student(str(teacher_dir), work / "base", data, "gdn",
                                      {**stage, "target_tokens": args.base_steps * tokens_per_step},
                                      {**stage, "target_tokens": args.base_steps * tokens_per_step}, tokenizer="tiny")
    base_s = time.perf_counter() - t0
    cfg = SelectionConfig(selector="ga-s2", budgets=[0.25, 0.5],
                          stage2={**stage, "target_tokens": args.candidate_steps * tokens_per_step},
                          snapshot_every_tokens=args.snapshot_steps * tokens_per_step, executor=args.executor,
                          early_stop=args.early_stop, early_stop_window=2, round_snapshots=2)
    t1 = time.perf_counter()
    sel = run_selection(cfg, str(teacher_dir), work / "select", data=data, base_student=base, stage1_student=stage1,
                        tokenizer="tiny", progress=False)
    select_s = time.perf_counter() - t1
    cand = sel["candidates"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "device": device, "date": datetime.date.today().isoformat(), "layers": args.layers, "seq": args.seq,
        "batch": args.batch, "candidate_tokens": sel["tokens"]["per_candidate_stage2"],
        "candidates": cand["count"], "mean_tokens_per_s_per_candidate": cand["mean_tokens_per_s"],
        "selection_wall_s": select_s, "base_wall_s": base_s, "tokens_spent": sel["tokens"]["spent"],
        "ranking": sel["ranking"], "budgets": {k: v["layers"] for k, v in sel["budgets"].items()},
        "executor": args.executor,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(
            f"### GA-S2 selection on one GPU ({result['date']}, {device})\n\n"
            f"`python benchmarks/bench_selection.py --layers {args.layers} --candidate-steps {args.candidate_steps} "
            f"--executor {args.executor}`\n\n"
            "| teacher | candidates | tokens / candidate | tokens/s per candidate | selection wall time | base (S1+S2) wall time |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            f"| Qwen2.5-1.5B layer shapes, {args.layers} layers, seq {args.seq} | {cand['count']} | "
            f"{result['candidate_tokens']:,} | {result['mean_tokens_per_s_per_candidate'] or 0:,.0f} | {select_s:.0f} s | {base_s:.0f} s |\n\n"
            f"Ranking: {sel['ranking']}; sets: {result['budgets']}.\n"
        )


if __name__ == "__main__":
    main()
