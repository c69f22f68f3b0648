#!/usr/bin/env python3
"""Do GA-S2 candidates' short Stage-2 runs lower the held-out KL? Compare candidate schedules (lr, warm-up)
on the shipped teacher, from an existing all-linear student (e.g. the embedded default run's):

    hybrid-distill run default --run-dir runs/default       # once: the all-linear students
    python3 scripts/candidate_schedule_check.py --base-run runs/default --out runs/candidate-schedules

Prints per schedule: step-0, first-snapshot and final held-out KL per layer, how many candidates ended below
their step-0 KL, and the chosen sets (docs/reproduction.md, "Fixes made for run 2").
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SCHEDULES = {
    "lr 1e-3, no warm-up": {"lr_mixer": 1e-3, "lr_other": 1e-4, "warmup_tokens": 0},
    "lr 1e-3, 3-step warm-up": {"lr_mixer": 1e-3, "lr_other": 1e-4, "warmup_tokens": 3 * 16 * 256},
    "lr 4e-4, no warm-up": {"lr_mixer": 4e-4, "lr_other": 4e-5, "warmup_tokens": 0},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-run", default="runs/default", help="a run dir with stage1/final and stage2/final")
    parser.add_argument("--out", default="runs/candidate-schedules")
    parser.add_argument("--steps", type=int, default=10, help="candidate steps of 16 x 256 tokens")
    args = parser.parse_args()

    from hybrid_distill.pipeline.config import SHIPPED_TEACHER
    from hybrid_distill.selection import SelectionConfig, run_selection

    data = {"source": "default", "max_tokens": 1_500_000, "heldout_fraction": 0.02}
    stage = {"target_tokens": args.steps * 16 * 256, "seq_len": 256, "global_batch_size": 16, "eval_max_batches": 4}
    base = Path(args.base_run)
    for i, (name, schedule) in enumerate(SCHEDULES.items()):
        sel = run_selection(SelectionConfig(selector="ga-s2", budgets=[1, 2, 3], stage2={**stage, **schedule},
                                            snapshot_every_tokens=2 * 16 * 256),
                            str(SHIPPED_TEACHER), Path(args.out) / f"schedule{i}", data=data,
                            base_student=str(base / "stage2" / "final"), stage1_student=str(base / "stage1" / "final"),
                            progress=False)
        kl, initial = sel["snapshots"]["ga"]["kl"], sel["snapshots"]["ga"]["kl_initial"]
        print(json.dumps({
            "schedule": name,
            "kl_step0_first_final": {l: [round(initial[l], 3), round(v[0], 3), round(v[-1], 3)] for l, v in kl.items()},
            "ended_below_step0": sum(v[-1] < initial[l] for l, v in kl.items()),
            "mean_final_kl": round(sum(v[-1] for v in kl.values()) / len(kl), 4),
            "sets": {label: e["layers"] for label, e in sel["budgets"].items()},
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
