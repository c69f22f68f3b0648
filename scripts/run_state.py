#!/usr/bin/env python3
"""Carry a pipeline run folder between machines in a few files of bounded size.

    python3 scripts/run_state.py pack RUN_DIR OUT_DIR [--max-file-mib 16 --max-files 8 --max-total-mib 64]
                                      [--keep-hybrid-weights]
    python3 scripts/run_state.py unpack OUT_DIR_OR_FILES... RUN_DIR [--replace]

``pack`` writes what a later ``hybrid-distill run`` needs to resume the run where it stopped -- finished stages
reused, never redone -- and leaves out what it rebuilds or never reads:

- kept: every finished step's files (``step.json`` records, ``pipeline.json``, metrics, the all-linear students'
  weights, candidates' results, evaluations, selections, reports and plots);
- left out: ``superseded/``, checkpoints (model, optimizer and RNG states: a finished run never reads them), lock
  files, half-written temporary folders, token caches (rebuilt from the data), and every *unfinished* distillation
  run, candidate, saved model, export or evaluation folder (it starts again from the beginning on resume: a
  half-made folder without its checkpoint could not be continued exactly);
- left out unless ``--keep-hybrid-weights``: the weights of every *finished* final hybrid -- trained, saved in
  ``models/``, evaluated, and exported when the run exports (`hybrid_distill.pipeline.models.hybrid_finished`):
  its training run's ``final/`` model folder and the ``*.safetensors`` of ``models/<set>`` and ``exports/<set>``.
  A resumed run reuses such a hybrid from its records (no weights read); a step that needs its weights again
  (an evaluation or export under other settings) stops with an error naming the folder.

The kept files are stored once per distinct content (a final hybrid's training output and its saved copy are the
same bytes) in one gzip-compressed tar, cut into parts of at most ``--max-file-mib``; ``manifest.json`` lists every
file of the run folder with its SHA-256 and the SHA-256 of every part. State that does not fit the limits is
refused before anything is written, naming its largest files and folders. ``unpack`` checks every part and every
file against the manifest and only then puts the run folder in place (atomically: all of it or nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from hybrid_distill.artifacts import LOCK_FILE, STEP_FILE, SUPERSEDED_DIR, StepRecord  # noqa: E402
from hybrid_distill.fileio import atomic_directory_write, atomic_write_json, read_json, sha256_file  # noqa: E402
from hybrid_distill.layout import RunLayout  # noqa: E402
from hybrid_distill.pipeline.models import WEIGHTS_GLOB, hybrid_finished  # noqa: E402

FORMAT = "hybrid-distill-run-state-v1"
MANIFEST = "manifest.json"
PART = "state.tar.part{:02d}"
MIB = 1 << 20
COMPRESS_LEVEL = 6
# folders a resumed run never reads
SKIP_DIRS = {SUPERSEDED_DIR, "checkpoints", "tensorboard", "slurm-logs", "__pycache__"}
TOKEN_CACHE_FILES = ("meta.json", "tokens-00000.npy")  # a folder holding both is a token cache (rebuilt)


class RunStateError(ValueError):
    """State that cannot be packed within the limits, or parts that do not match their manifest."""


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 16 * MIB
    max_files: int = 8
    max_total_bytes: int = 64 * MIB


# ----------------------------------------------------------------------------------------------
# What is packed


def _unfinished_step(folder: Path, run: RunLayout) -> bool:
    """Whether ``folder`` holds a step that is not done. The selection folder's own record only guards its
    candidates' settings (it is never published), so it counts as a container, not as unfinished work."""
    if folder == run.selection.root or not (folder / STEP_FILE).is_file():
        return False
    record = StepRecord.read(folder)
    return record is None or record.state != "done"


def finished_hybrid_weights(run_dir: Path) -> list[Path]:
    """The weights (folders and files, relative to ``run_dir``) of the final hybrids that need them no more."""
    run = RunLayout(run_dir)
    config = (read_json(run.state) or {}).get("config") or {}
    exports = (config.get("export") or {}).get("format") is not None
    names = sorted(p.name for p in run.final_runs.iterdir() if p.is_dir()) if run.final_runs.is_dir() else []
    weights: list[Path] = []
    for name in names:
        if hybrid_finished(run, name, exports):
            weights.append(run.final_run(name).final)
            for folder in (run.model(name), run.export(name)):
                weights += sorted(folder.glob(WEIGHTS_GLOB))
    return [w.relative_to(run_dir) for w in weights if w.exists()]


def select_files(run_dir: Path, keep_hybrid_weights: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """(files to pack, relative to ``run_dir``; [(left-out path, why)]) of a run folder."""
    run = RunLayout(run_dir)
    kept: list[Path] = []
    left_out: list[tuple[str, str]] = []
    weights = set() if keep_hybrid_weights else set(finished_hybrid_weights(run_dir))
    weights_why = "weights of a finished final hybrid (reused from its records; --keep-hybrid-weights keeps them)"
    for folder, dirs, files in os.walk(run_dir):
        here = Path(folder)
        rel = here.relative_to(run_dir)
        for name in sorted(dirs):
            sub = here / name
            why = None
            if name in SKIP_DIRS:
                why = "not read by a resumed run"
            elif name.startswith("."):
                why = "temporary folder of an interrupted write"
            elif all((sub / f).is_file() for f in TOKEN_CACHE_FILES):
                why = "token cache (rebuilt from the data)"
            elif _unfinished_step(sub, run):
                why = "unfinished step (starts again on resume)"
            elif rel / name in weights:
                why = weights_why
            if why is not None:
                dirs.remove(name)
                left_out.append(((rel / name).as_posix(), why))
        dirs.sort()
        for name in sorted(files):
            if name == LOCK_FILE or name.startswith("."):
                continue
            if rel / name in weights:
                left_out.append(((rel / name).as_posix(), weights_why))
                continue
            kept.append(rel / name)
    return kept, left_out


def _largest(run_dir: Path, files: dict[str, dict], n: int = 5) -> str:
    by_folder: dict[str, int] = {}
    for rel, f in files.items():
        parts = Path(rel).parts
        for depth in range(1, len(parts)):
            key = "/".join(parts[:depth]) + "/"
            by_folder[key] = by_folder.get(key, 0) + f["bytes"]
    top_files = sorted(files.items(), key=lambda kv: -kv[1]["bytes"])[:n]
    top_dirs = sorted(by_folder.items(), key=lambda kv: -kv[1])[:n]
    return ("largest files: " + ", ".join(f"{rel} ({f['bytes'] / MIB:.2f} MiB)" for rel, f in top_files)
            + "; largest folders: " + ", ".join(f"{d} ({b / MIB:.2f} MiB)" for d, b in top_dirs))


# ----------------------------------------------------------------------------------------------
# pack / unpack


def pack(run_dir: str | Path, out_dir: str | Path, limits: Limits = Limits(), keep_hybrid_weights: bool = False) -> dict:
    """Write ``run_dir``'s state into ``out_dir`` (``manifest.json`` and tar parts); returns the manifest.
    RunStateError, before anything is written, when it does not fit ``limits``. ``keep_hybrid_weights``: keep the
    weights of finished final hybrids too."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / RunLayout(run_dir).state.name).is_file():
        raise RunStateError(f"{run_dir} is not a pipeline run folder (no {RunLayout(run_dir).state.name})")
    rels, left_out = select_files(run_dir, keep_hybrid_weights)
    files = {rel.as_posix(): {"sha256": sha256_file(run_dir / rel), "bytes": (run_dir / rel).stat().st_size}
             for rel in rels}
    blobs = {f["sha256"]: f["bytes"] for f in files.values()}
    first_file = {}
    for rel, f in files.items():
        first_file.setdefault(f["sha256"], rel)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.pack-") as tmp:
        tar_path = Path(tmp) / "state.tar"
        # gzip: bf16 weights shrink to about 0.8 of their size (their sign/exponent bytes are far from random)
        with tarfile.open(tar_path, "w:gz", compresslevel=COMPRESS_LEVEL, format=tarfile.PAX_FORMAT) as tar:
            for sha, rel in sorted(first_file.items()):
                info = tar.gettarinfo(str(run_dir / rel), arcname=sha)
                info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
                with open(run_dir / rel, "rb") as f:
                    tar.addfile(info, f)
        tar_size = tar_path.stat().st_size
        n_parts = max(1, -(-tar_size // limits.max_file_bytes))
        manifest_room = 4096 + 256 * (len(files) + len(left_out))  # a generous bound on manifest.json's size
        problems = []
        if n_parts + 1 > limits.max_files:
            problems.append(f"{n_parts} parts of {limits.max_file_bytes / MIB:g} MiB + the manifest exceed "
                            f"{limits.max_files} files")
        if tar_size + manifest_room > limits.max_total_bytes:
            problems.append(f"{(tar_size + manifest_room) / MIB:.2f} MiB exceeds {limits.max_total_bytes / MIB:g} MiB "
                            "in all")
        if problems:  # nothing in out_dir has changed yet
            raise RunStateError(f"the state of {run_dir} does not fit: {'; '.join(problems)} ({len(files)} files, "
                                f"{sum(blobs.values()) / MIB:.2f} MiB of distinct content, {tar_size / MIB:.2f} MiB "
                                f"compressed); {_largest(run_dir, files)}")
        out_dir.mkdir(exist_ok=True)
        for stale in [out_dir / MANIFEST, *out_dir.glob("state.tar.part*")]:  # an earlier pack's files would mix in
            stale.unlink(missing_ok=True)
        parts = []
        with open(tar_path, "rb") as src:
            for i in range(limits.max_files):
                chunk = src.read(limits.max_file_bytes)
                if not chunk:
                    break
                name = PART.format(i)
                (Path(tmp) / name).write_bytes(chunk)
                parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
        manifest = {"format": FORMAT, "run_dir": run_dir.name, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "compression": "gzip", "tar_sha256": sha256_file(tar_path), "parts": parts, "files": files,
                    "left_out": [{"path": p, "why": why} for p, why in left_out]}
        for part in parts:
            os.replace(Path(tmp) / part["name"], out_dir / part["name"])
    atomic_write_json(out_dir / MANIFEST, manifest)  # last: a pack without its manifest is never taken as whole
    return manifest


def _sources(paths: list[Path]) -> tuple[dict, dict[str, Path]]:
    """(manifest, {part name: path}) from folders and/or files."""
    found: dict[str, Path] = {}
    for p in paths:
        for f in sorted(p.iterdir()) if p.is_dir() else [p]:
            if f.is_file():
                found.setdefault(f.name, f)
    if MANIFEST not in found:
        raise RunStateError(f"no {MANIFEST} among {', '.join(map(str, paths))}: give the folder pack wrote, or its files")
    manifest = read_json(found[MANIFEST])
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RunStateError(f"{found[MANIFEST]} is not a run-state manifest (format {FORMAT})")
    return manifest, found


def unpack(sources: list[str | Path], run_dir: str | Path, replace: bool = False) -> dict:
    """Restore the run folder packed into ``sources`` at ``run_dir`` after checking every part and file against
    the manifest; returns the manifest. An existing non-empty ``run_dir`` is refused unless ``replace``."""
    run_dir = Path(run_dir)
    manifest, found = _sources([Path(s) for s in sources])
    if run_dir.exists() and any(run_dir.iterdir()) and not replace:
        raise RunStateError(f"{run_dir} exists and is not empty; unpack into a new folder, or pass --replace")
    for part in manifest["parts"]:
        path = found.get(part["name"])
        if path is None:
            raise RunStateError(f"part {part['name']} is missing (listed in {MANIFEST})")
        if path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
            raise RunStateError(f"part {path} is damaged: its size or SHA-256 differs from {MANIFEST}'s")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir.parent, prefix=f".{run_dir.name}.unpack-") as tmp:
        tar_path = Path(tmp) / "state.tar"
        with open(tar_path, "wb") as out:
            for part in manifest["parts"]:
                with open(found[part["name"]], "rb") as f:
                    shutil.copyfileobj(f, out)
        if sha256_file(tar_path) != manifest["tar_sha256"]:
            raise RunStateError("the joined parts' SHA-256 differs from the manifest's (parts out of order?)")
        blobs = Path(tmp) / "blobs"
        blobs.mkdir()
        with tarfile.open(tar_path, "r:*") as tar:  # members are named by their SHA-256; nothing else is taken
            for member in tar:
                if not member.isfile() or not _is_sha256(member.name):
                    raise RunStateError(f"the parts hold an unexpected member {member.name!r}")
                with tar.extractfile(member) as src, open(blobs / member.name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        with atomic_directory_write(run_dir) as dest:
            for rel, f in manifest["files"].items():
                target = dest / rel
                if Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise RunStateError(f"{MANIFEST} names a path outside the run folder: {rel}")
                blob = blobs / f["sha256"]
                if not blob.is_file() or sha256_file(blob) != f["sha256"]:
                    raise RunStateError(f"{rel}: its content is missing from the parts or differs from {MANIFEST}")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(blob, target)
    return manifest


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def summary(manifest: dict) -> str:
    parts = manifest["parts"]
    size = sum(p["bytes"] for p in parts)
    return (f"{len(manifest['files'])} files in {len(parts)} part(s), {size / MIB:.2f} MiB; left out: "
            + (", ".join(f"{e['path']} ({e['why']})" for e in manifest["left_out"]) or "nothing"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write a run folder's state into OUT_DIR")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--max-file-mib", type=float, default=16)
    p.add_argument("--max-files", type=int, default=8, help="files in all, the manifest included")
    p.add_argument("--max-total-mib", type=float, default=64)
    p.add_argument("--keep-hybrid-weights", action="store_true",
                   help="keep the weights of final hybrids that are trained, saved, evaluated and exported")
    p = sub.add_parser("unpack", help="restore a run folder from a pack (its folder, or its files)")
    p.add_argument("sources", nargs="+", metavar="OUT_DIR_OR_FILES")
    p.add_argument("run_dir")
    p.add_argument("--replace", action="store_true", help="replace an existing run folder")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "pack":
            limits = Limits(int(args.max_file_mib * MIB), args.max_files, int(args.max_total_mib * MIB))
            manifest = pack(args.run_dir, args.out_dir, limits, keep_hybrid_weights=args.keep_hybrid_weights)
            print(f"packed {args.run_dir} -> {args.out_dir}: {summary(manifest)}")
        else:
            manifest = unpack(args.sources, args.run_dir, replace=args.replace)
            print(f"unpacked -> {args.run_dir}: {summary(manifest)}")
    except RunStateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
