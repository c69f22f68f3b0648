#!/usr/bin/env python3
"""Pretrain the shipped tiny teacher from scratch: a small Llama (GQA, tied embeddings) with strong
in-context recall, small enough for the CPU distillation pipeline to distill in minutes.

Steps (all on the machine that runs it; no network, no downloads):

1. text mixture: the embedded corpus, Python standard-library sources, installed packages' sources
   and the .rst/.md/.txt docs found on the machine (deduplicated, capped per source);
2. a byte-level BPE tokenizer (``hybrid_distill.tokenization.train_tokenizer``) trained on that text
   plus recall documents;
3. synthetic recall documents from the project's own generators
   (``hybrid_distill.tasks.generate_samples``, seeds >= ``data.synthetic_seed``, disjoint from
   the evaluation seeds), written as ``BOS prompt answer_prefix answer EOS`` (answer tokens weighted
   ``data.answer_loss_weight`` in the loss), in worker processes;
4. packed rows of ``seq_len + 1`` tokens (recall documents never split across rows), about
   ``data.synthetic_fraction`` of the tokens synthetic;
5. AdamW, linear warm-up then cosine decay over the wall-clock budget ``--max-minutes``, bf16 autocast
   on CUDA, ``torch.compile`` when it works;
6. save model + tokenizer (``OUT/teacher``), ``OUT/training_log.jsonl``, then the recall harness
   (``hybrid_distill.evaluation.runner.run_samples``) on held-out seeds -> ``OUT/eval.json``.

    python scripts/pretrain_teacher.py --config scripts/pretrain_teacher.yaml --out runs/tiny_teacher
    python scripts/pretrain_teacher.py --config scripts/pretrain_teacher.yaml --out /tmp/t --max-minutes 0.2 \
        --set train.batch_size=4 data.synthetic_docs=300 data.text_chars=2000000   # CPU smoke test
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
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

DEFAULTS: dict = {
    "seed": 0,
    "model": {
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
        "prompt_tokens": [96, 500],
        "prompt_length_dist": "uniform",  # or "loguniform": more short documents, the same range
        "answer_loss_weight": 4.0,
        "tasks": {"niah_single_1": 1, "kv_retrieval": 1, "mqar": 1, "vt": 1},
        "heldout_rows": 512,
    },
    "train": {
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
        "lengths": [256, 512],
        "num_samples": 20,
        "seed": 0,
        "batch_size": 20,
    },
}


# ----------------------------------------------------------------------------------------------
# config


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("tasks", "sources"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | None, sets: list[str]) -> dict:
    import yaml

    cfg = copy.deepcopy(DEFAULTS)
    if path:
        with open(path) as f:
            cfg = _merge(cfg, yaml.safe_load(f) or {})
    for item in sets:
        key, _, raw = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    if cfg["data"].get("prompt_length_dist", "uniform") not in ("uniform", "loguniform"):
        raise SystemExit(f"data.prompt_length_dist must be 'uniform' or 'loguniform', got {cfg['data']['prompt_length_dist']!r}")
    return cfg


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


def _synth_worker(job: dict):
    """Generate recall documents until ``count`` or ``deadline``; token ids (or texts without a tokenizer dir)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import numpy as np

    from hybrid_distill.tasks import TASKS, LengthError, generate_samples

    if job["tokenizer_dir"]:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(job["tokenizer_dir"])
    else:
        from hybrid_distill.tokenization import tiny_tokenizer

        tok = tiny_tokenizer(1024)
    tasks, weights = list(job["tasks"]), [float(job["tasks"][t]) for t in job["tasks"]]
    pmin, pmax = job["prompt_tokens"]
    out, i = [], job["worker"]
    while len(out) < job["count"] and time.time() < job["deadline"]:
        seed = job["seed_base"] + i
        i += job["workers"]
        r = random.Random(seed)
        task = r.choices(tasks, weights)[0]
        if job["prompt_length_dist"] == "loguniform":
            prompt_len = int(round(math.exp(r.uniform(math.log(pmin), math.log(pmax)))))
        else:
            prompt_len = r.randint(pmin, pmax)
        sample = None
        for _ in range(4):
            try:
                sample = generate_samples(task, tok, prompt_len + TASKS[task].max_new_tokens, 1, seed=seed)[0]
                break
            except LengthError:
                prompt_len += 64
        if sample is None:
            continue
        if not job["tokenizer_dir"]:
            out.append(sample.input_text + sample.completion)
            continue
        p = tok(sample.prompt + sample.answer_prefix, add_special_tokens=False).input_ids
        a = tok(sample.completion, add_special_tokens=False).input_ids
        if len(p) + len(a) + 2 > job["max_doc"]:
            continue
        out.append((task, np.asarray(p, dtype=np.int16), np.asarray(a, dtype=np.int16)))
    return out


def synth_jobs(cfg: dict, tokenizer_dir: str | None, count: int, seconds: float, seed_base: int, workers: int) -> list[dict]:
    deadline = time.time() + seconds
    per = -(-count // workers)
    return [
        {
            "tokenizer_dir": tokenizer_dir,
            "worker": w,
            "workers": workers,
            "count": per,
            "deadline": deadline,
            "tasks": dict(cfg["data"]["tasks"]),
            "prompt_tokens": list(cfg["data"]["prompt_tokens"]),
            "prompt_length_dist": cfg["data"].get("prompt_length_dist", "uniform"),
            "seed_base": seed_base,
            "max_doc": int(cfg["data"]["seq_len"]) + 1,
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
# main


def write_text_jsonl(path: str, texts: list[str]) -> None:
    """Gzipped JSONL of {"text": ...} records, written atomically."""
    import gzip

    from hybrid_distill.fileio import atomic_write

    def write(tmp: str) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:  # a working file: speed over size
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")

    atomic_write(path, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "scripts" / "pretrain_teacher.yaml"), help="YAML config (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder: teacher/, training_log.jsonl, eval.json")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the training loop (overrides train.max_minutes)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="data worker processes (default: CPUs - 1, at most 15)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--text-out", default=None, metavar="PATH.jsonl.gz",
                        help="also write the generic text documents (no recall documents) as gzipped JSONL, "
                        "a `data.source` for distilling on the same text")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. train.batch_size=64")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.set)
    if args.max_minutes is not None:
        cfg["train"]["max_minutes"] = args.max_minutes
    if args.seed is not None:
        cfg["seed"] = args.seed

    import multiprocessing as mp

    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from hybrid_distill.fileio import atomic_write_json
    from hybrid_distill.tokenization import train_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
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
    rng = random.Random(seed)
    torch.manual_seed(seed)
    log_json({"event": "config", "config": cfg, "device": str(device), "workers": workers, "argv": sys.argv})
    dcfg, tcfg = cfg["data"], cfg["train"]
    seq_len = int(dcfg["seq_len"])
    ctx = mp.get_context("spawn")
    timings: dict = {}

    # 1. text
    t0 = time.time()
    texts, text_stats = collect_text(cfg, rng, log)
    timings["collect_text_s"] = time.time() - t0
    log(f"text: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M chars")
    if args.text_out:
        write_text_jsonl(args.text_out, texts)
        log(f"text documents written to {args.text_out}")

    # 2. tokenizer (text sample + recall documents written with a throwaway tokenizer)
    t0 = time.time()
    tok_cfg = cfg["tokenizer"]
    with ctx.Pool(workers) as pool:
        jobs = synth_jobs(cfg, None, int(tok_cfg["synthetic_docs"]), 60, int(dcfg["synthetic_seed"]) + 50_000_000, workers)
        syn_texts = [t for part in pool.map(_synth_worker, jobs) for t in part]
    tok_texts, got = [], 0
    for t in texts:
        if got >= int(tok_cfg["train_chars"]):
            break
        tok_texts.append(t)
        got += len(t)
    tokenizer = train_tokenizer(tok_texts + syn_texts, vocab_size=int(tok_cfg["vocab_size"]))
    tokenizer.model_max_length = int(cfg["model"]["max_position_embeddings"])
    tok_dir = out / "teacher"
    tokenizer.save_pretrained(tok_dir)
    timings["tokenizer_s"] = time.time() - t0
    log(f"tokenizer: vocab {len(tokenizer)} trained on {got / 1e6:.1f}M chars + {len(syn_texts)} recall docs in {timings['tokenizer_s']:.1f}s")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    # 3. recall documents (worker processes) while this process tokenizes the text
    t0 = time.time()
    pool = ctx.Pool(workers)
    jobs = synth_jobs(cfg, str(tok_dir), int(dcfg["synthetic_docs"]), float(dcfg["synthetic_seconds"]), int(dcfg["synthetic_seed"]), workers)
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
    syn_docs = []
    for task, p, a in syn:
        task_counts[task] = task_counts.get(task, 0) + 1
        ids = np.concatenate([np.array([bos], dtype=np.int16), p, a, np.array([eos], dtype=np.int16)])
        syn_docs.append((ids, 1 + len(p)))
    random.Random(seed + 1).shuffle(syn_docs)
    log(f"recall documents: {len(syn_docs)} ({sum(len(d) for d, _ in syn_docs) / 1e6:.1f}M tokens) in {timings['synthetic_s']:.1f}s: {task_counts}")

    # 4. packing
    t0 = time.time()
    rows, mask, pack_stats = pack_rows(text_stream, syn_docs, seq_len + 1, float(dcfg["synthetic_fraction"]), seed)
    perm = np.random.default_rng(seed).permutation(len(rows))
    rows, mask = rows[perm], mask[perm]
    n_val = min(int(dcfg["heldout_rows"]), len(rows) // 10)
    timings["pack_s"] = time.time() - t0
    log(f"packed: {json.dumps(pack_stats)}; {n_val} rows held out")
    data_stats = {"text_sources": text_stats, "recall_docs_per_task": task_counts, "packing": pack_stats, "heldout_rows": n_val}
    log_json({"event": "data", **data_stats, "timings": timings})

    # 5. model + training
    mcfg = cfg["model"]
    config = LlamaConfig(
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
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
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
    lr_peak, min_ratio, warm = float(tcfg["lr"]), float(tcfg["min_lr_ratio"]), int(tcfg["warmup_steps"])

    def lr_at(step: int, frac: float) -> float:
        if step < warm:
            return lr_peak * (step + 1) / warm
        return lr_peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    @torch.no_grad()
    def validate() -> dict:
        model.eval()
        tot, tot_w, ans, ans_n = 0.0, 0, 0.0, 0
        for i in range(0, n_val, batch):
            xb = val_rows[i : i + batch]
            mb = val_mask[i : i + batch, 1:]
            _, ce = forward_loss(model, xb[:, :-1], xb[:, 1:], torch.ones_like(mb, dtype=torch.float32))
            tot += ce.sum().item()
            tot_w += ce.numel()
            ans += (ce * mb).sum().item()
            ans_n += int(mb.sum().item())
        model.train()
        return {"val_loss": tot / max(1, tot_w), "val_answer_loss": ans / max(1, ans_n)}

    model.train()
    t_train = time.time()
    step, tokens, epoch = 0, 0, 0
    order = torch.randperm(n_train, device=device)
    cursor = 0
    run_loss = torch.zeros((), device=device)
    run_n = 0
    last_log_t, last_log_tokens = time.time(), 0
    final: dict = {}
    log(f"training: {n_train} rows x {seq_len + 1}, batch {batch} ({batch * seq_len} tokens/step), budget {budget_s:.0f}s, compile={compiled}")
    while True:
        elapsed = time.time() - t_train
        frac = elapsed / budget_s
        if frac >= 1.0:
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
        tokens += batch * seq_len
        run_loss += loss.detach()
        run_n += 1
        if step == 1:
            log(f"first step done at {time.time() - t_train:.1f}s (compile included)")
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
                rec.update(validate())
            log_json(rec)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            final = rec
            run_loss.zero_()
            run_n = 0
            last_log_t, last_log_tokens = now, tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_train
    val = validate()
    summary = {
        "event": "done",
        "steps": step,
        "tokens": tokens,
        "epochs": epoch + cursor / max(1, n_train),
        "train_wall_s": train_s,
        "tokens_per_s": tokens / train_s,
        "final_train_loss": final.get("loss"),
        "final_answer_loss": final.get("answer_loss"),
        **val,
        "compiled": compiled,
        "params": n_params,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    log_json(summary)
    log(f"done: {json.dumps(summary)}")

    # 6. save (fp32) + recall evaluation
    model = model.float().eval()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False)
    model.save_pretrained(tok_dir)
    tokenizer.save_pretrained(tok_dir)
    log(f"saved {tok_dir}: {sorted(p.name for p in tok_dir.iterdir())}")
    log_file.close()

    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": summary["device"],
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "total_wall_s": None,
        "timings": timings,
        "train": {k: v for k, v in summary.items() if k != "event"},
        "data": data_stats,
        "recall": {},
    }
    if not args.skip_eval:
        from hybrid_distill.tasks import generate_samples
        from hybrid_distill.evaluation.runner import run_samples

        ecfg = cfg["eval"]
        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        t0 = time.time()
        for task in ecfg["tasks"]:
            for length in ecfg["lengths"]:
                samples = generate_samples(task, tok, int(length), int(ecfg["num_samples"]), seed=int(ecfg["seed"]))
                preds = run_samples(model, tok, samples, batch_size=int(ecfg["batch_size"]), progress=False)
                acc = sum(p.score for p in preds) / len(preds)
                report["recall"].setdefault(task, {})[str(length)] = acc
                report.setdefault("examples", {}).setdefault(task, {})[str(length)] = [
                    {"prediction": p.prediction[:120], "answers": p.answers, "score": p.score} for p in preds[:2]
                ]
                log(f"recall {task} @ {length}: {acc:.3f}")
        report["eval_wall_s"] = time.time() - t0
    report["total_wall_s"] = time.time() - t_start
    atomic_write_json(out / "eval.json", report)
    log("recall: not evaluated (--skip-eval)" if args.skip_eval else f"recall: {json.dumps(report['recall'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
