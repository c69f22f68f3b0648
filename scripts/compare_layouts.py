#!/usr/bin/env python3
"""Does a student in the exportable Qwen3.5 form distil as well as the default form? (issue 29)

For teachers whose students differ between the layouts -- Qwen2 (the default GDN keeps q/k/v biases, `qwen3_5` has
none), Qwen3 (GDN q/k norms) or an `rms_norm_eps` other than 1e-5 -- the same pipeline runs once per layout and
distillation seed, with the same data and the same layer sets (Uniform at the config's budgets, no learned
selection, so that every hybrid has a partner), and the two forms are compared model by model: held-out KL and recall,
the difference `qwen3_5 - default` with a paired bootstrap interval over the recall samples and the seeds
(`hybrid_distill.evaluation.stats.paired_difference`).

    python3 scripts/compare_layouts.py --work runs/layouts --as-family qwen2 --seeds 0 1 --out runs/layouts/report
    python3 scripts/compare_layouts.py --work runs/layouts-qwen3 --as-family qwen3 --seeds 0 1 --budgets 1 3 \
        --out runs/layouts-qwen3/report
    python3 scripts/compare_layouts.py --teacher runs/qwen3/teacher --config my.yaml --work ... --out ...

``--as-family qwen2`` first rewrites a Llama teacher (by default the shipped one) as a Qwen2 checkpoint with zero
q/k/v biases -- the same function, checked on random tokens before use -- so that the embedded default measures the
Qwen2 case on a trained teacher. ``--as-family qwen3`` rewrites it as a Qwen3 checkpoint, whose attention normalises
q and k per head (RMSNorm before RoPE) and so is not the same function: the norm weights start at the least-squares
fit of the Llama's own q and k (`qk_norm_weights`), then a short causal-LM training on the run config's own data
(`heal`) brings the held-out loss and the recall back to within `Healing`'s margins of the Llama teacher's (measured
by the pipeline's evaluation with the run config's eval settings); the healed teacher and its numbers
(``step.json``) are kept in ``WORK/teacher-qwen3`` and reused while the source and the settings are the same.
The runs keep the Llama teacher's own tokenizer (the run config's ``tokenizer``): for a checkpoint whose
``model_type`` is ``qwen2``, transformers' ``AutoTokenizer`` loads ``Qwen2Tokenizer``, which replaces the
tokenizer's pre-tokenizer with Qwen2's (one token per digit), and the teacher, trained with its own, loses its
recall. For ``qwen3`` transformers 5.25 keeps the saved tokenizer (``qwen3`` is not among its
``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``), but its mapping names ``Qwen2Tokenizer`` too, so the source's
tokenizer is passed for both families. Writes ``OUT/layouts.md`` and ``OUT/layouts.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from hybrid_distill.artifacts import Step  # noqa: E402
from hybrid_distill.distill.optim import lr_factor  # noqa: E402
from hybrid_distill.evaluation.stats import mean_score, paired_difference, sample_scores  # noqa: E402
from hybrid_distill.evaluation.suite import evaluate_model  # noqa: E402
from hybrid_distill.fileio import atomic_directory_write, atomic_write_json, atomic_write_text, read_json  # noqa: E402
from hybrid_distill.layout import RunLayout  # noqa: E402
from hybrid_distill.pipeline import RunConfig, run_pipeline  # noqa: E402
from hybrid_distill.pipeline.config import DEFAULT_CONFIG, resolve_teacher_spec  # noqa: E402
from hybrid_distill.pipeline.models import eval_models  # noqa: E402
from hybrid_distill.surgery import load_tokenizer, model_identity  # noqa: E402

LAYOUTS = ("default", "qwen3_5")


# family -> (config class, model class, the endings of the weights a Llama checkpoint has no counterpart for)
REWRITES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, ("q_proj.bias", "k_proj.bias", "v_proj.bias")),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, ("q_norm.weight", "k_norm.weight")),
}


def llama_rewritten(source: str | Path, family: str) -> tuple[PreTrainedModel, PreTrainedModel, list[str]]:
    """The Llama checkpoint ``source`` (fp32, eval mode), a ``family`` model holding its weights, and the names of
    that model's weights the Llama has no counterpart for (left at their initial values)."""
    llama = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    if llama.config.model_type != "llama":
        raise SystemExit(f"--as-family {family} rewrites a Llama teacher; {source} is {llama.config.model_type!r}")
    config_cls, model_cls, new_weights = REWRITES[family]
    c = llama.config
    config = config_cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings,
                        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                        use_sliding_window=False)
    model = model_cls(config).eval()
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    if unexpected or any(not k.endswith(new_weights) for k in missing):
        raise SystemExit(f"Llama -> {family}: unexpected weights {unexpected}, missing {missing}")
    model.generation_config = llama.generation_config
    return llama, model, missing


def save_teacher(model: PreTrainedModel, source: str | Path, dest: Path) -> None:
    """``model`` saved at ``dest`` with the tokenizer of ``source``."""
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)


def llama_as_qwen2(source: str | Path, dest: Path) -> Path:
    """``source`` (a Llama checkpoint) saved at ``dest`` as a Qwen2 checkpoint with zero q/k/v biases; refused
    unless both give the same logits on random tokens."""
    llama, qwen, missing = llama_rewritten(source, "qwen2")
    c = llama.config
    with torch.no_grad():
        for name, p in qwen.named_parameters():
            if name in missing:
                p.zero_()
        ids = torch.randint(0, c.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        diff = (qwen(ids).logits - llama(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"Llama -> Qwen2: logits differ by {diff:.3g}")
    save_teacher(qwen, source, dest)
    print(f"{source} -> {dest} as Qwen2 (zero q/k/v biases; max |logit difference| {diff:.2g})", flush=True)
    return dest


def qk_norm_weights(llama: PreTrainedModel, ids: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """Per ``model.layers.<i>.self_attn.{q,k}_norm.weight``: the weight w [head_dim] for which w * x / rms(x) comes
    closest (least squares over ``ids``' tokens and the heads) to the Llama's own per-head q or k vector x.

    Qwen3 normalises each head's q and k before RoPE: rms(x) varies from token to token, so no weight gives back
    the Llama's function; per dimension d, w_d = sum(x_d * y_d) / sum(y_d^2) with y = x / sqrt(mean(x^2) + eps)
    is the fit of least squared error."""
    head_dim = llama.config.head_dim
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(llama.model.layers):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{i}.self_attn.{proj[0]}_norm.weight"
            hooks.append(getattr(layer.self_attn, proj).register_forward_hook(
                lambda module, args, out, name=name: outputs.__setitem__(name, out.detach())))
    try:
        with torch.no_grad():
            llama(ids)
    finally:
        for hook in hooks:
            hook.remove()
    weights = {}
    for name, out in outputs.items():
        x = out.reshape(-1, head_dim).double()  # [tokens * heads, head_dim]
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        weights[name] = ((x * y).sum(0) / y.pow(2).sum(0)).float()
    return weights


@dataclass(frozen=True)
class Healing:
    """The causal-LM training that brings a Llama teacher rewritten as Qwen3 back to the Llama's quality: AdamW on
    every weight, linear warm-up then cosine decay to ``lr * min_lr_ratio`` over ``steps``, batches of
    ``batch_size`` x ``seq_len`` tokens of the run's data in a seeded order. Every ``check_every`` steps the
    pipeline's evaluation (the run's eval settings: recall and held-out loss) measures it; it stops at the first
    check where its held-out loss is at most the Llama's + ``loss_margin`` (nats/token) and its recall at least the
    Llama's - ``recall_margin``, and is refused if no check within ``steps`` passes."""

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    check_every: int = 50
    calibration_sequences: int = 16  # training sequences the q/k norm weights are fitted on
    loss_margin: float = 0.05
    recall_margin: float = 0.05
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "check_every", "calibration_sequences"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Healing.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.loss_margin >= 0 and self.recall_margin >= 0):
            raise ValueError(f"Healing: lr must be > 0, min_lr_ratio in [0, 1] and the margins >= 0 ({self})")


def teacher_scores(model: PreTrainedModel, tokenizer, run: RunConfig, out: Path) -> dict[str, float]:
    """Held-out loss (nats/token) and recall (overall mean) of ``model`` by the pipeline's evaluation with ``run``'s
    eval settings and data, as the runs' ``eval/teacher`` measures a teacher; results in ``out``."""
    res = evaluate_model(model.eval(), tokenizer, out, run.eval, suite=["recall", "quality"], corpus=run.data,
                         model_name=out.name)
    return {"loss": res["quality"]["nll"], "recall": res["recall"]["aggregate"]["overall"]}


def heal(model: PreTrainedModel, tokenizer, run: RunConfig, healing: Healing, reference: dict[str, float],
         eval_dir: Path) -> dict:
    """Train ``model`` in place (`Healing`) until it is within the margins of ``reference`` (`teacher_scores` of the
    Llama teacher); returns the checks made ({step, loss, recall}, step 0 before training) and the wall time.
    SystemExit, naming the last check, when no check passes within ``healing.steps``."""
    torch.manual_seed(healing.seed)
    data = run.data.load(tokenizer, healing.seq_len, seed=healing.seed, require_sequences=healing.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=healing.lr, betas=healing.betas, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, healing.steps, healing.warmup_steps, "cosine", healing.min_lr_ratio))

    def check(step: int) -> bool:
        checks.append({"step": step, **teacher_scores(model, tokenizer, run, eval_dir / f"qwen3-step{step}")})
        print(f"healing step {step}: held-out loss {checks[-1]['loss']:.4f} (Llama {reference['loss']:.4f}), "
              f"recall {checks[-1]['recall']:.3f} (Llama {reference['recall']:.3f})", flush=True)
        return (checks[-1]["loss"] <= reference["loss"] + healing.loss_margin
                and checks[-1]["recall"] >= reference["recall"] - healing.recall_margin)

    checks: list[dict] = []
    start = time.perf_counter()
    healed = check(0)
    batches = data.batches("train", healing.batch_size, seed=healing.seed, max_steps=healing.steps)
    for step, batch in enumerate(batches, start=1):
        if healed:
            break
        model.train()
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), healing.grad_clip)
        optimizer.step()
        scheduler.step()
        if step % healing.check_every == 0 or step == healing.steps:
            healed = check(step)
    model.eval()
    if not healed:
        raise SystemExit(f"Llama -> Qwen3: after {checks[-1]['step']} healing steps the held-out loss is "
                         f"{checks[-1]['loss']:.4f} (Llama {reference['loss']:.4f}, margin {healing.loss_margin}) and "
                         f"the recall {checks[-1]['recall']:.3f} (Llama {reference['recall']:.3f}, margin "
                         f"{healing.recall_margin}); give Healing more steps")
    return {"checks": checks, "seconds": time.perf_counter() - start}


def llama_as_qwen3(source: str | Path, dest: Path, run: RunConfig, healing: Healing = Healing()) -> Path:
    """``source`` (a Llama checkpoint) saved at ``dest`` as a Qwen3 checkpoint: its weights, q/k norm weights from
    `qk_norm_weights` on ``run``'s training data, then healed (`heal`). ``dest`` is a step: a teacher healed from the
    same source under the same settings is reused; its ``step.json`` holds the Llama's and the checks' numbers."""
    tokenizer = load_tokenizer(str(source))
    settings = {"source": model_identity(str(source)), "healing": asdict(healing), "data": run.data.identity(),
                "eval": run.eval.to_dict()}
    step = Step(dest, settings, what="Qwen3 rewrite of a Llama teacher")
    done = step.finished()
    if done is not None:
        print(f"{dest}: the healed Qwen3 teacher of {source} reused ({healing_summary(done.result)})", flush=True)
        return dest
    llama, qwen, missing = llama_rewritten(source, "qwen3")
    data = run.data.load(tokenizer, healing.seq_len, seed=healing.seed)
    ids = data.get_batch(data.train_indices[: healing.calibration_sequences])
    weights = qk_norm_weights(llama, ids, qwen.config.rms_norm_eps)
    if sorted(weights) != sorted(missing):
        raise SystemExit(f"Llama -> Qwen3: fitted {sorted(weights)}, but the checkpoint lacks {sorted(missing)}")
    qwen.load_state_dict(weights, strict=False)
    eval_dir = dest.with_name(f"{dest.name}-healing")
    reference = teacher_scores(llama, tokenizer, run, eval_dir / "llama")
    result = {"llama": reference, **heal(qwen, tokenizer, run, healing, reference, eval_dir)}
    with atomic_directory_write(dest) as tmp:
        save_teacher(qwen, source, tmp)
    step.publish(result)
    print(f"{source} -> {dest} as Qwen3 ({healing_summary(result)})", flush=True)
    return dest


def healing_summary(result: dict) -> str:
    """One line of `llama_as_qwen3`'s result: the healed teacher's numbers beside the Llama's."""
    healed, llama = result["checks"][-1], result["llama"]
    return (f"healed in {healed['step']} steps, {result['seconds']:.0f} s: held-out loss {healed['loss']:.4f}, "
            f"Llama {llama['loss']:.4f}; recall {healed['recall']:.3f}, Llama {llama['recall']:.3f}")


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
    parser.add_argument("--as-family", choices=sorted(REWRITES), default=None,
                        help="rewrite a Llama teacher as this family first (qwen2: the same function; qwen3: healed "
                        "by a short training)")
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
    base = yaml.safe_load((DEFAULT_CONFIG if args.config == "default" else Path(args.config)).read_text())
    tokenizer = None
    if args.as_family is not None:
        dest = work / f"teacher-{args.as_family}"
        tokenizer = teacher  # the rewritten teacher's own tokenizer, not the one transformers picks for its family
        if args.as_family == "qwen2":
            teacher = str(dest if (dest / "config.json").is_file() else llama_as_qwen2(teacher, dest))
        else:
            teacher = str(llama_as_qwen3(teacher, dest, RunConfig.from_dict({**base, "teacher": teacher})))
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
