#!/usr/bin/env python3
"""Does a student in the exportable Qwen3.5 form distil as well as the default form? (issue 29)

For teachers whose students differ between the layouts -- Qwen2 (the default GDN keeps q/k/v biases, `qwen3_5` has
none), Qwen3 (GDN q/k norms) or an `rms_norm_eps` other than 1e-5 -- the same pipeline runs once per layout and
distillation seed, with the same data and the same layer sets (Uniform at the config's budgets, no learned
selection, so that every hybrid has a partner), and the two forms are compared model by model: held-out KL and recall,
the difference `qwen3_5 - default` with a paired bootstrap interval over the recall samples and the seeds
(`hybrid_distill.evaluation.stats.paired_difference`).

    python3 scripts/compare_layouts.py --work runs/layouts --as-family qwen2 --seeds 0 1 --out runs/layouts/report
    python3 scripts/compare_layouts.py --teacher runs/qwen3/teacher --config my.yaml --work ... --out ...

``--as-family qwen2`` first rewrites a Llama teacher (by default the shipped one) as a Qwen2 checkpoint with zero
q/k/v biases -- the same function, checked on random tokens before use -- so that the embedded default measures the
Qwen2 case on a trained teacher. The runs then keep the Llama teacher's own tokenizer (the run config's
``tokenizer``): for a checkpoint whose ``model_type`` is ``qwen2``, transformers' ``AutoTokenizer`` loads
``Qwen2Tokenizer``, which replaces the tokenizer's pre-tokenizer with Qwen2's (one token per digit), and the teacher,
trained with its own, loses its recall. Writes ``OUT/layouts.md`` and ``OUT/layouts.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from hybrid_distill.evaluation.stats import mean_score, paired_difference, sample_scores  # noqa: E402
from hybrid_distill.fileio import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from hybrid_distill.layout import RunLayout  # noqa: E402
from hybrid_distill.pipeline import RunConfig, run_pipeline  # noqa: E402
from hybrid_distill.pipeline.config import DEFAULT_CONFIG, resolve_teacher_spec  # noqa: E402
from hybrid_distill.pipeline.models import eval_models  # noqa: E402

LAYOUTS = ("default", "qwen3_5")


def llama_as_qwen2(source: str | Path, dest: Path) -> Path:
    """``source`` (a Llama checkpoint) saved at ``dest`` as a Qwen2 checkpoint with zero q/k/v biases; refused
    unless both give the same logits on random tokens."""
    llama = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    if llama.config.model_type != "llama":
        raise SystemExit(f"--as-family qwen2 rewrites a Llama teacher; {source} is {llama.config.model_type!r}")
    c = llama.config
    config = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters,
                         tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
                         eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, use_sliding_window=False)
    qwen = Qwen2ForCausalLM(config).eval()
    missing, unexpected = qwen.load_state_dict(llama.state_dict(), strict=False)
    if unexpected or any(not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in missing):
        raise SystemExit(f"Llama -> Qwen2: unexpected weights {unexpected}, missing {missing}")
    with torch.no_grad():
        for name, p in qwen.named_parameters():
            if name in missing:
                p.zero_()
        ids = torch.randint(0, c.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        diff = (qwen(ids).logits - llama(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"Llama -> Qwen2: logits differ by {diff:.3g}")
    qwen.generation_config = llama.generation_config
    qwen.save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    print(f"{source} -> {dest} as Qwen2 (zero q/k/v biases; max |logit difference| {diff:.2g})", flush=True)
    return dest


def run_config(base: dict, teacher: str, layout: str, seed: int, work: Path, tokenizer: str | None = None,
               budgets: list | None = None) -> RunConfig:
    """``base`` for one layout and seed: Uniform sets only (the same in both forms), at ``budgets`` when given."""
    cfg = json.loads(json.dumps(base))
    cfg.update(teacher=teacher, seed=seed, run_dir=str(work / f"{layout}-seed{seed}"))
    if tokenizer is not None:
        cfg["tokenizer"] = tokenizer
    cfg["student"] = {**cfg.get("student", {}), "layout": layout}
    cfg["selection"] = {**cfg["selection"], "selectors": ["uniform"], **({"budgets": budgets} if budgets else {})}
    cfg.pop("export", None)
    return RunConfig.from_dict(cfg)


def measure(run_dir: Path, config: RunConfig) -> dict[str, dict]:
    """Per evaluated model (all-linear student and hybrids): per-sample recall scores and held-out KL."""
    layout = RunLayout(run_dir)
    out = {}
    for name in [m for m in eval_models(config, layout) if m != "teacher"]:
        res = read_json(layout.eval(name) / "results.json")
        if res is None:
            continue
        out[name] = {"scores": sample_scores(res), "kl": (res.get("quality") or {}).get("kl")}
    return out


def compare(runs: dict[str, list[dict[str, dict]]], resamples: int) -> list[dict]:
    """Per model both layouts evaluated in every seed: mean recall and KL per layout, and the paired difference."""
    rows = []
    for name in sorted(set.intersection(*[set(r) for layout_runs in runs.values() for r in layout_runs])):
        a = [r[name]["scores"] for r in runs["qwen3_5"]]
        b = [r[name]["scores"] for r in runs["default"]]
        diff = paired_difference(a, b, resamples=resamples, seed=0)
        kls = {lay: [r[name]["kl"] for r in runs[lay]] for lay in LAYOUTS}
        rows.append({"model": name, "recall": {lay: mean_score([r[name]["scores"] for r in runs[lay]]) for lay in LAYOUTS},
                     "kl": {lay: sum(v) / len(v) for lay, v in kls.items()}, "kl_per_seed": kls,
                     "recall_difference": diff.to_dict()})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Student layouts: `qwen3_5` (exportable) vs `default` ({meta['teacher_family']} teacher)", "",
             f"Teacher `{meta['teacher']}`; config `{meta['config']}`; seeds {meta['seeds']}; Uniform sets only. "
             "Recall: mean over the evaluation's samples and seeds; difference qwen3_5 - default paired over samples "
             f"and seeds, 95% bootstrap interval ({meta['resamples']} resamples). KL: held-out KL(teacher || model).", "",
             "| model | KL default | KL qwen3_5 | recall default | recall qwen3_5 | recall difference [95% CI] |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        d = r["recall_difference"]
        lines.append(f"| {r['model']} | {r['kl']['default']:.4f} | {r['kl']['qwen3_5']:.4f} | "
                     f"{r['recall']['default']:.3f} | {r['recall']['qwen3_5']:.3f} | "
                     f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="default", help="teacher checkpoint ('default': the shipped one)")
    parser.add_argument("--as-family", choices=["qwen2"], default=None,
                        help="rewrite a Llama teacher as this family first (the same function)")
    parser.add_argument("--config", default="default", help="run config the runs start from (default: the embedded one)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budgets", nargs="+", type=int, default=None, help="softmax layers of the Uniform sets "
                        "(default: the config's budgets)")
    parser.add_argument("--work", required=True, help="folder for the converted teacher and the run folders")
    parser.add_argument("--out", required=True, help="folder for layouts.md and layouts.json")
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher = resolve_teacher_spec(args.teacher)
    tokenizer = None
    if args.as_family == "qwen2":
        dest = work / "teacher-qwen2"
        tokenizer = teacher  # the rewritten teacher's own tokenizer, not the one transformers picks for qwen2
        teacher = str(dest if (dest / "config.json").is_file() else llama_as_qwen2(teacher, dest))
    base = yaml.safe_load((DEFAULT_CONFIG if args.config == "default" else Path(args.config)).read_text())
    runs: dict[str, list[dict[str, dict]]] = {layout: [] for layout in LAYOUTS}
    for seed in args.seeds:
        for layout in LAYOUTS:
            config = run_config(base, teacher, layout, seed, work, tokenizer, args.budgets)
            print(f"run {layout} seed {seed} -> {config.run_dir}", flush=True)
            run_pipeline(config, progress=not args.no_progress)
            runs[layout].append(measure(Path(config.run_dir), config))
    family = json.loads((Path(teacher) / "config.json").read_text())["model_type"]
    meta = {"teacher": teacher, "teacher_family": family, "tokenizer": tokenizer or teacher, "config": args.config,
            "seeds": args.seeds, "budgets": args.budgets, "resamples": args.resamples}
    rows = compare(runs, args.resamples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "layouts.json", {**meta, "models": rows})
    atomic_write_text(out / "layouts.md", markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
