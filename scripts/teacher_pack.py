#!/usr/bin/env python3
"""Store a pretrained Llama teacher in about a quarter of its fp32 size: int8 weights with one scale per row.

    python3 scripts/teacher_pack.py pack TEACHER_DIR PACK_DIR      # a saved Hugging Face checkpoint -> pack
    python3 scripts/teacher_pack.py unpack PACK_DIR OUT_DIR        # pack -> a Hugging Face checkpoint (fp32)
    python3 scripts/teacher_pack.py verify PACK_DIR                # check the files against the manifest

The pack IS the teacher. Every 2-D weight ``W`` (the embedding, every linear layer; a tied LM head is the
embedding) is stored as ``q = round(W / s)`` in int8, clipped to [-127, 127], with one fp32 scale per output row
``s = max|W[row]| / 127``; 1-D weights (RMSNorm gains) are stored in fp32. ``unpack`` writes a plain Hugging Face
checkpoint (``model.safetensors`` in fp32, config, generation config, tokenizer) whose weights are exactly
``q.float() * s`` -- the fp32 product, the same on every machine -- so every run that unpacks the pack uses the
same teacher, which ``AutoModelForCausalLM.from_pretrained`` loads as it would any checkpoint. The original
full-precision weights are not the teacher and are not kept.

Pack layout: ``teacher.int8.safetensors`` (``NAME.qweight`` int8 and ``NAME.scale`` fp32 for 2-D weights, ``NAME``
fp32 for 1-D ones), ``config.json``, ``generation_config.json``, the tokenizer's files, ``manifest.json`` (format,
SHA-256 and size of every file, the SHA-256 of the dequantized weights) and ``README.md`` (the same, for people).
The dequantized weights' SHA-256 (:func:`weights_sha256`) is taken over the tensors' names, dtypes, shapes and
bytes in name order, so it does not depend on the safetensors version that wrote a file; ``unpack`` checks it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from hybrid_distill.checkpoint import atomic_directory_write  # noqa: E402
from hybrid_distill.fileio import atomic_write_json, sha256_file  # noqa: E402

FORMAT = "hybrid-distill-int8-rowwise-v1"
WEIGHTS = "teacher.int8.safetensors"
MANIFEST = "manifest.json"
README = "README.md"
MODEL_FILE = "model.safetensors"  # what unpack writes
# copied as they are, where the teacher has them; config.json and a tokenizer file are required
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
QMAX = 127


class PackError(ValueError):
    """A pack or a teacher directory that cannot be used as asked; the message names the file."""


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: int8 ``q`` [out, in] and fp32 ``scale`` [out] with ``w ~= q * scale[:, None]``
    (a zero row gets scale 1 and q 0)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The teacher's weight: ``q.float() * scale[:, None]`` in fp32."""
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


def quantized_state(model) -> dict[str, torch.Tensor]:
    """The pack's tensors of ``model`` (a tied LM head is left out: it is the embedding)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if t.ndim == 2:
            tensors[f"{name}.qweight"], tensors[f"{name}.scale"] = quantize_rows(t)
        elif t.ndim == 1:
            tensors[name] = t.detach().float().contiguous()
        else:
            raise PackError(f"weight {name} has {t.ndim} dimensions; the pack stores 1-D and 2-D weights only")
    return tensors


def dequantized_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's fp32 weights from the pack's tensors."""
    state: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            if f"{name}.scale" not in tensors:
                raise PackError(f"{WEIGHTS}: {key} has no {name}.scale")
            state[name] = dequantize_rows(t, tensors[f"{name}.scale"])
        elif not key.endswith(".scale"):
            state[key] = t.to(torch.float32)
    return state


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in CONFIG_FILES + TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if "config.json" not in copied:
        raise PackError(f"{src} has no config.json")
    if "tokenizer.json" not in copied:
        raise PackError(f"{src} has no tokenizer.json (the pack carries the teacher's tokenizer)")
    return copied


def pack(teacher_dir: str | Path, pack_dir: str | Path) -> dict:
    """Quantize the checkpoint in ``teacher_dir`` into ``pack_dir`` (written atomically); returns the manifest."""
    teacher_dir, pack_dir = Path(teacher_dir), Path(pack_dir)
    if not (teacher_dir / "config.json").is_file():
        raise PackError(f"{teacher_dir} is not a Hugging Face checkpoint (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    tensors = quantized_state(model)
    teacher_sha = weights_sha256(dequantized_state(tensors))
    params = sum(p.numel() for p in model.parameters())
    with atomic_directory_write(pack_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        _copy_side_files(teacher_dir, tmp)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT,
            "quantization": "int8 per output row (absmax / 127, fp32 scales) for 2-D weights; fp32 for 1-D weights",
            "teacher": "the dequantized weights q.float() * scale (scripts/teacher_pack.py unpack)",
            "dequantized_weights_sha256": teacher_sha,
            "parameters": params,
            "architecture": model.config.architectures,
            "files": files,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        (tmp / README).write_text(readme(manifest))
    return manifest


def readme(manifest: dict) -> str:
    total = sum(f["bytes"] for f in manifest["files"].values())
    lines = [
        "# Teacher pack",
        "",
        f"Format `{manifest['format']}` ({manifest['quantization']}).",
        "The teacher is the dequantized model that `python3 scripts/teacher_pack.py unpack PACK_DIR OUT_DIR` writes:",
        "its weights are exactly `q.float() * scale`.",
        "",
        f"- parameters: {manifest['parameters']:,}",
        f"- SHA-256 of the dequantized weights (`weights_sha256`): `{manifest['dequantized_weights_sha256']}`",
        f"- files: {total / 2**20:.2f} MiB (without this README and manifest.json)",
        "",
        "| file | bytes | SHA-256 |",
        "|---|---:|---|",
    ]
    lines += [f"| {name} | {f['bytes']:,} | `{f['sha256']}` |" for name, f in manifest["files"].items()]
    return "\n".join(lines) + "\n"


def verify(pack_dir: str | Path) -> dict:
    """The manifest of ``pack_dir`` after checking every file it lists; PackError names a missing or changed file."""
    pack_dir = Path(pack_dir)
    mf = pack_dir / MANIFEST
    if not mf.is_file():
        raise PackError(f"{pack_dir} has no {MANIFEST}: not a teacher pack")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != FORMAT:
        raise PackError(f"{mf}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, want in manifest["files"].items():
        path = pack_dir / name
        if not path.is_file():
            raise PackError(f"{path} is missing (listed in {MANIFEST})")
        got = sha256_file(path)
        if got != want["sha256"]:
            raise PackError(f"{path}: SHA-256 {got} differs from the manifest's {want['sha256']}")
    return manifest


def unpack(pack_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the teacher (fp32 Hugging Face checkpoint) from ``pack_dir`` to ``out_dir`` atomically; returns the manifest.

    ``pack_dir`` may also be a tar holding the pack as ``pack/`` (what ``scripts/pretrain_teacher.py --collect``
    brings back as ``teacher_pack.tar``)."""
    pack_dir, out_dir = Path(pack_dir), Path(out_dir)
    if pack_dir.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                with tarfile.open(pack_dir) as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError) as err:
                raise PackError(f"{pack_dir}: not a pack folder or a readable tar of one ({err})") from None
            if not (Path(tmp) / "pack").is_dir():
                raise PackError(f"{pack_dir}: the tar holds no pack/ folder")
            return unpack(Path(tmp) / "pack", out_dir)
    manifest = verify(pack_dir)
    state = dequantized_state(load_file(str(pack_dir / WEIGHTS)))
    got = weights_sha256(state)
    if got != manifest["dequantized_weights_sha256"]:
        raise PackError(f"{pack_dir / WEIGHTS}: dequantized weights hash {got}, manifest says "
                        f"{manifest['dequantized_weights_sha256']}")
    with atomic_directory_write(out_dir) as tmp:
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        _copy_side_files(pack_dir, tmp)
        atomic_write_json(tmp / "teacher_pack.json", {"pack_format": manifest["format"],
                                                      "dequantized_weights_sha256": got,
                                                      "pack_files": manifest["files"]})
    return manifest


def pack_size(pack_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(pack_dir).iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="quantize a Hugging Face checkpoint into a pack")
    p.add_argument("teacher_dir")
    p.add_argument("pack_dir")
    p = sub.add_parser("unpack", help="write the teacher (fp32 Hugging Face checkpoint) from a pack")
    p.add_argument("pack_dir")
    p.add_argument("out_dir")
    p = sub.add_parser("verify", help="check a pack's files against its manifest")
    p.add_argument("pack_dir")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "pack":
            manifest = pack(args.teacher_dir, args.pack_dir)
            print(f"packed {args.teacher_dir} -> {args.pack_dir}: {pack_size(args.pack_dir) / 2**20:.2f} MiB, "
                  f"{manifest['parameters']:,} parameters, teacher weights sha256 {manifest['dequantized_weights_sha256']}")
        elif args.cmd == "unpack":
            manifest = unpack(args.pack_dir, args.out_dir)
            print(f"unpacked {args.pack_dir} -> {args.out_dir}: teacher weights sha256 "
                  f"{manifest['dequantized_weights_sha256']}")
        else:
            manifest = verify(args.pack_dir)
            print(f"{args.pack_dir}: {len(manifest['files'])} files match {MANIFEST}; teacher weights sha256 "
                  f"{manifest['dequantized_weights_sha256']}")
    except PackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
