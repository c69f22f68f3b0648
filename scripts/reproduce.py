#!/usr/bin/env python3
"""The paper's central result at small scale on one GPU (docs/reproduction.md): pretrain a teacher, run
the whole pipeline with every selector at 12.5 / 25 / 50%, evaluate, and measure the selection cost.

    python3 scripts/reproduce.py run --work runs/repro --deadline-minutes 25   # pretrain + pipeline
    python3 scripts/reproduce.py poll --work runs/repro --seconds 570 --out DIR  # watch a background run, pack it
    python3 scripts/reproduce.py pack --work runs/repro --out results.tar.gz     # a run's small files (no weights)
    python3 scripts/reproduce.py analyze --work runs/repro                       # tables, plots, selection cost

``run`` steps, each skipped when its output exists (so a re-run resumes):

1. on CUDA with fla installed, a side process compiles fla's kernels at the students' shapes while
   the teacher's data is prepared (first use of a shape costs minutes);
2. ``scripts/pretrain_teacher.py`` with ``--pretrain-config`` -> ``WORK/pretrain/teacher`` and the generic
   text it trained on -> ``WORK/text.jsonl.gz`` (the distillation data: no recall documents);
3. the pipeline config ``--config`` with that teacher and text -> all-linear Stage 1 and 2;
4. the teacher's evaluation; with ``--teacher-gate`` (default 0.25) the models are then compared only on
   the recall tasks the teacher solves at least that well (its all-task results: ``WORK/teacher_all_tasks``);
   the all-linear student's evaluation;
5. with ``--deadline-minutes``: the candidate and final Stage-2 budgets shrunk (never grown) so that
   selection, final hybrids, evaluation and report end before the deadline, from the Stage-2
   throughput and evaluation time just measured; the config that ran is ``WORK/pipeline.yaml``;
6. selection (every selector), final hybrids, evaluation, report.

``WORK/timeline.json`` records each step's start, end and the budget decisions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

DEFAULT_CONFIG = ROOT / "scripts" / "reproduction.yaml"
DEFAULT_PRETRAIN = ROOT / "scripts" / "pretrain_teacher_repro.yaml"
PACK_SUFFIXES = (".json", ".jsonl", ".md", ".html", ".png", ".yaml", ".log", ".txt")
PACK_SKIP_DIRS = {"checkpoints", "tokens", "__pycache__"}
SNAPSHOTS = 12  # default held-out KL snapshots per candidate (--snapshots)
TEACHER_ALL_TASKS = "teacher_all_tasks"  # WORK/<this>/: the teacher's evaluation on every task, before the gate
RECALL_EVAL_SHARE = 0.85  # of a hybrid's evaluation time; run 1 (H100), mean of 21 hybrids: recall 10.1 s, NIAH 1.2 s, quality 0.4 s
# A hybrid's evaluation time over the teacher's on the same (kept) tasks, samples cached: 0.55 in run 2 and 0.57 in
# run 3 (H200, 21 and 19 hybrids), with some margin.
HYBRID_EVAL_VS_TEACHER = 0.65


# ----------------------------------------------------------------------------------------------
# timeline


class EventLog:
    """A JSON file of timed records (``{kind: name, "t": seconds since this process started, ...}`` in
    ``data[kind + "s"]``), rewritten atomically after each record."""

    def __init__(self, path: Path, kind: str, data: dict):
        self.path, self.kind, self.data = path, kind, data
        self.t0 = time.time()
        self.data.setdefault(kind + "s", [])

    def write(self) -> None:
        from hybrid_distill.fileio import atomic_write_json

        atomic_write_json(self.path, self.data)

    def record(self, name: str, **info) -> None:
        rec = {self.kind: name, "t": round(time.time() - self.t0, 1), "time": time.strftime("%H:%M:%S"), **info}
        self.data[self.kind + "s"].append(rec)
        self.write()
        print(f"[{self.kind} {rec['t']:7.1f}s] {name} {json.dumps(info) if info else ''}", flush=True)


class Timeline(EventLog):
    """``WORK/timeline.json``: the events of `cmd_run`, kept across its restarts."""

    def __init__(self, work: Path):
        from hybrid_distill.fileio import read_json

        super().__init__(work / "timeline.json", "event", read_json(work / "timeline.json") or {})
        self.data.setdefault("started", self.t0)

    event = EventLog.record


# ----------------------------------------------------------------------------------------------
# budgets under a deadline


def eval_seconds_per_hybrid(given: float | None, kept_fraction: float, teacher_seconds: float) -> float:
    """A hybrid's evaluation time for the budget fit: ``HYBRID_EVAL_VS_TEACHER`` of the teacher's measured time on
    the kept tasks, or ``given`` (a hybrid's time on every task, its recall share scaled to the kept fraction of the
    tasks) when that is more. The larger one: run 3's hybrids took 18 s where the given value alone said 10 s."""
    from_teacher = HYBRID_EVAL_VS_TEACHER * teacher_seconds
    if not given:
        return from_teacher
    return max(from_teacher, given * (1 - RECALL_EVAL_SHARE * (1 - kept_fraction)))


def fit_budgets(config: dict, seconds_left: float, stage2_tokens_per_s: float, eval_seconds: float,
                num_layers: int, min_steps: int = 4, snapshots: int = SNAPSHOTS, extra_sets: int = 0) -> dict:
    """Candidate and final Stage-2 token budgets (whole steps; never above the config's) so that every
    candidate, final hybrid and evaluation fits in ``seconds_left``.

    Cost model (checked against the first GPU run, docs/reproduction.md): a candidate trains ``c`` tokens
    at the measured Stage-2 rate plus 30% for its held-out snapshots and a fixed 4 s; a final hybrid
    ``f = c * final/candidate ratio of the config`` tokens plus 5% and 2 s; the number of distinct final
    sets is taken as selectors x budgets minus a few duplicates, plus ``extra_sets``; each of them is evaluated in
    ``eval_seconds``; 90 s for the bypass selectors and the report. Candidates train a whole number of
    steps per snapshot, ``snapshots`` snapshots each.
    """
    sel, fin = config["selection"], config["final"]["stage2"]
    cand_full, final_full = int(sel["stage2"]["target_tokens"]), int(fin["target_tokens"])
    step = int(sel["stage2"]["global_batch_size"]) * int(sel["stage2"]["seq_len"])
    ratio = final_full / cand_full
    selectors = sel["selectors"]
    kinds = {k for s in selectors for k in _candidate_kinds(s)}
    n_cand = num_layers * len(kinds)
    n_final = max(1, len(selectors) * len(sel["budgets"]) - max(0, len(selectors) // 3)) + extra_sets
    fixed = n_cand * 4 + n_final * (2 + eval_seconds) + 90
    per_token = (n_cand * 1.3 + n_final * 1.05 * ratio) / stage2_tokens_per_s
    cand = (seconds_left - fixed) / per_token if per_token > 0 else cand_full
    snap_steps = max(1, int(cand // step) // snapshots)
    cand_steps = min(cand_full // step, max(min_steps, snap_steps * snapshots))
    snap_steps = max(1, cand_steps // snapshots)
    final_steps = min(final_full // step, max(min_steps, round(cand_steps * ratio)))
    return {
        "candidate_tokens": cand_steps * step, "final_tokens": final_steps * step, "snapshot_every_tokens": snap_steps * step,
        "model": {"seconds_left": round(seconds_left), "stage2_tokens_per_s": round(stage2_tokens_per_s),
                  "eval_seconds_per_model": round(eval_seconds, 1), "candidates": n_cand, "final_sets_assumed": n_final,
                  "fixed_seconds": round(fixed), "unconstrained_candidate_tokens": int(cand)},
    }


def gate_tasks(teacher_results: dict, gate: float) -> list[str]:
    """The recall tasks on which the teacher scores at least ``gate`` (all of them when none does): a task
    the teacher cannot solve says nothing about which student keeps its recall, and costs evaluation time."""
    per_task = teacher_results["recall"]["aggregate"]["per_task"]
    tasks = list(teacher_results["config"]["tasks"])
    kept = [t for t in tasks if per_task.get(t) is not None and per_task[t] >= gate]
    return kept or tasks


def _candidate_kinds(selector: str) -> tuple[str, ...]:
    from hybrid_distill.selection.registry import LEARNED_SELECTORS, candidate_kinds

    return candidate_kinds(selector) if selector in LEARNED_SELECTORS else ()


def apply_budgets(config: dict, budgets: dict) -> dict:
    out = copy.deepcopy(config)
    out["selection"]["stage2"]["target_tokens"] = budgets["candidate_tokens"]
    out["selection"]["snapshot_every_tokens"] = budgets["snapshot_every_tokens"]
    out["final"]["stage2"]["target_tokens"] = budgets["final_tokens"]
    return out


# ----------------------------------------------------------------------------------------------
# run


def _pretrain_cmd(args, work: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain_teacher.py"), "--config", str(args.pretrain_config),
           "--out", str(work / "pretrain"), "--text-out", str(work / "text.jsonl.gz"), "--skip-eval"]
    if args.pretrain_minutes is not None:
        cmd += ["--max-minutes", str(args.pretrain_minutes)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.pretrain_set:
        cmd += ["--set", *args.pretrain_set]
    return cmd


def _fla_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("fla") is not None


def cmd_run(args) -> int:
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    tl = Timeline(work)
    try:
        return _run(args, work, tl)
    except Exception:
        tl.event("failed", error=traceback.format_exc()[-3000:])
        raise


def _run(args, work: Path, tl: Timeline) -> int:
    import yaml

    from hybrid_distill.selection.registry import RULE_SELECTORS

    deadline = tl.t0 + args.deadline_minutes * 60 if args.deadline_minutes else None
    config = yaml.safe_load(Path(args.config).read_text())
    selectors = config["selection"]["selectors"]
    if args.swap_probes and not {"ga-s2", args.swap_probes} <= set(selectors) - set(RULE_SELECTORS):
        print(f"--swap-probes {args.swap_probes}: needs ga-s2 and {args.swap_probes} among the config's ranking selectors "
              f"{selectors}", file=sys.stderr)
        return 2
    tl.event("start", argv=sys.argv, deadline_minutes=args.deadline_minutes)
    teacher_dir = work / "pretrain" / "teacher"

    warm = None
    if not (teacher_dir / "model.safetensors").is_file():
        if _fla_available() and not args.no_warmup:
            with open(work / "logs" / "warmup.log", "w") as warm_log:  # the child keeps its own descriptor
                warm = subprocess.Popen([sys.executable, __file__, "warmup", "--config", str(args.config),
                                         "--pretrain-config", str(args.pretrain_config)],
                                        stdout=warm_log, stderr=subprocess.STDOUT)
            tl.event("warmup_started")
        tl.event("pretrain_started")
        with open(work / "logs" / "pretrain.log", "w") as log:
            rc = subprocess.call(_pretrain_cmd(args, work), stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            tl.event("pretrain_failed", rc=rc)
            return rc
        tl.event("pretrain_done")
    if warm is not None:
        try:
            warm.wait(timeout=120)
        except subprocess.TimeoutExpired:
            warm.kill()
        tl.event("warmup_done", rc=warm.returncode)

    config["teacher"] = str(teacher_dir)
    config["run_dir"] = str(work / "pipeline")
    config["data"] = {**config["data"], "source": str(work / "text.jsonl.gz"), "cache_dir": str(work / "tokens")}
    from hybrid_distill.evaluation.suite import evaluation_seconds
    from hybrid_distill.fileio import atomic_write_text
    from hybrid_distill.pipeline.config import RunConfig
    from hybrid_distill.pipeline.run import Pipeline

    def pipeline(cfg: dict) -> Pipeline:
        atomic_write_text(work / "pipeline.yaml", yaml.safe_dump(cfg, sort_keys=False))
        return Pipeline(RunConfig.from_dict(cfg), progress=args.progress)

    pipe = pipeline(config)
    tl.event("base_started")
    pipe.run(stages=("stage1", "stage2"))
    tl.event("base_done")
    # The teacher's evaluation also generates the (cached) samples; its time on the kept tasks (a second, cached
    # evaluation when the gate drops some) sizes each hybrid's evaluation for the budget fit.
    eval_s = {}

    def evaluate(name: str) -> dict:
        results = json.loads((pipe.evaluate(name) / "results.json").read_text())
        eval_s[name] = evaluation_seconds(results)  # also right when reused
        tl.event("model_eval_done", model=name, eval_seconds=round(eval_s[name], 1))
        return results

    teacher = evaluate("teacher")
    all_tasks = list(config["eval"]["tasks"])
    kept = gate_tasks(teacher, args.teacher_gate) if args.teacher_gate > 0 else all_tasks
    if kept != all_tasks:
        # the teacher's results on every task stay beside the run; the models are compared on the kept ones
        shutil.copytree(work / "pipeline" / "eval" / "teacher", work / TEACHER_ALL_TASKS, dirs_exist_ok=True)
        config["eval"]["tasks"] = kept
        pipe = pipeline(config)
        evaluate("teacher")
    tl.event("eval_tasks", gate=args.teacher_gate, kept=kept, dropped=[t for t in all_tasks if t not in kept],
             teacher_per_task=teacher["recall"]["aggregate"]["per_task"])
    evaluate(f"all-{pipe.config.linear}")

    if deadline is not None:
        state = json.loads((work / "pipeline" / "pipeline.json").read_text())["stages"]["stage2"]
        rate = state["tokens"] / max(1e-9, state["wall_time_s"])
        per_model = eval_seconds_per_hybrid(args.eval_seconds, len(kept) / len(all_tasks), eval_s["teacher"])
        n_probes = 2 * len(config["selection"]["budgets"]) if args.swap_probes else 0
        budgets = fit_budgets(config, deadline - time.time(), rate, per_model, pipe.num_layers, snapshots=args.snapshots,
                              extra_sets=n_probes)
        config = apply_budgets(config, budgets)
        tl.event("budgets", **budgets)
        pipe = pipeline(config)
    for stage in ("selection", "final", "export", "eval", "report"):
        tl.event(f"{stage}_started")
        pipe.run(stages=(stage,))
        tl.event(f"{stage}_done")
    if args.swap_probes:
        probes = swap_probes(work / "pipeline", args.swap_probes)
        tl.event("probes", sets=probes)
        if probes:
            config["final"] = {**config["final"], "extra_sets": probes}
            pipe = pipeline(config)
            for stage in ("final", "export", "eval", "report"):
                pipe.run(stages=(stage,))
        tl.event("probes_done")
    tl.event("done")
    return 0


def swap_probes(run: Path, reference: str, selector: str = "ga-s2") -> dict[str, list[int]]:
    """Layer sets that test why ``selector`` and ``reference`` differ, per budget where their sets differ.

    With x = the reference's best-ranked layer that ``selector``'s set lacks: ``selector``'s set with x in place
    of its own lowest-ranked layer, and the reference's set with x replaced by its best-ranked layer outside
    the set. If x is what the reference's set owes its recall to, the first should gain and the second lose.
    """
    from hybrid_distill.layout import RunLayout
    from hybrid_distill.selection.result import SelectionResult

    files = RunLayout(run).selection
    mine, ref = (SelectionResult.load(files.selection_file(s)) if files.selection_file(s).is_file() else None
                 for s in (selector, reference))
    if mine is None or ref is None or not mine.ranking or not ref.ranking:
        raise ValueError(f"swap probes need finished {selector} and {reference} selections with rankings in {run}/selection")
    sets: dict[str, list[int]] = {}
    for label, entry in mine.budgets.items():
        own, theirs = set(entry.layers), set(ref.budgets[label].layers)
        missing = [layer for layer in ref.ranking if layer in theirs and layer not in own]
        if not missing:
            continue
        x = missing[0]
        weakest = max(own, key=mine.ranking.index)
        substitute = next(layer for layer in ref.ranking if layer not in theirs)
        sets[f"{selector} {label} +{x} -{weakest}"] = sorted(own - {weakest} | {x})
        sets[f"{reference} {label} -{x} +{substitute}"] = sorted(theirs - {x} | {substitute})
    return sets


def cmd_warmup(args) -> int:
    """Compile fla's kernels at the students' training and evaluation shapes (1-layer model)."""
    import tempfile

    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "scripts"))
    from pretrain_teacher import load_config

    from hybrid_distill.checkpoint import save_student
    from hybrid_distill.evaluation.suite import load_model
    from hybrid_distill.surgery import build_student

    t0 = time.time()
    m = load_config(str(args.pretrain_config), [])["model"]
    cfg = yaml.safe_load(Path(args.config).read_text())
    stage = cfg["selection"]["stage2"]
    batch, seq = int(stage.get("micro_batch_size") or stage["global_batch_size"]), int(stage["seq_len"])
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                                           num_hidden_layers=1, num_attention_heads=m["num_attention_heads"],
                                           num_key_value_heads=m["num_key_value_heads"], max_position_embeddings=8192))
    student = build_student(teacher, [cfg["student"]["linear"]], (cfg.get("student") or {}).get("mixer_options")).float().cuda()
    ids = torch.randint(0, 1024, (batch, seq), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as distill(): fp32 weights, bf16 autocast
        student(input_ids=ids).logits.float().mean().backward()
    torch.cuda.synchronize()
    print(f"train shape {batch}x{seq}: {time.time() - t0:.1f}s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # evaluation: the saved model as the suite loads it
        save_student(student.cpu(), tmp)
        model = load_model(tmp, device="cuda")
        eval_batch = int(cfg["eval"].get("batch_size", 8))
        for length in cfg["eval"].get("lengths", [2048]):
            x = torch.randint(4, 1024, (eval_batch, int(length)), device="cuda")
            mask = torch.ones_like(x)
            mask[0, :7] = 0  # left padding, as in the evaluation's batches
            with torch.no_grad():
                model.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    print(f"warm-up done in {time.time() - t0:.1f}s", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# poll / pack


def pack(work: Path, dest: Path) -> Path:
    """Tar.gz of the run's small files (JSON, logs, reports, plots, configs, the teacher's config and
    tokenizer); no weights, checkpoints or token caches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            rel = path.relative_to(work)
            if not path.is_file() or PACK_SKIP_DIRS & set(rel.parts) or path.suffix not in PACK_SUFFIXES:
                continue
            tar.add(path, arcname=str(Path(work.name) / rel))
    os.replace(tmp, dest)
    return dest


def cmd_pack(args) -> int:
    out = pack(Path(args.work), Path(args.out))
    print(f"{out}: {out.stat().st_size / 2**20:.2f} MiB")
    return 0


def _status(work: Path) -> str:
    tl = work / "timeline.json"
    events = json.loads(tl.read_text())["events"] if tl.is_file() else []
    last = events[-1] if events else {}
    return f"{last.get('event', 'not started')} at {last.get('t', 0)}s"


def cmd_poll(args) -> int:
    """Print progress every ``--every`` seconds until ``--seconds`` pass or the run ends, packing the run
    into ``--out`` each time (a command killed at its time limit still leaves the latest pack)."""
    work, t0 = Path(args.work), time.time()
    logs = [work / "logs" / n for n in ("driver.log", "pretrain.log")]
    while time.time() - t0 < args.seconds:
        if args.out:
            pack(work, Path(args.out) / "repro.tar.gz")
        status = _status(work)
        tails = []
        for log in logs:
            if log.is_file():
                lines = log.read_text(errors="replace").splitlines()
                tails.append(f"  {log.name}: {lines[-1][:220] if lines else ''}")
        print(f"[poll {time.time() - t0:5.0f}s] {status}\n" + "\n".join(tails), flush=True)
        if status.startswith(("done", "pretrain_failed")) or "Traceback" in _tail(work / "logs" / "driver.log"):
            break
        time.sleep(min(args.every, max(1, args.seconds - (time.time() - t0))))
    if args.out:
        out = pack(work, Path(args.out) / "repro.tar.gz")
        print(f"packed {out} ({out.stat().st_size / 2**20:.2f} MiB); {_status(work)}")
    print(_tail(work / "logs" / "driver.log", 40))
    return 0


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


# ----------------------------------------------------------------------------------------------
# the decisive reproduction (issue 30): one fixed teacher, a run folder carried across GPU sessions

FIXED_CONFIG = ROOT / "scripts" / "reproduction_fixed.yaml"
FIXED_PRETRAIN = ROOT / "scripts" / "pretrain_teacher_fixed.yaml"
SESSION = "session.json"  # WORK/<this>: the session's state (running, stopped, done, failed) and its phases
OUTBOX = "outbox"  # WORK/<this>/: what a finished session hands back (the run folder's state pack, its summary)
PACK_SECONDS = 60  # kept free at the end of a session for packing the run folder and handing it back


class Session(EventLog):
    """``WORK/session.json``: one background session's state (running, stopped, done, failed) and phases."""

    def __init__(self, work: Path):
        super().__init__(work / SESSION, "phase", {"state": "running", "pid": os.getpid(), "started": time.time()})
        self.write()

    phase = EventLog.record

    def end(self, state: str, **info) -> None:
        self.data.update(state=state, ended=time.time(), **info)
        self.phase(state, **info)


def _fixed_paths(work: Path, config_path: Path) -> tuple[dict, Path, Path, Path]:
    """The pipeline config and where it expects the teacher, the text and the run folder, all under ``work`` (the same
    strings on every machine, so that settings keys stay the same when the run folder moves)."""
    import yaml

    config = yaml.safe_load(config_path.read_text())
    teacher, text, run_dir = Path(config["teacher"]), Path(config["data"]["source"]), Path(config["run_dir"])
    for what, path in (("teacher", teacher), ("data.source", text), ("run_dir", run_dir)):
        if path.parent != work:
            raise SystemExit(f"{config_path}: {what} is {path}, expected a path directly under --work {work}")
    return config, teacher, text, run_dir


def _teacher_sha(folder: Path) -> str | None:
    from hybrid_distill.fileio import read_json

    return (read_json(folder / "teacher_pack.json") or {}).get("dequantized_weights_sha256")


def _pack_sha(pack: Path) -> str:
    """The dequantized weights' SHA-256 a teacher pack (folder, or tar of ``pack/``) declares."""
    if pack.is_file():
        with tarfile.open(pack) as tar:
            return json.load(tar.extractfile("pack/manifest.json"))["dequantized_weights_sha256"]
    return json.loads((pack / "manifest.json").read_text())["dequantized_weights_sha256"]


def cmd_session(args) -> int:
    """One GPU session of the fixed-teacher reproduction, in the foreground (``step`` starts it in the background):
    the teacher from its pack, the distillation text remade and checked, the run folder from the last session's state,
    ``hybrid-distill run`` under a time limit, and the run folder packed into ``WORK/outbox/state``."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    session = Session(work)
    try:
        rc = _session(args, work, session)
    except BaseException:
        session.end("failed", error=traceback.format_exc()[-3000:])
        raise
    return rc


def _session(args, work: Path, session: Session) -> int:
    deadline = session.t0 + args.time_limit
    _, teacher, text, run_dir = _fixed_paths(work, Path(args.config))
    for flag, path in (("--teacher-pack", args.teacher_pack), ("--state", args.state)):
        if path and not Path(path).exists():
            session.end("failed", error=f"{flag} {path} does not exist (was it carried?)")
            return 2
    want = _pack_sha(Path(args.teacher_pack))
    if args.teacher_sha256 and want != args.teacher_sha256:
        session.end("failed", error=f"--teacher-pack {args.teacher_pack} holds the teacher with weights SHA-256 {want}, "
                    f"not the expected {args.teacher_sha256}")
        return 2
    if _teacher_sha(teacher) != want:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "teacher_pack.py"), "unpack", args.teacher_pack,
                        str(teacher)], check=True, env=_env())
        if teacher.exists() and _teacher_sha(teacher) != want:
            raise SystemExit(f"{teacher}: unpacked teacher's SHA-256 is not the pack's {want}")
    session.phase("teacher", sha256=want)
    from hybrid_distill.fileio import read_json

    record = Path(f"{text}.json")  # what pretrain_teacher.py --text-only wrote beside the text
    made = (read_json(record) or {}).get("sha256") if text.is_file() else None
    if made is None or (args.text_sha256 and made != args.text_sha256):
        with open(work / "text.log", "w") as log:
            rc = subprocess.call([sys.executable, str(ROOT / "scripts" / "pretrain_teacher.py"), "--config",
                                  *args.pretrain_config, "--out", str(work / "text-run"), "--text-only", "--text-out",
                                  str(text), *(["--text-sha256", args.text_sha256] if args.text_sha256 else [])],
                                 stdout=log, stderr=subprocess.STDOUT, env=_env())
        if rc != 0:
            session.end("failed", error=f"the distillation text could not be made (see {work / 'text.log'}):\n"
                        + _tail(work / "text.log", 8))
            return rc
        made = read_json(record)["sha256"]
    session.phase("text", sha256=made)
    if args.state and not run_dir.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "run_state.py"), "unpack", args.state, str(run_dir)],
                       check=True, env=_env())
        session.phase("state_unpacked", source=args.state)
    left = deadline - time.time() - PACK_SECONDS
    if left <= 0:
        session.end("failed", error="no time left for the pipeline after the teacher, text and state")
        return 1
    with open(work / "pipeline.log", "a") as log:
        rc = subprocess.call([sys.executable, "-m", "hybrid_distill.cli", "run", args.config, "--no-progress",
                              "--time-limit", str(int(left)), *(["--stages", args.stages] if args.stages else [])],
                             stdout=log, stderr=subprocess.STDOUT, env=_env())
    session.phase("pipeline", rc=rc)
    state_dir = work / OUTBOX / "state"
    shutil.rmtree(work / OUTBOX, ignore_errors=True)
    packed = subprocess.call([sys.executable, str(ROOT / "scripts" / "run_state.py"), "pack", str(run_dir),
                              str(state_dir)], stdout=sys.stdout, stderr=subprocess.STDOUT, env=_env())
    if packed != 0:
        session.end("failed", error="packing the run folder failed (see the session log)")
        return packed
    from hybrid_distill.errors import TIME_LIMIT_EXIT_CODE

    outcome = "done" if rc == 0 else "stopped" if rc == TIME_LIMIT_EXIT_CODE else "failed"
    session.end(outcome, pipeline_rc=rc, **({"error": _tail(work / "pipeline.log", 30)} if outcome == "failed" else {}))
    return 0 if outcome != "failed" else rc


def _env() -> dict[str, str]:
    """The environment of a child process: this tree's package first on the import path."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + (os.pathsep + path if path else "")}


def _session_alive(work: Path) -> bool:
    from hybrid_distill.fileio import pid_alive, read_json

    data = read_json(work / SESSION) or {}
    return data.get("state") == "running" and bool(data.get("pid")) and pid_alive(int(data["pid"]))


def cmd_step(args) -> int:
    """Start a session in the background unless one runs (or this machine already finished one), watch it for up to
    ``--seconds``, and once it has ended copy its outbox (the state pack) and session record into ``--out``. Sent
    again, the same command line keeps watching the same session: one command line per GPU command."""
    from hybrid_distill.fileio import read_json

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not _session_alive(work) and (read_json(work / SESSION) or {}).get("state") in (None, "running"):
        cmd = [sys.executable, __file__, "session", "--work", str(work), "--config", args.config, "--teacher-pack",
               args.teacher_pack, "--time-limit", str(args.time_limit), "--pretrain-config", *args.pretrain_config,
               *(["--state", args.state] if args.state else []), *(["--text-sha256", args.text_sha256] if args.text_sha256 else []),
               *(["--teacher-sha256", args.teacher_sha256] if args.teacher_sha256 else []),
               *(["--stages", args.stages] if args.stages else [])]
        with open(work / "session.log", "a") as log:
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                             env=_env())
        time.sleep(2)
    t0 = time.time()
    while True:
        data = read_json(work / SESSION) or {}
        phases = data.get("phases") or []
        last = phases[-1] if phases else {}
        pipe_tail = _tail(work / "pipeline.log", 1)[:240]
        print(f"[step {time.time() - t0:5.0f}s] {data.get('state', 'starting')}: {last.get('phase', '-')} at "
              f"{last.get('t', 0)}s | {pipe_tail}", flush=True)
        if data.get("state") not in (None, "running") or time.time() - t0 > args.seconds:
            break
        time.sleep(min(args.every, max(1.0, args.seconds - (time.time() - t0))))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in (SESSION, "pipeline.log", "session.log"):
            if (work / name).is_file():
                shutil.copy(work / name, out / name)
        if data.get("state") not in (None, "running") and (work / OUTBOX / "state").is_dir():
            shutil.copytree(work / OUTBOX / "state", out / "state", dirs_exist_ok=True)
            print(f"state pack -> {out / 'state'}")
    if data.get("state") == "failed":
        print(data.get("error", ""), file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# analyze


def analyze(work: Path) -> dict:
    """Results of a finished (or partial) run: per-selector/budget recall and NIAH, the selected layers,
    the selection cost with and without early stopping / racing (replayed), time per step; writes
    ``WORK/analysis.json``, ``WORK/analysis.md`` and plots."""
    from hybrid_distill.fileio import atomic_write_json, atomic_write_text, read_json
    from hybrid_distill.layout import RunLayout
    from hybrid_distill.pipeline.report import selector_budget_table
    from hybrid_distill.selection.replay import replay_selection
    from hybrid_distill.selection.result import SelectionResult

    run = work / "pipeline"
    state = read_json(run / "pipeline.json") or {"stages": {}, "config": {}}
    selectors = (state.get("config", {}).get("selection") or {}).get("selectors", [])
    out: dict = {"stages": {s: {k: e.get(k) for k in ("wall_time_s", "compute_time_s", "tokens")} for s, e in state["stages"].items()}}
    out["timeline"] = (read_json(work / "timeline.json") or {}).get("events", [])
    pre = [json.loads(line) for line in (work / "pretrain" / "training_log.jsonl").read_text().splitlines()] \
        if (work / "pretrain" / "training_log.jsonl").is_file() else []
    out["pretrain"] = next((r for r in pre if r.get("event") == "done"), None)
    out["pretrain_data"] = next((r for r in pre if r.get("event") == "data"), None)
    out["tables"] = {m: selector_budget_table(run, selectors, m) for m in ("recall/overall", "niah/mean", "quality/kl")}
    from hybrid_distill.evaluation.compare import flat_metrics

    out["models"] = {d.name: flat_metrics(read_json(d / "results.json")) for d in sorted((run / "eval").glob("*"))
                     if (d / "results.json").is_file()}
    from hybrid_distill.pipeline.models import hybrid_name

    config = state.get("config", {})
    linear = (config.get("student") or {}).get("linear", "gdn")
    out["probes"] = {}
    for label, layers in ((config.get("final") or {}).get("extra_sets") or {}).items():
        name = hybrid_name(sorted(layers), linear)
        out["probes"][label] = {"layers": sorted(layers), "model": name, **(out["models"].get(name) or {})}
    every = read_json(work / TEACHER_ALL_TASKS / "results.json")
    out["teacher_all_tasks"] = flat_metrics(every) if every else None
    if every:
        out["teacher_all_tasks"]["per_task"] = every["recall"]["aggregate"]["per_task"]
    out["selection"], out["selection_cost"] = {}, {}
    for sel in selectors:
        path = RunLayout(run).selection.selection_file(sel)
        if not path.is_file():
            continue
        result = SelectionResult.load(path)
        out["selection"][sel] = {"ranking": result.ranking, "scores": result.scores, "wall_time_s": result.wall_time_s,
                                 "tokens": result.tokens, "degenerate": result.degenerate,
                                 "budgets": {k: e.layers for k, e in result.budgets.items()}}
        # KL-snapshot selectors run full-budget can be replayed with early stopping / racing
        if result.source == "s2" and result.candidates and not (result.config.get("early_stop") or result.config.get("racing")):
            rows = {"full": {"tokens_spent": result.tokens["spent"], "saved_fraction": 0.0,
                             "budgets": {str(e.k): {"layers": e.layers, "jaccard": 1.0} for e in result.budgets.values()}}}
            for name, kw in (("early stop (window 10, J>=0.9)", {"early_stop_window": 10}),
                             ("early stop (window 5, J>=0.9)", {"early_stop_window": 5}),
                             ("early stop (window 3, J>=0.8)", {"early_stop_window": 3, "early_stop_min_jaccard": 0.8}),
                             ("racing (keep 1/2 every 3 snapshots)", {"racing": True, "early_stop": False, "round_snapshots": 3}),
                             ("early stop (window 5) + racing", {"racing": True, "early_stop_window": 5, "round_snapshots": 3})):
                kw = dict(kw)
                rows[name] = replay_selection(result, early_stop=kw.pop("early_stop", True), racing=kw.pop("racing", False), **kw)
            out["selection_cost"][sel] = rows
    atomic_write_json(work / "analysis.json", out)
    atomic_write_text(work / "analysis.md", analysis_markdown(out))
    _plots(out, work)
    return out


def analysis_markdown(a: dict) -> str:
    lines = []
    for metric, t in a["tables"].items():
        if not t["rows"]:
            continue
        lines += [f"### {metric}", "", "| selector | " + " | ".join(t["budgets"]) + " |", "|---|" + "---:|" * len(t["budgets"])]
        for sel, row in t["rows"].items():
            cells = [("–" if row.get(b, {}).get("value") is None else f"{row[b]['value']:.3f}") for b in t["budgets"]]
            lines.append(f"| {sel} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### selected layers", "", "| selector | " + " | ".join(a["tables"]["recall/overall"]["budgets"]) + " |",
              "|---|" + "---|" * len(a["tables"]["recall/overall"]["budgets"])]
    for sel, row in a["tables"]["recall/overall"]["rows"].items():
        lines.append(f"| {sel} | " + " | ".join(f"`{row[b]['layers']}`" if b in row else "–"
                                                  for b in a["tables"]["recall/overall"]["budgets"]) + " |")
    lines += ["", "### selection cost (replayed from the full-budget candidates)", "",
              "| selector | schedule | candidate tokens | saved | sets (Jaccard vs full) |", "|---|---|---:|---:|---|"]
    for sel, rows in a["selection_cost"].items():
        for name, r in rows.items():
            sets = ", ".join(f"K={k}: {v['jaccard']:.2f}" for k, v in r["budgets"].items())
            lines.append(f"| {sel} | {name} | {r['tokens_spent'] / 1e6:.1f}M | {r['saved_fraction']:.0%} | {sets} |")
    if a.get("probes"):
        lines += ["", "### swap probes", "", "| probe | softmax layers | recall | NIAH | KL |", "|---|---|---:|---:|---:|"]
        for label, m in a["probes"].items():
            vals = [m.get(k) for k in ("recall/overall", "niah/mean", "quality/kl")]
            lines.append(f"| {label} | `{m['layers']}` | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    lines += ["", "### models", "", "| model | recall | NIAH | KL | perplexity |", "|---|---:|---:|---:|---:|"]
    models = dict(a["models"])
    if a.get("teacher_all_tasks"):
        models["teacher, every task (before the gate)"] = a["teacher_all_tasks"]
    for name, m in models.items():
        vals = [m.get(k) for k in ("recall/overall", "niah/mean", "quality/kl", "quality/perplexity")]
        lines.append(f"| {name} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    if a.get("teacher_all_tasks"):
        per_task = a["teacher_all_tasks"]["per_task"]
        lines += ["", "Teacher recall per task (all tasks): " + ", ".join(f"{t} {v:.3f}" for t, v in per_task.items())]
    return "\n".join(lines) + "\n"


def _plots(a: dict, work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = a["tables"]["recall/overall"]
    if t["rows"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        x = range(len(t["budgets"]))
        for sel, row in t["rows"].items():
            ax.plot(x, [row.get(b, {}).get("value") for b in t["budgets"]], marker="o", label=sel,
                    linewidth=2.5 if sel == "ga-s2" else 1.2)
        for name, style in (("teacher", "k--"), ("all-gdn", "k:")):
            if (a["models"].get(name) or {}).get("recall/overall") is not None:
                ax.axhline(a["models"][name]["recall/overall"], color="k", linestyle=style[1:], label=name)
        ax.set_xticks(list(x), t["budgets"])
        ax.set_xlabel("softmax budget")
        cells = [k[len("recall/") :].split("@") for k in (a["models"].get("teacher") or {}) if k.startswith("recall/") and "@" in k]
        tasks = {t for t, _ in cells if t != "mean"}
        lengths = sorted({int(n) for _, n in cells})
        ax.set_ylabel(f"recall ({len(tasks)} tasks x {'/'.join(f'{n // 1024}k' for n in lengths)})")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(work / "recall_by_selector.png", dpi=130)
        plt.close(fig)
    sel = a["selection"].get("ga-s2")
    if sel and sel.get("scores"):
        fig, ax = plt.subplots(figsize=(7, 3))
        scores = {int(k): v for k, v in sel["scores"].items()}  # int keys in memory, str keys read back from JSON
        layers = sorted(scores)
        ax.bar(layers, [scores[i] for i in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("GA-S2 importance (-KL)")
        fig.tight_layout()
        fig.savefig(work / "ga_s2_importance.png", dpi=130)
        plt.close(fig)


def cmd_analyze(args) -> int:
    a = analyze(Path(args.work))
    print((Path(args.work) / "analysis.md").read_text())
    return 0 if a else 1


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="pretrain the teacher and run the pipeline")
    p.add_argument("--work", default="runs/repro")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="pipeline YAML (default: %(default)s)")
    p.add_argument("--pretrain-config", default=str(DEFAULT_PRETRAIN), help="pretraining YAML (default: %(default)s)")
    p.add_argument("--pretrain-minutes", type=float, default=None, help="overrides train.max_minutes")
    p.add_argument("--pretrain-set", nargs="*", default=[], metavar="KEY=VALUE", help="pretraining config overrides")
    p.add_argument("--workers", type=int, default=None, help="pretraining data processes")
    p.add_argument("--deadline-minutes", type=float, default=None,
                   help="fit candidate/final budgets so the run ends within this many minutes of its start")
    p.add_argument("--eval-seconds", type=float, default=None,
                   help="evaluation time per hybrid on every task, for the budget fit; its recall share is scaled "
                   "down to the tasks the gate keeps. The fit uses the larger of that and %.2f of the teacher's measured "
                   "time on the kept tasks (the default without it; run 1 measured 11.6 s per hybrid on an H100)"
                   % HYBRID_EVAL_VS_TEACHER)
    p.add_argument("--snapshots", type=int, default=SNAPSHOTS, help="held-out KL snapshots per candidate (budget fit)")
    p.add_argument("--teacher-gate", type=float, default=0.25,
                   help="evaluate the models only on the recall tasks where the teacher scores at least this "
                   "(its results on all tasks go to WORK/%s/); 0 keeps every task" % TEACHER_ALL_TASKS)
    p.add_argument("--swap-probes", metavar="SELECTOR", default=None,
                   help="after the run, test why GA-S2 and SELECTOR (e.g. lm-ppl) differ: per budget, distill and "
                   "evaluate GA-S2's set with SELECTOR's best layer that it lacks swapped in, and SELECTOR's set "
                   "with that layer swapped out (swap_probes)")
    p.add_argument("--no-warmup", action="store_true", help="skip the fla kernel warm-up process")
    p.add_argument("--progress", action="store_true", help="progress bars (off: logs only)")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("warmup", help=argparse.SUPPRESS)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--pretrain-config", default=str(DEFAULT_PRETRAIN))
    p.set_defaults(fn=cmd_warmup)
    p = sub.add_parser("poll", help="watch a background run; pack it into --out at the end")
    p.add_argument("--work", default="runs/repro")
    p.add_argument("--seconds", type=float, default=570)
    p.add_argument("--every", type=float, default=30)
    p.add_argument("--out", default=None, help="folder for repro.tar.gz")
    p.set_defaults(fn=cmd_poll)
    p = sub.add_parser("pack", help="tar.gz of a run's small files")
    p.add_argument("--work", default="runs/repro")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_pack)
    for name, fn, hlp in (("step", cmd_step, "fixed-teacher reproduction: start or watch this machine's session, "
                           "hand back its state"), ("session", cmd_session, argparse.SUPPRESS)):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--work", default="runs/r30", help="the folder the config's teacher, text and run folder live in")
        p.add_argument("--config", default=str(FIXED_CONFIG), help="pipeline YAML (default: %(default)s)")
        p.add_argument("--teacher-pack", required=True, help="the fixed teacher's pack (folder or teacher_pack.tar)")
        p.add_argument("--pretrain-config", nargs="+", default=[str(FIXED_PRETRAIN)],
                       help="the teacher's pretraining config(s): how its generic text is collected")
        p.add_argument("--text-sha256", default=None, help="the teacher's generic text digest (refuse other text)")
        p.add_argument("--teacher-sha256", default=None,
                       help="the fixed teacher's dequantized weights SHA-256 (refuse a pack of another teacher)")
        p.add_argument("--state", default=None, help="the last session's state pack (run_state.py) to continue from")
        p.add_argument("--time-limit", type=float, default=1500, help="seconds the session may run, packing included")
        p.add_argument("--stages", default=None, help="passed to hybrid-distill run")
        if name == "step":
            p.add_argument("--seconds", type=float, default=570, help="watch at most this long")
            p.add_argument("--every", type=float, default=30)
            p.add_argument("--out", default=None, help="where the session record and, once it ended, the state pack go")
        p.set_defaults(fn=fn)
    p = sub.add_parser("analyze", help="tables, plots and replayed selection cost of a run")
    p.add_argument("--work", default="runs/repro")
    p.set_defaults(fn=cmd_analyze)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
