#!/usr/bin/env python3
"""Pretrain a small teacher (Llama, Qwen2 or Qwen3; GQA, tied embeddings) with strong in-context recall.

Steps (all on the machine that runs it; no network, no downloads), each logged with its wall time:

1. text mixture: the embedded corpus, Python standard-library sources, installed packages' sources
   and the .rst/.md/.txt docs found on the machine (deduplicated, capped per source);
2. a byte-level BPE tokenizer (``hybrid_distill.tokenization.train_tokenizer``) trained on that text
   plus recall documents -- or, with ``init_from`` (a teacher pack), the pack's tokenizer and weights, which
   training then continues from (a fresh optimizer with its own warm-up);
3. synthetic recall documents from the project's own generators
   (``hybrid_distill.tasks.generate_samples``, seeds >= ``data.synthetic_seed``, disjoint from
   the evaluation seeds; template families drawn by ``data.templates``; approximate lengths with
   ``data.exact_length: false``), written as ``BOS prompt answer_prefix answer EOS`` (answer tokens
   weighted ``data.answer_loss_weight`` in the loss), in worker processes, until ``data.synthetic_docs``
   documents or ``data.synthetic_tokens`` tokens or ``data.synthetic_seconds`` pass;
4. packed rows of ``seq_len + 1`` tokens (recall documents never split across rows), about
   ``data.synthetic_fraction`` of the tokens synthetic;
5. AdamW, linear warm-up then cosine decay -- over ``train.target_tokens`` tokens when set (the
   training stops there; ``train.max_minutes`` is then a safety cap: if the measured speed says the
   target cannot be reached in time, the target is cut once, early, so that the schedule still ends,
   and the log says so), else over the wall-clock budget ``train.max_minutes``; bf16 autocast on CUDA,
   ``torch.compile`` when it works;
6. save model + tokenizer (``OUT/teacher``, fp32) and ``OUT/training_log.jsonl``;
7. with ``pack: true``: the int8 teacher pack (``OUT/pack``, ``scripts/teacher_pack.py``), unpacked to
   ``OUT/teacher_dequantized`` -- the teacher that later runs use, so it is what gets evaluated;
8. recall evaluation (``eval``: tasks x lengths, the NIAH grid, a pass/fail gate on ``eval.required``
   at ``eval.threshold``) through ``hybrid_distill.evaluation.suite`` -> ``OUT/eval.json``, ``OUT/eval.md``.

``OUT/status.json`` says which step runs (and, while training, the step, tokens and ETA); ``--poll``
prints it until the run ends, so a run started in the background can be watched::

    python scripts/pretrain_teacher.py --config scripts/pretrain_teacher.yaml --out runs/tiny_teacher
    python scripts/pretrain_teacher.py --config scripts/pretrain_teacher.yaml --out /tmp/t --max-minutes 0.2 \
        --set train.batch_size=4 data.synthetic_docs=300 data.text_chars=2000000   # CPU smoke test
    python scripts/pretrain_teacher.py --config CONFIG --out DIR --evaluate TEACHER_DIR   # evaluation only

The fixed teacher of the decisive reproduction (``scripts/pretrain_teacher_fixed.yaml``, docs/reproduction.md)
runs on a GPU machine that allows commands of at most 10 minutes and sends back only what is under $OUT
(at most 8 files). Two commands (a third poll if the second returns before the run is done: data about
3-4 minutes, training at most ``train.max_minutes``, pack and evaluation about 2-3), each sent as soon as the
previous one returns, so that the machine stays warm and the background run alive:

    mkdir -p runs/teacher && setsid nohup python3 scripts/pretrain_teacher.py --config scripts/pretrain_teacher_fixed.yaml \
        --out runs/teacher > runs/teacher.log 2>&1 < /dev/null & sleep 2; \
        python3 scripts/pretrain_teacher.py --out runs/teacher --poll 560 --collect $OUT
    python3 scripts/pretrain_teacher.py --out runs/teacher --poll 570 --collect $OUT

``--collect DIR`` copies ``status.json``, ``training_log.jsonl`` and the run's console log (``runs/teacher.log``,
found beside OUT) into DIR at every poll; once the run is done also ``eval.json``, ``eval.md`` and
``teacher_pack.tar`` (the pack folder; ``tar -xf teacher_pack.tar`` gives ``pack/``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from hybrid_distill.fileio import atomic_write, atomic_write_json, atomic_write_text, pid_alive, read_json  # noqa: E402
from hybrid_distill.tasks import TASKS, TEMPLATE_FAMILIES  # noqa: E402

DEFAULTS: dict = {
    "seed": 0,
    "model": {
        "family": "llama",  # llama, qwen2 (q/k/v biases) or qwen3 (per-head q/k RMSNorm): the teacher's HF architecture
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
    },
    "tokenizer": {"vocab_size": 3072, "train_chars": 16_000_000, "synthetic_docs": 4000},
    "data": {
        "seq_len": 512,
        "text_chars": 120_000_000,
        "sources": {"corpus": 0.06, "stdlib_code": 0.30, "packages_code": 0.44, "docs": 0.20},
        "synthetic_fraction": 0.4,
        "synthetic_docs": 150_000,
        "synthetic_seconds": 60,
        "synthetic_seed": 10_000,
        "synthetic_tokens": None,  # stop generating at this many tokens (None: at synthetic_docs / synthetic_seconds)
        "prompt_tokens": [96, 500],
        "prompt_length_dist": "uniform",  # or "loguniform": more short documents, the same range
        "exact_length": True,  # False: approximate prompt lengths (at most the drawn length), ~5x faster
        "templates": {"eval": 1.0},  # template family -> sampling weight
        "answer_loss_weight": 4.0,
        "tasks": {"niah_single_1": 1, "kv_retrieval": 1, "mqar": 1, "vt": 1},
        "heldout_rows": 512,
    },
    "train": {
        "target_tokens": None,  # stop at this many tokens (cosine over them); None: train for max_minutes
        "max_minutes": 5.0,
        "batch_size": 256,
        "lr": 3e-3,
        "min_lr_ratio": 0.1,
        "warmup_steps": 300,
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],
        "grad_clip": 1.0,
        "compile": True,
        "log_every": 50,
        "val_every": 500,
    },
    "eval": {
        "tasks": ["niah_single_1", "niah_multikey_2", "kv_retrieval", "mqar", "vt"],
        "required": [],  # tasks that must score >= threshold at every length (the gate); [] = no gate
        "threshold": 0.9,
        "lengths": [256, 512],
        "num_samples": 20,
        "seed": 0,
        "batch_size": 20,
        "niah_lengths": [],  # the NIAH grid (lengths x depths, niah_samples each); [] = none
        "niah_depths": [0, 25, 50, 75, 100],
        "niah_samples": 2,
    },
    "pack": False,  # quantize the teacher into OUT/pack (scripts/teacher_pack.py) and evaluate the dequantized one
    # Continue from a teacher pack (a pack folder, or the teacher_pack.tar --collect writes) instead of from random
    # weights: its tokenizer and dequantized weights, model settings checked against `model`; a fresh AdamW.
    "init_from": None,
}
FAMILY_CLASSES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}  # model.family -> transformers class prefix


STATUS = "status.json"
NO_STATUS_S = 60  # --poll gives up on a run that has written no status.json after this long


# ----------------------------------------------------------------------------------------------
# config


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("tasks", "sources", "templates"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(paths: str | list[str] | None, sets: list[str]) -> dict:
    """DEFAULTS overridden by each YAML file of ``paths`` in turn, then by ``sets`` (``KEY=VALUE``)."""
    import yaml

    cfg = copy.deepcopy(DEFAULTS)
    for path in [paths] if isinstance(paths, str) else paths or []:
        with open(path) as f:
            cfg = _merge(cfg, yaml.safe_load(f) or {})
    for item in sets:
        key, _, raw = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    check_config(cfg)
    return cfg


def check_config(cfg: dict) -> None:
    """SystemExit naming the field for settings that would fail after minutes of data preparation."""
    d, t, e = cfg["data"], cfg["train"], cfg["eval"]
    if d.get("prompt_length_dist", "uniform") not in ("uniform", "loguniform"):
        raise SystemExit(f"data.prompt_length_dist must be 'uniform' or 'loguniform', got {d['prompt_length_dist']!r}")
    for field, names in (("data.tasks", list(d["tasks"])), ("eval.tasks", list(e["tasks"]))):
        unknown = sorted(set(names) - set(TASKS))
        if unknown:
            raise SystemExit(f"{field}: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    if not set(e.get("required") or []) <= set(e["tasks"]):
        raise SystemExit(f"eval.required {e['required']} must be among eval.tasks {e['tasks']}")
    templates = d.get("templates") or {}
    if not templates or set(templates) - set(TEMPLATE_FAMILIES) or any(float(w) <= 0 for w in templates.values()):
        raise SystemExit(f"data.templates must map template families {list(TEMPLATE_FAMILIES)} to positive weights, "
                         f"got {templates!r}")
    target = t.get("target_tokens")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target <= 0):
        raise SystemExit(f"train.target_tokens must be a positive integer or null, got {target!r}")
    if cfg["model"].get("family") not in FAMILY_CLASSES:
        raise SystemExit(f"model.family must be one of {list(FAMILY_CLASSES)}, got {cfg['model'].get('family')!r}")
    init = cfg.get("init_from")
    if init is not None:
        if not Path(init).expanduser().exists():
            raise SystemExit(f"init_from: {init} does not exist (a teacher pack folder or teacher_pack.tar)")
        check_init_model(init_model_config(Path(init).expanduser()), cfg["model"])
    tokens = d.get("synthetic_tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
        raise SystemExit(f"data.synthetic_tokens must be a positive integer or null, got {tokens!r}")


# ----------------------------------------------------------------------------------------------
# text mixture


_SKIP_DIRS = {"__pycache__", ".git", "node_modules", "site-packages", "dist-packages"}


def _walk(root: str, exts: tuple[str, ...], skip_site: bool):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (d in _SKIP_DIRS and (skip_site or d not in ("site-packages", "dist-packages")))]
        for name in filenames:
            if name.endswith(exts):
                yield os.path.join(dirpath, name)


def _read_text(path: str) -> str | None:
    try:
        size = os.path.getsize(path)
        if size < 300 or size > 400_000:
            return None
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    if max((len(line) for line in text.splitlines()), default=0) > 1000:
        return None  # minified / data files
    return text


def _source_files() -> dict[str, list[str]]:
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    stdlib = os.path.realpath(paths["stdlib"])
    pkg_roots = sorted({os.path.realpath(p) for p in [paths["purelib"], paths["platlib"], *site.getsitepackages()] if os.path.isdir(p)})
    stdlib_code = list(_walk(stdlib, (".py",), skip_site=True))
    pkg_code, docs = [], []
    for root in pkg_roots:
        pkg_code += list(_walk(root, (".py",), skip_site=False))
        docs += list(_walk(root, (".rst", ".md", ".txt"), skip_site=False))
    docs += list(_walk(stdlib, (".rst", ".md", ".txt"), skip_site=True))
    for extra in ("/usr/share/doc", "/usr/local/share/doc"):
        if os.path.isdir(extra):
            docs += list(_walk(extra, (".rst", ".md", ".txt"), skip_site=True))
    docs = [p for p in docs if "LICENSE" not in os.path.basename(p).upper() and "/licenses/" not in p.lower()]
    return {"stdlib_code": sorted(set(stdlib_code)), "packages_code": sorted(set(pkg_code)), "docs": sorted(set(docs))}


def collect_text(cfg: dict, rng: random.Random, log) -> tuple[list[str], dict]:
    """Text documents of the mixture (shuffled) and per-source statistics."""
    total = int(cfg["data"]["text_chars"])
    shares = cfg["data"]["sources"]
    files = _source_files()
    seen: set[bytes] = set()
    docs: list[str] = []
    stats: dict = {}
    for name, share in shares.items():
        cap = int(total * float(share))
        got, n = 0, 0
        if name == "corpus":
            corpus = ROOT / "src" / "hybrid_distill" / "data" / "default_corpus" / "corpus.jsonl.gz"
            with gzip.open(corpus, "rt", encoding="utf-8") as f:
                rows = [json.loads(line)["text"] for line in f]
            repeats = 0
            while got < cap and rows:
                for text in rows:
                    if got >= cap:
                        break
                    docs.append(text)
                    got += len(text)
                    n += 1
                repeats += 1
            stats[name] = {"files": len(rows), "docs": n, "chars": got, "repeats": repeats}
            log(f"text source {name}: {n} documents ({repeats} passes over {len(rows)}), {got / 1e6:.1f}M chars")
            continue
        paths = list(files.get(name, []))
        rng.shuffle(paths)
        for path in paths:
            if got >= cap:
                break
            text = _read_text(path)
            if text is None:
                continue
            digest = hashlib.sha1(text.encode()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            docs.append(text)
            got += len(text)
            n += 1
        stats[name] = {"candidates": len(paths), "docs": n, "chars": got}
        log(f"text source {name}: {n} files, {got / 1e6:.1f}M chars (of {len(paths)} candidates)")
    rng.shuffle(docs)
    return docs, stats


# ----------------------------------------------------------------------------------------------
# synthetic recall documents


class RecentEncodings:
    """A tokenizer's ``encode`` that keeps its last ``size`` results: a recall document's prompt, measured
    last by the length fit, is then not tokenized a second time when the worker writes its ids."""

    def __init__(self, tokenizer, size: int = 8):
        self.tokenizer, self.size = tokenizer, size
        self.recent: dict[tuple[str, bool], list[int]] = {}

    def encode(self, text: str, add_special_tokens: bool = False, **kwargs) -> list[int]:
        key = (text, add_special_tokens)
        if key not in self.recent:
            if len(self.recent) >= self.size:
                del self.recent[next(iter(self.recent))]
            self.recent[key] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return self.recent[key]


def _synth_worker(job: dict):
    """Generate recall documents until ``count`` documents, ``tokens`` tokens or ``deadline``: ``(task,
    template, prompt ids, answer ids)`` tuples, or texts without a tokenizer dir."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import numpy as np

    from hybrid_distill.tasks import LengthError, generate_samples

    if job["tokenizer_dir"]:
        from transformers import PreTrainedTokenizerFast

        tok = RecentEncodings(PreTrainedTokenizerFast.from_pretrained(job["tokenizer_dir"]))
    else:
        from hybrid_distill.tokenization import tiny_tokenizer

        tok = tiny_tokenizer(1024)
    tasks, weights = list(job["tasks"]), [float(job["tasks"][t]) for t in job["tasks"]]
    families, family_weights = list(job["templates"]), [float(job["templates"][f]) for f in job["templates"]]
    pmin, pmax = job["prompt_tokens"]
    out, i, made = [], job["worker"], 0
    quota = job["tokens"] if job["tokens"] is not None else math.inf
    while len(out) < job["count"] and made < quota and time.time() < job["deadline"]:
        seed = job["seed_base"] + i
        i += job["workers"]
        r = random.Random(seed)
        task = r.choices(tasks, weights)[0]
        if job["prompt_length_dist"] == "loguniform":
            prompt_len = int(round(math.exp(r.uniform(math.log(pmin), math.log(pmax)))))
        else:
            prompt_len = r.randint(pmin, pmax)
        template = r.choices(families, family_weights)[0] if len(families) > 1 else families[0]
        sample = None
        for _ in range(4):
            try:
                sample = generate_samples(task, tok, prompt_len + TASKS[task].max_new_tokens, 1, seed=seed,
                                          template=template, exact_length=job["exact_length"])[0]
                break
            except LengthError:
                prompt_len += 64
        if sample is None:
            continue
        if not job["tokenizer_dir"]:
            out.append(sample.input_text + sample.completion)
            continue
        p = tok.encode(sample.prompt + sample.answer_prefix, add_special_tokens=False)
        a = tok.encode(sample.completion, add_special_tokens=False)
        if len(p) + len(a) + 2 > job["max_doc"]:
            continue
        out.append((task, template, np.asarray(p, dtype=np.int16), np.asarray(a, dtype=np.int16)))
        made += len(p) + len(a) + 2
    return out


def synth_jobs(cfg: dict, tokenizer_dir: str | None, count: int, seconds: float, seed_base: int, workers: int,
               tokens: int | None = None) -> list[dict]:
    deadline = time.time() + seconds
    per = -(-count // workers)
    d = cfg["data"]
    return [
        {
            "tokenizer_dir": tokenizer_dir,
            "worker": w,
            "workers": workers,
            "count": per,
            "tokens": None if tokens is None else -(-int(tokens) // workers),
            "deadline": deadline,
            "tasks": dict(d["tasks"]),
            "templates": dict(d.get("templates") or {"eval": 1.0}),
            "exact_length": bool(d.get("exact_length", True)),
            "prompt_tokens": list(d["prompt_tokens"]),
            "prompt_length_dist": d.get("prompt_length_dist", "uniform"),
            "seed_base": seed_base,
            "max_doc": int(d["seq_len"]) + 1,
        }
        for w in range(workers)
    ]


# ----------------------------------------------------------------------------------------------
# packing


def pack_rows(text_stream, syn_docs, row_len: int, frac: float, seed: int):
    """Rows of ``row_len`` tokens: recall documents whole, text pieces (cut anywhere) around them.

    ``syn_docs``: (ids, answer_start) with ids = BOS prompt answer EOS; the answer mask covers
    ``ids[answer_start:]`` (answer + EOS). Stops when the recall documents are used up; the
    text stream wraps around if it runs out.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    syn_tokens = sum(len(d) for d, _ in syn_docs)
    n_rows = max(1, math.ceil(syn_tokens / max(frac, 1e-6) / row_len) + 2)
    rows = np.zeros((n_rows, row_len), dtype=np.int16)
    mask = np.zeros((n_rows, row_len), dtype=bool)
    tp, n_text = 0, len(text_stream)
    si, syn_placed, total = 0, 0, 0
    wraps = 0
    r = 0
    while si < len(syn_docs) and r < n_rows:
        pos = 0
        while pos < row_len:
            rem = row_len - pos
            want_syn = si < len(syn_docs) and syn_placed <= frac * total
            if want_syn and len(syn_docs[si][0]) <= rem:
                ids, a0 = syn_docs[si]
                n = len(ids)
                rows[r, pos : pos + n] = ids
                mask[r, pos + a0 : pos + n] = True
                si += 1
                syn_placed += n
            else:
                n = rem if want_syn else int(min(rem, rng.integers(32, row_len + 1)))
                k = 0
                while k < n:
                    take = min(n - k, n_text - tp)
                    rows[r, pos + k : pos + k + take] = text_stream[tp : tp + take]
                    k += take
                    tp += take
                    if tp >= n_text:
                        tp, wraps = 0, wraps + 1
            pos += n
            total += n
        r += 1
    rows, mask = rows[:r], mask[:r]
    stats = {
        "rows": int(r),
        "tokens": int(r * row_len),
        "synthetic_tokens": int(syn_placed),
        "synthetic_fraction": syn_placed / max(1, r * row_len),
        "synthetic_docs_used": int(si),
        "text_tokens_used": int(wraps * n_text + tp),
        "text_stream_tokens": int(n_text),
        "text_passes": (wraps * n_text + tp) / max(1, n_text),
        "answer_tokens": int(mask.sum()),
    }
    return rows, mask, stats


# ----------------------------------------------------------------------------------------------
# training budget


class TrainingBudget:
    """Where the learning-rate schedule stands and when training stops.

    With ``target_tokens``: the schedule runs over that many tokens and training stops there; ``cap_s``
    (seconds) is a safety cap. The speed measured between steps ``RATE_FROM`` and ``RATE_FROM + RATE_STEPS``
    (torch.compile is done by then) decides, once, whether the target fits in ``CAP_MARGIN * cap_s``; if
    not, the target is cut to what fits, so that the schedule still ends. Without a target: the schedule
    runs over ``cap_s`` seconds of training.
    """

    RATE_FROM, RATE_STEPS, CAP_MARGIN = 10, 30, 0.98

    def __init__(self, target_tokens: int | None, cap_s: float, step_tokens: int):
        self.target, self.planned = target_tokens, target_tokens
        self.cap_s, self.step_tokens = float(cap_s), int(step_tokens)
        self.stopped_by: str | None = None
        self._rate_start: tuple[float, int] | None = None

    def fraction(self, tokens: int, elapsed: float) -> float | None:
        """The schedule's position in [0, 1], or None when training must stop (``stopped_by`` says why)."""
        if self.target is not None:
            if tokens >= self.target:
                self.stopped_by = "target_tokens"
            elif elapsed >= self.cap_s:
                self.stopped_by = "max_minutes"
            return None if self.stopped_by else tokens / self.target
        if elapsed >= self.cap_s:
            self.stopped_by = "max_minutes"
            return None
        return elapsed / self.cap_s

    def needs_timing(self, step: int) -> bool:
        return self.target is not None and step in (self.RATE_FROM, self.RATE_FROM + self.RATE_STEPS)

    def observe(self, step: int, tokens: int, elapsed: float) -> list[str]:
        """Record the time after ``step`` (where `needs_timing`); returns what to log (a cut starts with WARNING)."""
        if step == self.RATE_FROM:
            self._rate_start = (elapsed, tokens)
            return []
        t0, n0 = self._rate_start
        rate = (tokens - n0) / max(1e-9, elapsed - t0)
        projected = elapsed + (self.target - tokens) / rate
        msgs = [f"speed {rate / 1e3:.0f}k tokens/s: {self.target / 1e6:.1f}M tokens take about {projected:.0f}s of training"]
        if projected > self.CAP_MARGIN * self.cap_s:
            fits = int(tokens + rate * (self.CAP_MARGIN * self.cap_s - elapsed)) // self.step_tokens * self.step_tokens
            cut = max(tokens + self.step_tokens, fits)
            msgs.append(f"WARNING: max_minutes ({self.cap_s:.0f}s) cannot fit {self.target / 1e6:.1f}M tokens at this speed: "
                        f"the target is cut to {cut / 1e6:.1f}M tokens (the schedule follows the new target)")
            self.target = cut
        return msgs

    def summary(self) -> dict:
        return {"target_tokens_planned": self.planned, "target_tokens": self.target, "stopped_by": self.stopped_by,
                "cut_by_max_minutes": self.target != self.planned or (self.planned is not None
                                                                       and self.stopped_by == "max_minutes")}


# ----------------------------------------------------------------------------------------------
# evaluation


def evaluate_teacher(model, tokenizer, ecfg: dict, log) -> dict:
    """Recall on ``ecfg["tasks"]`` x ``ecfg["lengths"]`` (greedy, batched per task and length), the NIAH grid
    and the gate: every task of ``ecfg["required"]`` at every length scores at least ``ecfg["threshold"]``."""
    from hybrid_distill.evaluation.suite import run_niah, run_recall

    t0 = time.time()
    lengths = [int(n) for n in ecfg["lengths"]]
    rec = run_recall(model, tokenizer, list(ecfg["tasks"]), lengths, int(ecfg["num_samples"]), seed=int(ecfg["seed"]),
                     batch_size=int(ecfg["batch_size"]))
    scores: dict[str, dict[str, list[float]]] = {}
    for r in rec["predictions"]:
        scores.setdefault(r["task"], {}).setdefault(str(r["length"]), []).append(float(r["score"]))
    recall = {t: {n: sum(v) / len(v) for n, v in sorted(by_len.items(), key=lambda kv: int(kv[0]))}
              for t, by_len in scores.items()}
    for t, by_len in recall.items():
        log(f"recall {t}: " + ", ".join(f"{n}: {acc:.3f}" for n, acc in by_len.items()))
    threshold = float(ecfg.get("threshold", 0.9))
    required = list(ecfg.get("required") or [])
    failing = [f"{t}@{n}" for t in required for n in map(str, lengths) if recall.get(t, {}).get(n, 0.0) < threshold]
    report = {
        "recall": recall,
        "gate": {"required": required, "threshold": threshold, "passed": not failing if required else None,
                 "failing": failing},
        "skipped": rec["skipped"],
        "settings": {k: ecfg.get(k) for k in ("tasks", "lengths", "num_samples", "seed", "batch_size", "niah_lengths",
                                              "niah_depths", "niah_samples")},
        "recall_wall_s": time.time() - t0,
        "predictions": [{k: r[k] for k in ("task", "length", "index", "prediction", "answers", "score")}
                        for r in rec["predictions"]],
    }
    if ecfg.get("niah_lengths"):
        t1 = time.time()
        niah = run_niah(model, tokenizer, [int(n) for n in ecfg["niah_lengths"]], [float(d) for d in ecfg["niah_depths"]],
                        int(ecfg["niah_samples"]), seed=int(ecfg["seed"]), batch_size=int(ecfg["batch_size"]))
        report["niah"] = {"table": niah["table"], "mean": niah["mean"], "wall_s": time.time() - t1}
        log(f"NIAH grid: mean {niah['mean']:.3f} in {time.time() - t1:.1f}s")
    report["eval_wall_s"] = time.time() - t0
    if required:
        log(f"gate (>= {threshold} on {required}): " + ("PASSED" if not failing else f"FAILED on {failing}"))
    return report


def eval_markdown(report: dict) -> str:
    """A short table of ``evaluate_teacher``'s results."""
    ev = report["eval"]
    lengths = sorted({n for by_len in ev["recall"].values() for n in by_len}, key=int)
    required = set(ev["gate"]["required"])
    head = report.get("teacher_weights_sha256")
    lines = ["# Teacher evaluation", ""]
    if head:
        lines += [f"Teacher weights SHA-256 (dequantized, scripts/teacher_pack.py): `{head}`", ""]
    lines += [f"Recall, {ev['settings']['num_samples']} samples per cell (seed {ev['settings']['seed']}); "
              f"required tasks (*) need >= {ev['gate']['threshold']} at every length.", "",
              "| task | " + " | ".join(lengths) + " | mean |", "|---|" + "---:|" * (len(lengths) + 1)]
    for task, by_len in ev["recall"].items():
        cells = [f"{by_len[n]:.3f}" if n in by_len else "-" for n in lengths]
        mean = sum(by_len.values()) / len(by_len)
        lines.append(f"| {task}{' *' if task in required else ''} | " + " | ".join(cells) + f" | {mean:.3f} |")
    gate = ev["gate"]
    if gate["required"]:
        lines += ["", "Gate: " + ("**passed**" if gate["passed"] else f"**failed** on {', '.join(gate['failing'])}")]
    if "niah" in ev:
        table = ev["niah"]["table"]
        niah_lengths = sorted({c["length"] for c in table})
        depths = sorted({c["depth"] for c in table})
        cell = {(c["depth"], c["length"]): c["score"] for c in table}
        lines += ["", f"NIAH grid (mean {ev['niah']['mean']:.3f}):", "",
                  "| depth % | " + " | ".join(map(str, niah_lengths)) + " |", "|---|" + "---:|" * len(niah_lengths)]
        lines += [f"| {d:g} | " + " | ".join(f"{cell[(d, n)]:.2f}" for n in niah_lengths) + " |" for d in depths]
    if ev["skipped"]:
        lines += ["", "Skipped (too short): " + ", ".join(f"{s['task']}@{s['length']}" for s in ev["skipped"])]
    return "\n".join(lines) + "\n"


def write_eval(out: Path, report: dict) -> None:
    atomic_write_json(out / "eval.json", report)
    atomic_write_text(out / "eval.md", eval_markdown(report))


# ----------------------------------------------------------------------------------------------
# status, polling and collecting a background run


class Status:
    """``OUT/status.json``: the running step, its start, the process and step-specific progress (atomic)."""

    def __init__(self, out: Path, t_start: float):
        self.path, self.t_start = out / STATUS, t_start
        self.data = {"pid": os.getpid(), "started": t_start, "phase": "starting", "phases": {}}

    def phase(self, name: str, **info) -> None:
        now = time.time()
        self.data.update(phase=name, phase_started=now, elapsed_s=round(now - self.t_start, 1), info=info)
        self.data["phases"][name] = round(now - self.t_start, 1)
        atomic_write_json(self.path, self.data)

    def progress(self, **info) -> None:
        self.data.update(elapsed_s=round(time.time() - self.t_start, 1), info=info)
        atomic_write_json(self.path, self.data)


def collect(out: Path, dest: Path, final: bool) -> list[str]:
    """Copy the run's small files into ``dest``; with ``final`` also the evaluation and the pack as one tar."""
    dest.mkdir(parents=True, exist_ok=True)
    names = [STATUS, "training_log.jsonl"]
    console = out.parent / f"{out.name}.log"
    copied = []
    for name in names:
        if (out / name).is_file():
            shutil.copyfile(out / name, dest / name)
            copied.append(name)
    if console.is_file():
        shutil.copyfile(console, dest / console.name)
        copied.append(console.name)
    if final:
        for name in ("eval.json", "eval.md"):
            if (out / name).is_file():
                shutil.copyfile(out / name, dest / name)
                copied.append(name)
        if (out / "pack").is_dir():
            def write(tmp: str) -> None:
                with tarfile.open(tmp, "w") as tar:
                    for path in sorted((out / "pack").iterdir()):
                        tar.add(path, arcname=f"pack/{path.name}")

            atomic_write(dest / "teacher_pack.tar", write)
            copied.append("teacher_pack.tar")
    return copied


def poll(out: Path, seconds: float, every: float, dest: str | None) -> int:
    """Print the progress of the run writing ``out`` every ``every`` seconds until it ends or ``seconds``
    pass; with ``dest``, copy its small files there each time (and its results once it is done)."""
    t0 = time.time()
    state = "running"
    while True:
        status = read_json(out / STATUS)
        if status is None:
            line = "no status.json yet"
            if time.time() - t0 > NO_STATUS_S:
                state = "not started"
        else:
            info = status.get("info") or {}
            line = f"{status['phase']} at {status.get('elapsed_s', 0):.0f}s " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            if status["phase"] in ("done", "failed"):
                state = status["phase"]
            elif not pid_alive(int(status["pid"])):
                state = "died"
                line += f" -- process {status['pid']} is gone without finishing"
        print(f"[poll {time.time() - t0:5.0f}s] {line}", flush=True)
        if dest:
            collect(out, Path(dest), final=state == "done")
        if state != "running" or time.time() - t0 + every > seconds:
            break
        time.sleep(every)
    console = out.parent / f"{out.name}.log"
    if console.is_file():
        print("\n".join(console.read_text(errors="replace").splitlines()[-25:]))
    if state == "done" and (out / "eval.md").is_file():
        print((out / "eval.md").read_text())
    print(f"run state: {state}")
    return 0 if state in ("running", "done") else 1


# ----------------------------------------------------------------------------------------------
# main


def write_text_jsonl(path: str, texts: list[str]) -> None:
    """Gzipped JSONL of {"text": ...} records, written atomically."""

    def write(tmp: str) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:  # a working file: speed over size
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")

    atomic_write(path, write)


def text_digest(texts: list[str]) -> str:
    """SHA-256 of the text documents in order (a later run that collects the text again can compare)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=[str(ROOT / "scripts" / "pretrain_teacher.yaml")],
                        help="YAML config(s), later files overriding earlier ones (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder: teacher/, training_log.jsonl, eval.json, status.json")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget (or, with train.target_tokens, "
                        "cap) of the training loop (overrides train.max_minutes)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="data worker processes (default: CPUs - 1, at most 15)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--text-out", default=None, metavar="PATH.jsonl.gz",
                        help="also write the generic text documents (no recall documents) as gzipped JSONL, "
                        "a `data.source` for distilling on the same text")
    parser.add_argument("--text-only", action="store_true",
                        help="with --text-out: only collect the generic text and write it (step 1), no training")
    parser.add_argument("--text-sha256", default=None, metavar="HEX",
                        help="the text's expected digest (a teacher's training_log.jsonl records it): a machine "
                        "whose text differs stops with an error before anything is trained or written")
    parser.add_argument("--evaluate", default=None, metavar="TEACHER_DIR",
                        help="only evaluate the teacher in TEACHER_DIR (e.g. an unpacked pack) with the config's eval "
                        "section -> OUT/eval.json, OUT/eval.md")
    parser.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                        help="watch the run writing OUT (started in the background) for at most SECONDS")
    parser.add_argument("--every", type=float, default=30.0, help="--poll: seconds between reports (default: %(default)s)")
    parser.add_argument("--collect", default=None, metavar="DIR", help="--poll: copy the run's small files (and, once "
                        "it is done, eval.json, eval.md and teacher_pack.tar) into DIR")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. train.batch_size=64")
    args = parser.parse_args(argv)
    if args.poll is not None:
        return poll(Path(args.out), args.poll, args.every, args.collect)

    cfg = load_config(args.config, args.set)
    if args.max_minutes is not None:
        cfg["train"]["max_minutes"] = args.max_minutes
    if args.seed is not None:
        cfg["seed"] = args.seed
    if args.evaluate:
        return evaluate_only(args, cfg)
    if args.text_only:
        return text_only(args, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = Status(out, time.time())
    status.phase("starting")
    try:
        return pretrain(args, cfg, out, status)
    except BaseException as err:
        status.phase("failed", error=f"{type(err).__name__}: {err}")
        raise


class TextMismatch(RuntimeError):
    """The machine's generic text differs from the one a run expects (another image, other installed packages)."""


def checked_text(cfg: dict, expected: str | None, log) -> tuple[list[str], dict]:
    """`collect_text` with the config's seed, refused when its digest is not ``expected`` (None: any)."""
    texts, stats = collect_text(cfg, random.Random(int(cfg["seed"])), log)
    stats["sha256"] = text_digest(texts)
    if expected is not None and stats["sha256"] != expected:
        raise TextMismatch(f"this machine's generic text has sha256 {stats['sha256']}, not the expected {expected}: "
                           "its Python install differs from the one the teacher was trained on, so distillation data "
                           "made here would differ too")
    return texts, stats


def text_only(args, cfg: dict) -> int:
    """Step 1 alone: the generic text the teacher trained on, written to ``--text-out`` (its digest checked)."""
    if not args.text_out:
        raise SystemExit("--text-only needs --text-out PATH.jsonl.gz")
    t0 = time.time()
    texts, stats = checked_text(cfg, args.text_sha256, lambda msg: print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True))
    write_text_jsonl(args.text_out, texts)
    atomic_write_json(text_record(args.text_out), {"sha256": stats["sha256"], "documents": len(texts),
                                                   "chars": sum(map(len, texts)), "sources": stats})
    print(f"{args.text_out}: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M chars, sha256 {stats['sha256']}")
    return 0


def text_record(text_path: str | Path) -> Path:
    """Where ``--text-only`` records what it wrote (digest, documents, characters): beside the text file."""
    return Path(f"{text_path}.json")


def _load_for_eval(teacher_dir: str | Path, device):
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).to(device).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(teacher_dir)


def evaluate_only(args, cfg: dict) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = _load_for_eval(args.evaluate, device)
    pack_info = read_json(Path(args.evaluate) / "teacher_pack.json") or {}
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "teacher": str(args.evaluate),
        "teacher_weights_sha256": pack_info.get("dequantized_weights_sha256"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "command": " ".join(sys.argv),
        "eval": evaluate_teacher(model, tok, cfg["eval"], log),
    }
    write_eval(out, report)
    log(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


def unpack_init(source: Path, dest: Path) -> tuple[Path, str]:
    """The teacher checkpoint of the pack at ``source`` (a pack folder, or a tar holding ``pack/``), unpacked into
    ``dest``, and its dequantized weights' SHA-256."""
    import teacher_pack

    try:
        manifest = teacher_pack.unpack(source, dest)
    except (teacher_pack.PackError, OSError) as err:
        raise SystemExit(f"init_from: {source} is not a teacher pack ({err})") from None
    return dest, manifest["dequantized_weights_sha256"]


def init_model_config(source: Path) -> dict:
    """The ``config.json`` of the teacher pack at ``source`` (a pack folder, or a tar holding ``pack/``)."""
    try:
        if source.is_file():
            with tarfile.open(source) as tar:
                return json.load(tar.extractfile("pack/config.json"))
        return json.loads((source / "config.json").read_text())
    except (OSError, KeyError, tarfile.TarError, json.JSONDecodeError, AttributeError) as err:
        raise SystemExit(f"init_from: {source} is not a teacher pack (no readable config.json: {err})") from None


def check_init_model(found: dict, model_cfg: dict) -> None:
    """SystemExit naming each `model` setting that the init_from checkpoint's config (``found``) does not have."""
    found = {**found, "rope_theta": (found.get("rope_parameters") or {}).get("rope_theta", found.get("rope_theta")),
             "family": found.get("model_type")}
    differ = [f"model.{k}: {v!r} in the config, {found.get(k)!r} in init_from" for k, v in model_cfg.items()
              if found.get(k) != v]
    if differ:
        raise SystemExit("init_from's model differs from the config's: " + "; ".join(differ))


def model_classes(family: str):
    """(config class, causal-LM class) of a teacher family."""
    import transformers

    prefix = FAMILY_CLASSES[family]
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")


def pretrain(args, cfg: dict, out: Path, status: Status) -> int:
    import multiprocessing as mp

    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from hybrid_distill.tokenization import train_tokenizer

    t_start = status.t_start
    log_path = out / "training_log.jsonl"
    log_file = open(log_path, "w")  # noqa: SIM115 (closed before the evaluation)

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    def log_json(rec: dict) -> None:
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = args.workers or max(1, min(15, (os.cpu_count() or 2) - 1))
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    log_json({"event": "config", "config": cfg, "device": str(device), "workers": workers, "argv": sys.argv})
    dcfg, tcfg = cfg["data"], cfg["train"]
    seq_len = int(dcfg["seq_len"])
    ctx = mp.get_context("spawn")
    timings: dict = {}

    # 1. text
    status.phase("collect_text")
    t0 = time.time()
    texts, text_stats = checked_text(cfg, args.text_sha256, log)
    timings["collect_text_s"] = time.time() - t0
    log(f"text: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M chars in {timings['collect_text_s']:.1f}s "
        f"(sha256 {text_stats['sha256'][:16]})")
    if args.text_out:
        write_text_jsonl(args.text_out, texts)
        log(f"text documents written to {args.text_out}")

    # 2. tokenizer (text sample + recall documents written with a throwaway tokenizer)
    status.phase("tokenizer")
    t0 = time.time()
    tok_cfg = cfg["tokenizer"]
    tok_dir = out / "teacher"
    init_dir = None
    if cfg.get("init_from"):
        init_dir, init_sha = unpack_init(Path(cfg["init_from"]).expanduser(), out / "init_teacher")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(init_dir)
        log(f"init_from {cfg['init_from']}: teacher weights sha256 {init_sha}; its tokenizer (vocab {len(tokenizer)})")
    else:
        with ctx.Pool(workers) as pool:
            jobs = synth_jobs(cfg, None, int(tok_cfg["synthetic_docs"]), 60, int(dcfg["synthetic_seed"]) + 50_000_000,
                              workers)
            syn_texts = [t for part in pool.map(_synth_worker, jobs) for t in part]
        tok_texts, got = [], 0
        for t in texts:
            if got >= int(tok_cfg["train_chars"]):
                break
            tok_texts.append(t)
            got += len(t)
        tokenizer = train_tokenizer(tok_texts + syn_texts, vocab_size=int(tok_cfg["vocab_size"]))
        tokenizer.model_max_length = int(cfg["model"]["max_position_embeddings"])
        log(f"tokenizer: vocab {len(tokenizer)} trained on {got / 1e6:.1f}M chars + {len(syn_texts)} recall docs")
    tokenizer.save_pretrained(tok_dir)
    timings["tokenizer_s"] = time.time() - t0
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    # 3. recall documents (worker processes) while this process tokenizes the text
    status.phase("recall_documents")
    t0 = time.time()
    pool = ctx.Pool(workers)
    jobs = synth_jobs(cfg, str(tok_dir), int(dcfg["synthetic_docs"]), float(dcfg["synthetic_seconds"]),
                      int(dcfg["synthetic_seed"]), workers, tokens=dcfg.get("synthetic_tokens"))
    pending = pool.map_async(_synth_worker, jobs)
    encoded = tokenizer._tokenizer.encode_batch(texts, add_special_tokens=False)
    pieces = []
    for e in encoded:
        pieces += [np.array([bos], dtype=np.int16), np.asarray(e.ids, dtype=np.int16), np.array([eos], dtype=np.int16)]
    text_stream = np.concatenate(pieces)
    del encoded, pieces
    timings["tokenize_text_s"] = time.time() - t0
    log(f"text tokens: {len(text_stream) / 1e6:.1f}M ({sum(map(len, texts)) / max(1, len(text_stream)):.2f} chars/token) in {timings['tokenize_text_s']:.1f}s")
    results = pending.get()
    pool.close()
    pool.join()
    syn = [x for part in results for x in part]
    timings["synthetic_s"] = time.time() - t0
    task_counts: dict = {}
    task_tokens: dict = {}
    template_counts: dict = {}
    syn_docs = []
    for task, template, p, a in syn:
        task_counts[task] = task_counts.get(task, 0) + 1
        task_tokens[task] = task_tokens.get(task, 0) + len(p) + len(a) + 2
        template_counts[template] = template_counts.get(template, 0) + 1
        ids = np.concatenate([np.array([bos], dtype=np.int16), p, a, np.array([eos], dtype=np.int16)])
        syn_docs.append((ids, 1 + len(p)))
    random.Random(seed + 1).shuffle(syn_docs)
    syn_total = sum(len(d) for d, _ in syn_docs)
    log(f"recall documents: {len(syn_docs)} ({syn_total / 1e6:.1f}M tokens) in {timings['synthetic_s']:.1f}s: "
        f"{task_counts}; templates {template_counts}")

    # 4. packing
    status.phase("packing")
    t0 = time.time()
    rows, mask, pack_stats = pack_rows(text_stream, syn_docs, seq_len + 1, float(dcfg["synthetic_fraction"]), seed)
    perm = np.random.default_rng(seed).permutation(len(rows))
    rows, mask = rows[perm], mask[perm]
    n_val = min(int(dcfg["heldout_rows"]), len(rows) // 10)
    timings["pack_s"] = time.time() - t0
    log(f"packed: {json.dumps(pack_stats)}; {n_val} rows held out")
    data_stats = {"text_sources": text_stats, "recall_docs_per_task": task_counts, "recall_tokens_per_task": task_tokens,
                  "recall_docs_per_template": template_counts, "packing": pack_stats, "heldout_rows": n_val}
    log_json({"event": "data", **data_stats, "timings": timings})

    # 5. model + training
    mcfg = cfg["model"]
    config_class, model_class = model_classes(mcfg["family"])
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=mcfg["hidden_size"],
        intermediate_size=mcfg["intermediate_size"],
        num_hidden_layers=mcfg["num_hidden_layers"],
        num_attention_heads=mcfg["num_attention_heads"],
        num_key_value_heads=mcfg["num_key_value_heads"],
        max_position_embeddings=mcfg["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": float(mcfg["rope_theta"])},
        tie_word_embeddings=bool(mcfg["tie_word_embeddings"]),
        rms_norm_eps=float(mcfg["rms_norm_eps"]),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        **({"head_dim": mcfg["hidden_size"] // mcfg["num_attention_heads"]} if mcfg["family"] == "qwen3" else {}),
    )
    config._attn_implementation = "sdpa"
    if init_dir is not None:
        model = model_class.from_pretrained(init_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    else:
        model = model_class(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters ({n_params * 4 / 2**20:.1f} MiB fp32)")

    val_rows = torch.from_numpy(rows[:n_val].astype(np.int64)).to(device)
    val_mask = torch.from_numpy(mask[:n_val]).to(device)
    train_rows = torch.from_numpy(rows[n_val:]).to(device)  # int16
    train_mask = torch.from_numpy(mask[n_val:]).to(device)
    n_train = train_rows.shape[0]
    del rows, mask

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(tcfg["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(tcfg["lr"]),
        betas=tuple(tcfg["betas"]),
        fused=device.type == "cuda",
    )
    use_amp = device.type == "cuda"
    aw = float(dcfg["answer_loss_weight"])
    vocab = config.vocab_size

    def forward_loss(m, x, y, w):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = m(input_ids=x).logits
        ce = F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1), reduction="none").view_as(y)
        return (ce * w).sum() / w.sum(), ce.detach()

    step_model = model
    compiled = False
    if tcfg.get("compile") and device.type == "cuda":
        step_model = torch.compile(model)
        compiled = True

    budget_s = float(tcfg["max_minutes"]) * 60
    batch = int(tcfg["batch_size"])
    step_tokens = batch * seq_len
    budget = TrainingBudget(int(tcfg["target_tokens"]) if tcfg.get("target_tokens") else None, budget_s, step_tokens)
    lr_peak, min_ratio, warm = float(tcfg["lr"]), float(tcfg["min_lr_ratio"]), int(tcfg["warmup_steps"])

    def lr_at(step: int, frac: float) -> float:
        if step < warm:
            return lr_peak * (step + 1) / warm
        return lr_peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    @torch.no_grad()
    def validate(m) -> dict:
        m.eval()
        tot, tot_w, ans, ans_n = 0.0, 0, 0.0, 0
        for i in range(0, n_val, batch):
            xb = val_rows[i : i + batch]
            mb = val_mask[i : i + batch, 1:]
            _, ce = forward_loss(m, xb[:, :-1], xb[:, 1:], torch.ones_like(mb, dtype=torch.float32))
            tot += ce.sum().item()
            tot_w += ce.numel()
            ans += (ce * mb).sum().item()
            ans_n += int(mb.sum().item())
        m.train()
        return {"val_loss": tot / max(1, tot_w), "val_answer_loss": ans / max(1, ans_n)}

    status.phase("training", target_tokens=budget.target, max_minutes=float(tcfg["max_minutes"]))
    model.train()
    t_train = time.time()
    step, tokens, epoch = 0, 0, 0
    order = torch.randperm(n_train, device=device)
    cursor = 0
    run_loss = torch.zeros((), device=device)
    run_n = 0
    last_log_t, last_log_tokens = time.time(), 0
    final: dict = {}
    goal = f"target {budget.target / 1e6:.1f}M tokens, cap {budget_s:.0f}s" if budget.target else f"budget {budget_s:.0f}s"
    log(f"training: {n_train} rows x {seq_len + 1}, batch {batch} ({step_tokens} tokens/step), {goal}, compile={compiled}")
    while True:
        frac = budget.fraction(tokens, time.time() - t_train)
        if frac is None:
            if budget.stopped_by == "max_minutes" and budget.target is not None:
                log(f"WARNING: max_minutes ({budget_s:.0f}s) stopped training at {tokens / 1e6:.1f}M of "
                    f"{budget.target / 1e6:.1f}M tokens, before the end of the learning-rate schedule")
            break
        if cursor + batch > n_train:
            order = torch.randperm(n_train, device=device)
            cursor, epoch = 0, epoch + 1
        idx = order[cursor : cursor + batch]
        cursor += batch
        xb = train_rows[idx].long()
        mb = train_mask[idx, 1:]
        w = 1.0 + (aw - 1.0) * mb.float()
        lr = lr_at(step, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        try:
            loss, ce = forward_loss(step_model, xb[:, :-1], xb[:, 1:], w)
            loss.backward()
        except Exception as err:  # torch.compile trouble: fall back to eager once
            if step_model is model:
                raise
            log(f"torch.compile failed ({type(err).__name__}: {err}); continuing in eager mode")
            opt.zero_grad(set_to_none=True)
            step_model, compiled = model, False
            loss, ce = forward_loss(step_model, xb[:, :-1], xb[:, 1:], w)
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += step_tokens
        run_loss += loss.detach()
        run_n += 1
        if step == 1:
            log(f"first step done at {time.time() - t_train:.1f}s (compile included)")
        if budget.needs_timing(step):
            if device.type == "cuda":
                torch.cuda.synchronize()
            for msg in budget.observe(step, tokens, time.time() - t_train):
                log(msg)
        if step % int(tcfg["log_every"]) == 0:
            now = time.time()
            rec = {
                "step": step,
                "tokens": tokens,
                "epoch": epoch,
                "loss": run_loss.item() / run_n,
                "answer_loss": ((ce * mb).sum() / mb.sum().clamp(min=1)).item(),
                "lm_loss": ce.mean().item(),
                "lr": lr,
                "grad_norm": float(gnorm),
                "elapsed_s": now - t_train,
                "tokens_per_s": (tokens - last_log_tokens) / max(1e-9, now - last_log_t),
            }
            if step % int(tcfg["val_every"]) == 0:
                rec.update(validate(model))
            log_json(rec)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            eta = (budget.target - tokens) / rec["tokens_per_s"] if budget.target else budget_s - rec["elapsed_s"]
            status.progress(step=step, tokens=tokens, target_tokens=budget.target, loss=rec["loss"],
                            tokens_per_s=rec["tokens_per_s"], train_s=rec["elapsed_s"], eta_s=max(0.0, eta))
            final = rec
            run_loss.zero_()
            run_n = 0
            last_log_t, last_log_tokens = now, tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_train
    timings["train_s"] = train_s
    val = validate(model)
    summary = {
        "event": "done",
        "steps": step,
        "tokens": tokens,
        **budget.summary(),
        "epochs": epoch + cursor / max(1, n_train),
        "train_wall_s": train_s,
        "tokens_per_s": tokens / train_s,
        "tokens_per_parameter": tokens / n_params,
        "final_train_loss": final.get("loss"),
        "final_answer_loss": final.get("answer_loss"),
        **val,
        "compiled": compiled,
        "params": n_params,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    log_json(summary)
    log(f"done: {json.dumps(summary)}")

    # 6. save (fp32)
    status.phase("save")
    t0 = time.time()
    model = model.float().eval()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False)
    model.save_pretrained(tok_dir)
    tokenizer.save_pretrained(tok_dir)
    timings["save_s"] = time.time() - t0
    log(f"saved {tok_dir} in {timings['save_s']:.1f}s: {sorted(p.name for p in tok_dir.iterdir())}")

    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": summary["device"],
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "total_wall_s": None,
        "timings": timings,
        "train": {k: v for k, v in summary.items() if k != "event"},
        "data": data_stats,
    }

    # 7. the int8 pack, and the dequantized teacher it defines
    eval_model, eval_dir = model, tok_dir
    if cfg.get("pack"):
        import teacher_pack

        status.phase("pack")
        t0 = time.time()
        manifest = teacher_pack.pack(tok_dir, out / "pack")
        timings["pack_teacher_s"] = time.time() - t0
        size = teacher_pack.pack_size(out / "pack")
        log(f"pack: {out / 'pack'} is {size / 2**20:.2f} MiB ({size:,} bytes) in {timings['pack_teacher_s']:.1f}s; "
            f"teacher weights sha256 {manifest['dequantized_weights_sha256']}")
        t0 = time.time()
        eval_dir = out / "teacher_dequantized"
        teacher_pack.unpack(out / "pack", eval_dir)
        eval_model, _ = _load_for_eval(eval_dir, device)
        timings["unpack_s"] = time.time() - t0
        deq_val = validate(eval_model)
        with torch.no_grad():
            xb = val_rows[: min(4, n_val), :-1]
            ref, got = model(input_ids=xb).logits, eval_model(input_ids=xb).logits
            rel = ((got - ref).norm() / ref.norm()).item()
        report["pack"] = {"bytes": size, "files": manifest["files"], "dequantized_weights_sha256":
                          manifest["dequantized_weights_sha256"], "val_fp32": val, "val_dequantized": deq_val,
                          "logits_relative_error": rel}
        report["teacher_weights_sha256"] = manifest["dequantized_weights_sha256"]
        log(f"dequantized teacher ({eval_dir}, unpacked and loaded in {timings['unpack_s']:.1f}s): val_loss "
            f"{val['val_loss']:.4f} -> {deq_val['val_loss']:.4f}, answer loss {val['val_answer_loss']:.4f} -> "
            f"{deq_val['val_answer_loss']:.4f}, logits relative error {rel:.4f}")
    log_file.close()

    # 8. recall evaluation of the teacher that later runs use
    if not args.skip_eval:
        status.phase("evaluation")
        tok = PreTrainedTokenizerFast.from_pretrained(eval_dir)
        report["eval"] = evaluate_teacher(eval_model, tok, cfg["eval"], log)
        timings["eval_s"] = report["eval"]["eval_wall_s"]
        report["recall"] = report["eval"]["recall"]
        log(f"evaluation in {timings['eval_s']:.1f}s")
    report["total_wall_s"] = time.time() - t_start
    if args.skip_eval:
        atomic_write_json(out / "eval.json", {**report, "recall": {}})
        log("recall: not evaluated (--skip-eval)")
    else:
        write_eval(out, report)
    log("wall time per phase: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        + f"; total {report['total_wall_s']:.1f}s")
    status.phase("done", total_wall_s=round(report["total_wall_s"], 1),
                 gate=report.get("eval", {}).get("gate", {}).get("passed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
