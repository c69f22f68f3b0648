"""``hybrid-distill run --dry-run``: the stages a config will run, their token budgets and a compute estimate.

FLOPs per token: a forward pass costs 2N and forward+backward 6N for N matmul parameters (embedding
lookups excluded, the lm_head included). Stage 1 runs the teacher forward (2N) and trains only the
mixers; Stage 2 and the final hybrids run the teacher forward and train the student (2N + 6N).
GPU time assumes an H100 (989 TFLOP/s dense bf16) at ``mfu`` utilisation. The default, 30%, sits below the
utilisation Stage 2 reaches by this count at micro-batches of 2-4 x 4096 tokens (benchmarks/RESULTS.md), leaving
room for an H100's lower memory bandwidth, evaluations and checkpoints; smaller micro-batches run well below it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from ..selection.registry import (
    BYPASS_SELECTORS,
    LEARNED_SELECTORS,
    candidate_kinds,
)
from ..selection.scoring import candidate_families
from ..surgery import teacher_config
from ..tasks import DEFAULT_RECALL_TASKS
from .config import RunConfig

H100_BF16_FLOPS = 989e12


def matmul_params(teacher_spec: str) -> tuple[int, int, int]:
    """(matmul parameters N, attention-projection parameters, layers) of a teacher, built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(teacher_config(teacher_spec))
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    n = total - embed.numel() + model.config.vocab_size * model.config.hidden_size * bool(model.config.tie_word_embeddings)
    attn = sum(p.numel() for name, p in model.named_parameters() if ".self_attn." in name)
    return n, attn, model.config.num_hidden_layers


def _tokens(cfg) -> int:
    """Tokens a DistillConfig trains: whole optimizer steps."""
    return cfg.total_tokens


def plan_run(config: RunConfig, mfu: float = 0.3) -> dict[str, Any]:
    """The run plan: per stage its tokens, FLOPs and H100-hours at ``mfu`` (selection and final are upper
    bounds: early stopping saves candidate tokens, identical layer sets are trained once)."""
    n, attn, layers = matmul_params(config.teacher_spec)
    rows: list[dict[str, Any]] = []

    def add(stage: str, what: str, tokens: int, flops_per_token: float) -> None:
        flops = tokens * flops_per_token
        rows.append({"stage": stage, "what": what, "tokens": tokens, "flops": flops,
                     "h100_hours": flops / (H100_BF16_FLOPS * mfu) / 3600})

    s1 = config.stage1
    add("stage1", f"all-{config.linear} attention alignment, seq {s1.data_seq_len}", _tokens(s1), 2 * n + 6 * attn)
    if config.stage2 is not None:
        s2 = config.stage2
        add("stage2", f"all-{config.linear} KL distillation, seq {s2.data_seq_len}", _tokens(s2), 8 * n)
    kinds: set[str] = set()
    for selector in config.selectors:
        sel = config.selection_config(selector)
        if selector in LEARNED_SELECTORS:
            kinds.update(candidate_kinds(selector))
        elif selector in BYPASS_SELECTORS:
            rows.append({"stage": "selection", "what": f"{selector}: {layers} bypassed teacher evaluations",
                         "tokens": 0, "flops": 0.0, "h100_hours": 0.0})
    if kinds:
        sel = config.selection_config(next(s for s in config.selectors if s in LEARNED_SELECTORS))
        c1, c2 = sel.stage_config(1), sel.stage_config(2)
        per = _tokens(c2)
        flops = 8 * n * per
        if c1 is not None:
            per += _tokens(c1)
            flops += (2 * n + 6 * attn) * _tokens(c1)
        learned = [config.selection_config(s) for s in config.selectors if s in LEARNED_SELECTORS]
        families = {(kind, start): members for c in learned  # selectors sharing a kind and start share candidates
                    for kind, (start, members) in candidate_families(c, layers).items()}
        nulls = sum(1 for members in families.values() for m in members if m.is_null)
        count = sum(len(members) for members in families.values())
        bound = "up to " if any(c.early_stop or c.racing for c in learned) else ""  # early stopping / racing spend less
        what = f"{count - nulls} one-swap" + (f" + {nulls} null" if nulls else "")
        add("selection", f"{bound}{what} candidates ({'+'.join(sorted(kinds))}) x {per:,} tokens", count * per,
            flops / per)
    budgets = config.selection.budgets
    sets = sum(1 if s == "given" else len(budgets) for s in config.selectors) + len(config.final.extra_sets)
    fin = config.final.stage2
    add("final", f"up to {sets} final hybrids x {_tokens(fin):,} tokens", sets * _tokens(fin), 8 * n)

    ev = config.eval
    parts = ev.suite
    per_model = 0
    if "recall" in parts:
        per_model += len(ev.tasks or DEFAULT_RECALL_TASKS) * sum(ev.lengths) * ev.num_samples
    if "niah" in parts:
        per_model += len(ev.niah_depths) * sum(ev.niah_grid_lengths) * ev.niah_samples
    if "quality" in parts:  # each model and the teacher beside it
        per_model += 2 * ev.quality_sequences * ev.quality_seq_len
    what = f"{2 + sets} models (teacher, all-linear, hybrids): {', '.join(parts)}"
    if "efficiency" in parts:
        what += " (efficiency: timed decoding, not counted)"
    add("eval", what, (2 + sets) * per_model, 2 * n)
    total = {k: sum(r[k] for r in rows) for k in ("tokens", "flops", "h100_hours")}
    return {"teacher": config.teacher_spec, "matmul_params": n, "layers": layers, "mfu": mfu, "stages": rows, "total": total}


def plan_markdown(plan: dict[str, Any]) -> str:
    lines = [
        f"Plan for teacher `{plan['teacher']}` ({plan['layers']} layers, {plan['matmul_params'] / 1e6:,.1f}M matmul params)",
        "",
        "| stage | what | tokens | PFLOPs | H100-hours @ {:.0%} MFU |".format(plan["mfu"]),
        "|---|---|---:|---:|---:|",
    ]
    for r in plan["stages"] + [{"stage": "**total**", "what": "", **plan["total"]}]:
        lines.append(f"| {r['stage']} | {r['what']} | {r['tokens']:,} | {r['flops'] / 1e15:,.3f} | {r['h100_hours']:.3f} |")
    return "\n".join(lines)
