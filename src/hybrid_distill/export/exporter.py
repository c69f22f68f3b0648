"""Write a hybrid student as a stock Hugging Face checkpoint that loads without remote code.

`export_student(STUDENT_DIR, OUT_DIR)` loads a saved student, refuses what the format cannot compute
exactly (every reason at once, each with the student option that would make it exportable) unless
``approximate=True``, builds the exported model, measures its logits against the student's on a fixed
random input, and writes weights (safetensors), config, generation config, tokenizer and a model card
into OUT_DIR atomically.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel

from ..checkpoint import atomic_directory_write, load_student, verify_checkpoint
from ..dtypes import cast_model
from ..surgery import load_tokenizer, student_skeleton
from . import qwen3_5
from .result import Blocker, ExportError, ExportResult, LayerExport

EXPORT_FORMATS = (qwen3_5.FORMAT,)
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The fixed random input the export's logits are compared on: CHECK_BATCH rows of CHECK_TOKENS token ids.
CHECK_BATCH, CHECK_TOKENS, CHECK_SEED = 2, 128, 0
# An exact export whose fp32 logits differ from the student's by more than this fraction of the largest
# logit is not written (a wrong map, not rounding: CPU fp32 exports differ by ~1e-6; GPU kernels may use TF32).
EXACT_CHECK_TOLERANCE = 1e-2
# Parameters written in fp32 whatever the export dtype (the student keeps them in fp32 too).
FP32_PARAMETER_SUFFIXES = (".A_log", ".dt_bias")


def export_student(student_dir: str | Path, out_dir: str | Path, format: str = qwen3_5.FORMAT, approximate: bool = False, *,
                   dtype: str | None = None, tokenizer: str | None = None, verify: bool = True) -> ExportResult:
    """Export the student saved in `student_dir` to `out_dir` (see the module docstring).

    `dtype`: of the written weights, "float32" or "bfloat16" (default: the student checkpoint's).
    `tokenizer`: path or hub id of the tokenizer when `student_dir` holds none.
    `verify`: measure the logit error of an exact export too (an approximate one is always measured).
    """
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; supported: {list(EXPORT_FORMATS)}")
    check_out_dir(student_dir, out_dir)
    saved = verify_checkpoint(student_dir)
    save_dtype = resolve_dtype(dtype if dtype is not None else saved.get("dtype"))
    tok = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif (student_dir / "tokenizer_config.json").is_file() or (student_dir / "tokenizer.json").is_file():
        tok = load_tokenizer(str(student_dir))
    generation = GenerationConfig.from_pretrained(student_dir) if (student_dir / "generation_config.json").is_file() else None
    # transformers' Qwen3.5 calls fla's kernels whenever fla is installed (5.17: on any device), so the check runs on CUDA there
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student = load_student(student_dir, dtype=torch.float32, device=device)
    return export_model(student, out_dir, format=format, approximate=approximate, dtype=save_dtype, tokenizer=tok,
                        generation_config=generation, source=str(student_dir), verify=verify)


def export_model(student: PreTrainedModel, out_dir: str | Path, format: str = qwen3_5.FORMAT, approximate: bool = False, *,
                 dtype: torch.dtype = torch.float32, tokenizer=None, generation_config: GenerationConfig | None = None,
                 source: str | None = None, verify: bool = True) -> ExportResult:
    """Export an fp32 `student` (in memory) to `out_dir`; the logit check runs on the student's device."""
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; supported: {list(EXPORT_FORMATS)}")
    if dtype not in EXPORT_DTYPES.values():
        raise ExportError(f"export dtype {dtype}: choose one of {list(EXPORT_DTYPES)}")
    if next(student.parameters()).dtype != torch.float32:
        raise ExportError("export_model needs the student in float32 (it is the reference of the logit check)")
    out_dir = Path(out_dir)
    blockers = qwen3_5.find_blockers(student)
    refuse(blockers, approximate, source or "the student")
    model, layers, notes = qwen3_5.build_qwen3_5(student)
    max_error = max_logit = check_input = None
    if verify or blockers:
        max_error, max_logit = logit_error(student, model)
        check_input = f"{CHECK_BATCH} x {CHECK_TOKENS} random token ids, seed {CHECK_SEED}"
        if not blockers and max_error > EXACT_CHECK_TOLERANCE * max(1.0, max_logit):
            raise RuntimeError(f"the export differs from the student by {max_error:.3g} (largest logit {max_logit:.3g}) "
                               "although it is exact by construction: a bug in the weight map, please report it")
    keep = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(FP32_PARAMETER_SUFFIXES)}
    cast_model(model, dtype)
    with torch.no_grad():
        for name, value in keep.items():
            model.get_parameter(name).data = value
    model.config.dtype = dtype
    if generation_config is not None:
        model.generation_config = copy.deepcopy(generation_config)
    if not model.config.use_cache:
        model.generation_config.use_cache = False
    dtype_name = str(dtype).removeprefix("torch.")
    card_fields = dict(source=source, layers=layers, notes=notes, approximations=blockers, max_error=max_error,
                       max_logit=max_logit, check_input=check_input, dtype=dtype_name)
    with atomic_directory_write(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(student, out_dir.name, **card_fields))
        files = tuple(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
    return ExportResult(out_dir=out_dir, format=format, dtype=dtype_name, layers=tuple(layers), notes=tuple(notes),
                        approximations=tuple(blockers), max_logit_error=max_error, max_logit=max_logit,
                        check_input=check_input, files=files)


def refuse(blockers: list[Blocker], approximate: bool, source: str) -> None:
    """Raise ExportError listing every blocker unless all of them can be approximated and `approximate` is set."""
    impossible = [b for b in blockers if b.approximation is None]
    if impossible:
        raise ExportError(f"cannot export {source} to Qwen3.5 text, not even approximately:\n"
                          + "\n".join(b.describe() for b in impossible))
    if blockers and not approximate:
        raise ExportError(f"cannot export {source} to Qwen3.5 text exactly:\n" + "\n".join(b.describe() for b in blockers)
                          + "\nPass --approximate (approximate=True) to export anyway and measure the logit error.")


def exportable(teacher_config, mixers: list[str], mixer_options: dict | None, format: str = qwen3_5.FORMAT) -> list[Blocker]:
    """What an export would refuse in a student built from a teacher of `teacher_config` with these mixers and
    options (checked on a meta-device skeleton, before any training): [] when it exports exactly."""
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; supported: {list(EXPORT_FORMATS)}")
    return qwen3_5.find_blockers(student_skeleton(teacher_config, mixers, mixer_options))


def check_out_dir(student_dir: Path, out_dir: Path) -> None:
    """The export replaces `out_dir` as a whole: refuse a folder holding the student or anything but an earlier export."""
    src, dst = student_dir.resolve(), out_dir.resolve()
    if dst.exists() and not dst.is_dir():
        raise ExportError(f"the output folder {str(out_dir)!r} is a file; choose a new or empty folder")
    if src == dst or dst in src.parents:
        raise ExportError(f"the output folder {str(out_dir)!r} holds the student {str(student_dir)!r}; "
                          "the export replaces its output folder, choose another one")
    if dst.is_dir() and any(dst.iterdir()):
        try:
            model_type = json.loads((dst / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if model_type != qwen3_5.MODEL_TYPE:
            raise ExportError(f"the output folder {str(out_dir)!r} exists and is not an earlier export; the export "
                              "replaces its output folder as a whole, so choose a new or empty one")


def resolve_dtype(name) -> torch.dtype:
    """The export dtype from a name ("float32", "bfloat16", a torch dtype; None: float32)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if name == "float16":
        raise ExportError("float16 exports are not supported: for teachers without q/k norms the full-attention "
                          "q/k projections are scaled below float16's range; export in bfloat16 or float32")
    if name not in EXPORT_DTYPES:
        raise ExportError(f"export dtype {name!r}: choose one of {list(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[name]


def logit_error(student: PreTrainedModel, export: PreTrainedModel) -> tuple[float, float]:
    """(max |student - export|, max |student|) of the logits on the fixed random check input."""
    device = next(student.parameters()).device
    export.to(device)
    ids = torch.randint(0, student.config.vocab_size, (CHECK_BATCH, CHECK_TOKENS),
                        generator=torch.Generator().manual_seed(CHECK_SEED)).to(device)
    with torch.no_grad():
        reference = student(ids).logits.float()
        exported = export(ids).logits.float()
    return float((reference - exported).abs().max()), float(reference.abs().max())


def model_card(student: PreTrainedModel, name: str, *, source: str | None, layers: list[LayerExport], notes: list[str],
               approximations: list[Blocker], max_error: float | None, max_logit: float | None, check_input: str | None,
               dtype: str) -> str:
    """README.md of an export: what it is, how it was made from the student, how to load it."""
    config = student.config
    teacher = dict(getattr(config, "teacher", None) or {})
    teacher_name = teacher.get("name_or_path") or "an unnamed teacher"
    softmax = [layer.index for layer in layers if layer.layer_type == "full_attention"]
    kinds = "".join("S" if layer.layer_type == "full_attention" else "g" for layer in layers)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [hybrid-distill, gated-deltanet, hybrid-attention, qwen3_5]"]
    if teacher_name.count("/") == 1 and not teacher_name.startswith((".", "/", "~")):
        front.append(f"base_model: {teacher_name}")
    front.append("---")
    lines = front + [
        "", f"# {name}", "",
        f"A hybrid of softmax attention and Gated DeltaNet (linear attention) layers, distilled with hybrid-distill "
        f"from `{teacher_name}` ({teacher.get('model_type', config.model_type)}) and exported to stock Hugging Face "
        "Qwen3.5 text (`model_type: qwen3_5_text`, `Qwen3_5ForCausalLM`): it loads without `trust_remote_code`.", "",
        f"- Student: `{source or 'in memory'}` ({config.model_type}, {len(layers)} layers)",
        f"- Layers: `{kinds}` (S full attention, g Gated DeltaNet); full attention in layers {softmax}",
        f"- Weights: {dtype} (A_log and dt_bias in float32)",
    ]
    if not approximations:
        lines.append("- Export: exact by construction (the same function as the student, up to floating-point rounding)")
    else:
        lines.append("- Export: **approximate**, these parts of the student are not computed exactly:")
        lines += ["  " + line for b in approximations for line in b.describe().splitlines()]
    if max_error is not None:
        lines.append(f"- Checked: max |logit difference| to the student {max_error:.3g} in float32 (largest |logit| "
                     f"{max_logit:.3g}) on {check_input}")
    lines += ["", "## How the student maps onto Qwen3.5", ""] + [f"- {note}" for note in notes]
    lines += ["", "| layer | student mixer | Qwen3.5 layer | how |", "|---|---|---|---|"]
    lines += [f"| {layer.index} | {layer.mixer} | {layer.layer_type} | {'; '.join(layer.notes)} |" for layer in layers]
    lines += [
        "", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype="bfloat16")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
        "Serve it with an engine that runs Qwen3.5 text with any pattern of `layer_types` (see hybrid-distill's "
        "docs/serving.md for vLLM, SGLang and llama.cpp) and keep the recurrent state in float32."
        + (" Do not run or store it in float16 (also not in quantization formats with float16 block scales): the "
           "full-attention q/k projections are scaled far below float16's range." if qwen3_5.linearizes_head_norms(student)
           else ""), "",
    ]
    return "\n".join(lines)
