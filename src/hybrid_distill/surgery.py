"""Model surgery: build a hybrid student from a teacher (attention-weight transfer) and load teachers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .checkpoint import check_safetensors_file, weights_fingerprint
from .config import ConfigError
from .dtypes import cast_model
from .fileio import sha256_file
from .tiny_teachers import tiny_teacher
from .tokenization import tiny_tokenizer
from .modeling import (
    HYBRID_CAUSAL_LM_CLASSES,
    HYBRID_CONFIG_CLASSES,
    LINEAR_MIXERS,
    MIXER_TYPES,
    SUPPORTED_TEACHER_TYPES,
    LinearAttentionMixer,
)

# Config keys that describe the checkpoint rather than the architecture.
_NON_ARCH_KEYS = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}


def teacher_family(config) -> str:
    """The teacher family (`llama`, `qwen2`, ...) of a teacher or student config; clear error if unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type and model_type.startswith("hybrid_"):
        model_type = model_type[len("hybrid_") :]
    if model_type not in SUPPORTED_TEACHER_TYPES:
        raise ValueError(
            f"Unsupported architecture {model_type!r}: hybrid-distill supports {list(SUPPORTED_TEACHER_TYPES)} "
            "(Llama, Qwen2/2.5, Qwen3 dense and Mistral checkpoints)."
        )
    return model_type


def mixers_from_softmax_layers(num_layers: int, softmax_layers: Sequence[int], linear: str = "gdn") -> list[str]:
    """Per-layer mixer list with `softmax_layers` kept as softmax and every other layer `linear`."""
    if linear not in MIXER_TYPES or linear == "softmax":
        raise ConfigError(f"linear mixer must be one of {[m for m in MIXER_TYPES if m != 'softmax']}, got {linear!r}")
    bad = [i for i in softmax_layers if not 0 <= int(i) < num_layers]
    if bad:
        raise ConfigError(f"Softmax layer indices {bad} are out of range for a model with {num_layers} layers (0-based).")
    keep = {int(i) for i in softmax_layers}
    return ["softmax" if i in keep else linear for i in range(num_layers)]


def resolve_mixers(
    num_layers: int, mixers: str | Sequence[str] | None = None, softmax_layers: str | Sequence[int] | None = None, linear: str = "gdn"
) -> list[str]:
    """A mixer list from either an explicit list (or comma-separated string) or the softmax layer indices."""
    if mixers is not None:
        parsed = [m.strip() for m in mixers.split(",") if m.strip()] if isinstance(mixers, str) else list(mixers)
        if not parsed:
            raise ConfigError(f"the mixer list is empty; give one mixer per layer ({num_layers}), or softmax layers instead")
        return parsed
    if isinstance(softmax_layers, str):
        softmax_layers = [int(x) for x in softmax_layers.replace(" ", "").split(",") if x]
    return mixers_from_softmax_layers(num_layers, softmax_layers or [], linear)


def student_config(teacher_config, mixers: Sequence[str], mixer_options: dict | None = None, teacher_name: str | None = None):
    """The hybrid config for `teacher_config` with one mixer per layer."""
    family = teacher_family(teacher_config)
    fields = {k: v for k, v in teacher_config.to_dict().items() if k not in _NON_ARCH_KEYS}
    for key in ("mixers", "mixer_options", "teacher"):
        fields.pop(key, None)
    teacher_info = dict(getattr(teacher_config, "teacher", None) or {}) or {
        "model_type": family,
        "name_or_path": teacher_name or getattr(teacher_config, "_name_or_path", "") or "",
        "architectures": list(getattr(teacher_config, "architectures", None) or []),
    }
    try:  # the config classes raise ValueError (they are remote code: no imports from this package)
        config = HYBRID_CONFIG_CLASSES[family](
            **fields, mixers=list(mixers), mixer_options=mixer_options, teacher=teacher_info
        )
    except ValueError as err:
        raise ConfigError(f"student layout: {err}") from None
    config._attn_implementation = getattr(teacher_config, "_attn_implementation", None) or "sdpa"
    return config


def build_student(
    teacher: PreTrainedModel,
    mixers: Sequence[str],
    mixer_options: dict | None = None,
    init_from: PreTrainedModel | None = None,
) -> PreTrainedModel:
    """Build a hybrid student from `teacher` (any supported HF causal LM).

    Every teacher weight is copied (embeddings, norms, MLPs, lm_head, attention projections — the
    linear mixers take over q/k/v/o), except those the mixer options leave out of GDN layers
    (`gdn_use_qkv_bias`, `gdn_use_qk_norm`); parameters the teacher lacks get the standard init. With
    `init_from` (an earlier student, e.g. the all-linear Stage-1 model), layers whose mixer is the
    same in both also take that student's mixer weights (the paper reuses Stage-1 mixers).
    The student lives on the teacher's device and dtype; the teacher is not modified.
    """
    family = teacher_family(teacher.config)
    config = student_config(teacher.config, mixers, mixer_options, getattr(teacher, "name_or_path", None))
    param = next(teacher.parameters())
    with torch.device("meta"):
        student = HYBRID_CAUSAL_LM_CLASSES[family](config)
    student.to_empty(device=param.device)
    student.tie_weights()  # to_empty gives tied parameters separate storage; re-tie before loading
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    # Non-persistent buffers (rotary inv_freq, ...) are not in the state dict; to_empty left them garbage.
    teacher_buffers = dict(teacher.named_buffers())
    with torch.no_grad():
        for name, buf in student.named_buffers():
            if name not in teacher_buffers:
                raise RuntimeError(f"Student buffer {name!r} has no counterpart in the teacher")
            buf.copy_(teacher_buffers[name])
    left_out = {f"{name}.{p}" for name, module in student.named_modules() if isinstance(module, LinearAttentionMixer)
                for p in module.dropped_teacher_parameters}
    unexpected = [k for k in unexpected if k not in left_out]
    if unexpected:
        raise RuntimeError(f"Teacher weights the student cannot hold: {unexpected[:8]}")
    new_params = {n for n, _ in _new_parameter_names(student)}
    not_covered = [k for k in missing if k not in new_params and not _is_tied_alias(student, k)]
    if not_covered:
        raise RuntimeError(f"Student parameters neither transferred nor new: {not_covered[:8]}")
    for module in student.modules():
        if isinstance(module, LinearAttentionMixer):
            module.init_new_parameters()
    cast_model(student, param.dtype)  # rotary inv_freq stays fp32, as in the teacher
    if init_from is not None:
        _copy_matching_mixers(student, init_from)
    student.train(teacher.training)
    return student


def derive_student(teacher: PreTrainedModel, base: PreTrainedModel, mixers: Sequence[str]) -> PreTrainedModel:
    """A student with layout `mixers` that starts from `base` (an earlier student) wherever it can.

    Every weight of `base` is reused (embeddings, norms, MLPs, lm_head, and the mixers of layers
    whose mixer type is unchanged); layers whose mixer differs from `base` take the teacher's
    attention (for softmax/swa) or a fresh mixer initialised from the teacher's q/k/v/o. This
    builds the one-swap students of layer selection: all-linear `base` with layer l restored to
    the teacher's softmax attention (greedy addition), or the teacher with layer l linear (greedy
    removal, `base` = the Stage-1 all-linear student).
    """
    student = build_student(teacher, mixers, base.config.mixer_options).to(next(base.parameters()).dtype)
    base_mixers = list(base.config.mixers)
    if len(base_mixers) != len(mixers):
        raise ConfigError(f"base student has {len(base_mixers)} layers, the new layout {len(mixers)}")
    changed = tuple(f"model.layers.{i}.self_attn." for i, (a, b) in enumerate(zip(base_mixers, mixers)) if a != b)
    own = student.state_dict()
    with torch.no_grad():
        for key, value in base.state_dict().items():
            if key in own and not key.startswith(changed):
                own[key].copy_(value.to(own[key].dtype))
    return student


def _new_parameter_names(student: PreTrainedModel):
    for name, module in student.named_modules():
        if isinstance(module, LinearAttentionMixer):
            transferred = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
            for pname, p in module.named_parameters():
                if pname.split(".")[0] not in transferred:
                    yield f"{name}.{pname}", p


def _is_tied_alias(model: PreTrainedModel, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _copy_matching_mixers(student: PreTrainedModel, source: PreTrainedModel) -> None:
    """Copy mixer weights of layers whose mixer type is the same in `source` and `student`."""
    src_mixers, dst_mixers = source.config.mixers, student.config.mixers
    if len(src_mixers) != len(dst_mixers):
        raise ConfigError("init_from has a different number of layers than the student")
    src_layers, dst_layers = source.model.layers, student.model.layers
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(src_mixers, dst_mixers)):
            if a == b and a in LINEAR_MIXERS:
                dst_layers[i].self_attn.load_state_dict(src_layers[i].self_attn.state_dict())


def load_teacher(path_or_name: str | Path, dtype: torch.dtype | str | None = None, device: str | None = None, **kwargs):
    """Load a teacher causal LM (local path, hub id, or `tiny:<variant>` for a built-in random-weight
    teacher); clear errors for missing paths and unsupported families."""
    if str(path_or_name).startswith("tiny:"):
        model = tiny_teacher(str(path_or_name).split(":", 1)[1])
        model.name_or_path = str(path_or_name)
        if dtype is not None and dtype != "auto":
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.to(device) if device is not None else model
    path = Path(str(path_or_name)).expanduser()
    # A hub id is "name" or "org/name"; anything with more parts, or that exists here, is a local path.
    looks_local = str(path_or_name).startswith((".", "/", "~")) or str(path_or_name).count("/") > 1 or path.exists()
    if looks_local and not path.exists():
        raise FileNotFoundError(f"Model path {str(path)!r} does not exist")
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"Model path {str(path)!r} has no config.json (is it a Hugging Face model directory?)")
    if looks_local:
        for file in sorted(path.glob("*.safetensors")):
            check_safetensors_file(file)  # a truncated download fails here with the file named
    try:
        config = AutoConfig.from_pretrained(str(path_or_name), **kwargs)
    except OSError as err:
        if looks_local:
            raise
        raise FileNotFoundError(
            f"{str(path_or_name)!r} is not a local model directory and could not be loaded from the Hugging Face "
            f"Hub ({type(err).__name__}: {str(err).splitlines()[0]}); check the path, or go online / set HF_HOME"
        ) from err
    teacher_family(config)
    model = AutoModelForCausalLM.from_pretrained(str(path_or_name), dtype=dtype or "auto", **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(teacher_spec: str, tokenizer_path: str | None = None, vocab_size: int | None = None):
    """The tokenizer for a model: `tokenizer_path` (a path / hub id, or "tiny"), else the model's own,
    else (tiny teachers) the tiny tokenizer."""
    spec = str(tokenizer_path or teacher_spec)
    if spec == "tiny" or spec.startswith("tiny:"):
        return tiny_tokenizer(vocab_size) if vocab_size else tiny_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise ConfigError(f"no tokenizer found at {spec!r} ({err}); pass --tokenizer PATH") from err


def teacher_config(teacher: str):
    """The Hugging Face config of a teacher spec (reads only the config of a real checkpoint); an unsupported
    architecture is named here, before anything is built from it."""
    if str(teacher).startswith("tiny:"):
        return tiny_teacher(str(teacher).split(":", 1)[1]).config
    config = AutoConfig.from_pretrained(str(teacher))
    teacher_family(config)
    return config


def teacher_num_layers(teacher: str) -> int:
    """Number of decoder layers of a teacher spec."""
    return teacher_config(teacher).num_hidden_layers


# Config fields a student copies from its teacher that decide whether the teacher's weights fit it.
ARCHITECTURE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size")


def _config_dict(config) -> dict:
    return dict(config) if isinstance(config, dict) else config.to_dict()


def check_student_fits_teacher(student_config, teacher_config, student: str = "the student",
                               teacher: str = "the teacher") -> None:
    """ConfigError naming both models when the student (a config, or its config.json as a dict) was not made
    from a teacher of this architecture: another family, layer count, width or vocabulary. Distilling it would
    fail deep inside the model (an index out of range) or train against a teacher it does not mirror."""
    s, t = _config_dict(student_config), _config_dict(teacher_config)
    s_type, t_type = str(s.get("model_type")), str(t.get("model_type"))
    if not s_type.startswith("hybrid_"):
        raise ConfigError(f"{student} holds a {s_type!r} model, not a hybrid student (make one with "
                          f"`hybrid-distill convert --teacher {teacher}`)")
    same_family = s_type.removeprefix("hybrid_") == t_type.removeprefix("hybrid_")
    diffs = [] if same_family else [f"model_type: {s_type} vs {t_type}"]
    diffs += [f"{key}: {s[key]} vs {t[key]}" for key in ARCHITECTURE_KEYS
              if s.get(key) is not None and t.get(key) is not None and s[key] != t[key]]
    if diffs:
        raise ConfigError(f"{student} was not made from a teacher like {teacher} (student vs teacher: "
                          f"{'; '.join(diffs)}); build the student from this teacher, or give the teacher it was made from")


def rope_scaling_type(config) -> str | None:
    """The rotary scaling of a config (``llama3``, ``yarn``, ``dynamic``, ...), or None for plain RoPE."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_layer_type = [params] if "rope_type" in params or "type" in params else list(params.values())
    kinds = sorted({str(p.get("rope_type", p.get("type"))) for p in per_layer_type if isinstance(p, dict)} - {"default", "None"})
    return ",".join(kinds) or None


def check_positions(config, seq_len: int, model: str = "the teacher") -> str | None:
    """Refuse (ConfigError) sequences longer than the model's ``max_position_embeddings``: its positions beyond
    that were never trained, so the teacher's outputs there are no target. Under rotary scaling that extends the
    context the length may be legitimate: then the warning to show is returned instead (None: no concern)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or seq_len <= limit:
        return None
    scaling = rope_scaling_type(config)
    text = f"seq_len {seq_len} is longer than {model}'s max_position_embeddings {limit}"
    if scaling is None:
        raise ConfigError(f"{text}, the longest sequence it was trained on; use seq_len <= {limit}")
    return f"{text}; training on it anyway, as its rope scaling ({scaling}) may extend its context"


def student_skeleton(teacher_config, mixers: Sequence[str], mixer_options: dict | None = None) -> PreTrainedModel:
    """The student `build_student` would make, on the meta device (no memory, no weights): to inspect its modules."""
    config = student_config(teacher_config, mixers, mixer_options)
    with torch.device("meta"):
        return HYBRID_CAUSAL_LM_CLASSES[teacher_family(teacher_config)](config)


def model_identity(spec: str) -> dict[str, str]:
    """What a model is, for settings keys: a local checkpoint by the fingerprint of its weights and the SHA-256 of
    its ``config.json``, not by where it lies (a run folder moved to another machine keeps its work; a model
    overwritten in place is another model); any other spec (a Hub name, ``tiny:...``) by the spec itself."""
    path = Path(spec)
    if path.is_dir() and any(path.glob("*.safetensors")):
        config = path / "config.json"
        return {"weights": weights_fingerprint(path), "config": sha256_file(config)[:16] if config.is_file() else None}
    return {"spec": str(spec)}
