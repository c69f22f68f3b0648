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
    # Gated linear attention (fla GatedLinearAttention defaults).
    "gla_use_output_gate": True,
    "gla_gate_low_rank_dim": 16,
    "gla_gate_logit_normalizer": 16.0,
    # Sliding-window softmax attention: the teacher's attention restricted to this many past tokens.
    "swa_window": 64,
    "norm_eps": 1e-5,
    # "auto": fla kernels on CUDA when installed, else pure PyTorch; "torch" or "fla" to force one.
    "kernel_backend": "auto",
}

SUPPORTED_TEACHER_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def resolve_mixer_options(options: dict | None) -> dict:
    """Fill defaults and reject unknown option names (a typo must not silently fall back to a default)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULT_MIXER_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown mixer option(s) {unknown}; valid options: {sorted(DEFAULT_MIXER_OPTIONS)}")
    resolved = {**DEFAULT_MIXER_OPTIONS, **options}
    for name, value in resolved.items():  # bool("false") is True: a value of the wrong type must not pass
        default = DEFAULT_MIXER_OPTIONS[name]
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
