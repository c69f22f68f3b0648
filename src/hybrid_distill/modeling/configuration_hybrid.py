"""Configurations of hybrid students: a teacher family's config plus a mixer per layer.

Self-contained (imports only torch/transformers): this file is copied next to saved checkpoints
and loaded as remote code where `hybrid_distill` is not installed.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

MIXER_TYPES = ("softmax", "gdn", "gla", "swa")
LINEAR_MIXERS = ("gdn", "gla")

# Defaults for the options of every mixer. Shared keys are prefixed with the mixer name.
DEFAULT_MIXER_OPTIONS: dict[str, object] = {
    # Gated DeltaNet (as the paper's `gdn_v4` student: no short conv, output gate on).
    "gdn_use_short_conv": False,
    "gdn_conv_size": 4,
    "gdn_use_output_gate": True,
    # fla applies SiLU to q, k, v when there is no short conv; "identity" keeps the transferred projections linear.
    "gdn_qkv_activation": "silu",
    # The teacher's q/k/v biases (Qwen2) inside GDN layers; false drops them (Qwen3.5's GDN has no biases).
    "gdn_use_qkv_bias": True,
    # The teacher's per-head q/k RMSNorms (Qwen3) inside GDN layers; false leaves them out (Qwen3.5's GDN has none).
    "gdn_use_qk_norm": True,
    # Gated linear attention (fla GatedLinearAttention defaults).
    "gla_use_output_gate": True,
    "gla_gate_low_rank_dim": 16,
    "gla_gate_logit_normalizer": 16.0,
    # Sliding-window softmax attention: the teacher's attention restricted to this many past tokens.
    "swa_window": 64,
    # eps of the linear mixers' output RMSNorm: a number, or "teacher" for the teacher config's rms_norm_eps.
    "norm_eps": 1e-5,
    # "auto": fla kernels on CUDA when installed, else pure PyTorch; "torch" or "fla" to force one.
    "kernel_backend": "auto",
}

# `norm_eps` value that stands for the teacher config's `rms_norm_eps` (resolved when the student config is built).
NORM_EPS_TEACHER = "teacher"

SUPPORTED_TEACHER_TYPES = ("llama", "qwen2", "qwen3", "mistral")

# Student layouts: presets of mixer options. "qwen3_5" trains GDN layers in the form stock Hugging Face
# Qwen3.5 text (`qwen3_5_text`) computes, so `hybrid-distill export --format qwen3_5` writes the student
# exactly: no biases or q/k norms inside GDN, output gate on, SiLU on q/k/v, output-norm eps = the
# teacher's rms_norm_eps. It also needs `gdn` as the linear mixer and no `swa` layers (mixers, not options).
STUDENT_LAYOUTS: dict[str, dict[str, object]] = {
    "default": {},
    "qwen3_5": {
        "gdn_use_qkv_bias": False,
        "gdn_use_qk_norm": False,
        "gdn_use_output_gate": True,
        "gdn_qkv_activation": "silu",
        "norm_eps": NORM_EPS_TEACHER,
    },
}


def resolve_mixer_options(options: dict | None) -> dict:
    """Fill defaults and reject unknown option names (a typo must not silently fall back to a default)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULT_MIXER_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown mixer option(s) {unknown}; valid options: {sorted(DEFAULT_MIXER_OPTIONS)}")
    resolved = {**DEFAULT_MIXER_OPTIONS, **options}
    for name, value in resolved.items():  # bool("false") is True: a value of the wrong type must not pass
        default = DEFAULT_MIXER_OPTIONS[name]
        if name == "norm_eps" and value == NORM_EPS_TEACHER:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        else:
            ok = isinstance(value, str)
        if not ok:
            kind = {bool: "true or false", int: "a positive integer", float: "a positive number", str: "a string"}[type(default)]
            raise ValueError(f"mixer option {name} must be {kind}, got {value!r}")
    if resolved["gdn_qkv_activation"] not in ("silu", "identity"):
        raise ValueError(f"gdn_qkv_activation must be 'silu' or 'identity', got {resolved['gdn_qkv_activation']!r}")
    if resolved["kernel_backend"] not in ("auto", "torch", "fla"):
        raise ValueError(f"kernel_backend must be 'auto', 'torch' or 'fla', got {resolved['kernel_backend']!r}")
    if int(resolved["swa_window"]) < 1:
        raise ValueError(f"swa_window must be >= 1, got {resolved['swa_window']}")
    return resolved


def layout_mixer_options(layout: str, mixer_options: dict | None = None) -> dict:
    """The mixer options of student layout `layout` with `mixer_options` on top (unresolved: defaults are
    filled when the config is built). An option that contradicts the layout is an error naming both."""
    if layout not in STUDENT_LAYOUTS:
        raise ValueError(f"Unknown student layout {layout!r}; choose from {sorted(STUDENT_LAYOUTS)}")
    preset = STUDENT_LAYOUTS[layout]
    options = dict(mixer_options or {})
    for name, value in options.items():
        if name in preset and value != preset[name]:
            raise ValueError(
                f"mixer option {name}={value!r} contradicts student layout {layout!r}, which sets {name}={preset[name]!r}; "
                f"drop the option or choose layout 'default'"
            )
    return {**preset, **options}


def validate_mixers(mixers: list[str], num_layers: int) -> list[str]:
    """Check a per-layer mixer list; errors name the offending entry."""
    if len(mixers) != num_layers:
        raise ValueError(f"Got {len(mixers)} mixers for a model with {num_layers} layers; give exactly one per layer.")
    for i, name in enumerate(mixers):
        if name not in MIXER_TYPES:
            raise ValueError(f"Unknown mixer {name!r} for layer {i}; choose from {list(MIXER_TYPES)}.")
    return list(mixers)


class HybridConfigMixin:
    """Shared behaviour of the per-family hybrid configs (fields are declared on each dataclass)."""

    def _init_hybrid_fields(self) -> None:
        if self.mixers is None:
            self.mixers = ["softmax"] * self.num_hidden_layers
        self.mixers = validate_mixers(list(self.mixers), self.num_hidden_layers)
        self.mixer_options = resolve_mixer_options(self.mixer_options)
        if self.mixer_options["norm_eps"] == NORM_EPS_TEACHER:
            self.mixer_options["norm_eps"] = float(self.rms_norm_eps)
        self.teacher = dict(self.teacher or {})

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.mixers) if m in LINEAR_MIXERS]

    @property
    def softmax_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.mixers) if m == "softmax"]


@strict
class HybridLlamaConfig(HybridConfigMixin, LlamaConfig):
    model_type = "hybrid_llama"
    mixers: list[str] | None = None
    mixer_options: dict | None = None
    teacher: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._init_hybrid_fields()


@strict
class HybridMistralConfig(HybridConfigMixin, MistralConfig):
    model_type = "hybrid_mistral"
    mixers: list[str] | None = None
    mixer_options: dict | None = None
    teacher: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._init_hybrid_fields()


@strict
class HybridQwen2Config(HybridConfigMixin, Qwen2Config):
    model_type = "hybrid_qwen2"
    mixers: list[str] | None = None
    mixer_options: dict | None = None
    teacher: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._init_hybrid_fields()


@strict
class HybridQwen3Config(HybridConfigMixin, Qwen3Config):
    model_type = "hybrid_qwen3"
    mixers: list[str] | None = None
    mixer_options: dict | None = None
    teacher: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._init_hybrid_fields()


HYBRID_CONFIG_CLASSES = {
    "llama": HybridLlamaConfig,
    "mistral": HybridMistralConfig,
    "qwen2": HybridQwen2Config,
    "qwen3": HybridQwen3Config,
}
