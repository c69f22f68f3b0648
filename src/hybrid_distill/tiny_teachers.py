"""Small random-weight teachers of every supported family, built from configs (no downloads).

Used by the test suite and for quick CPU runs. Variants cover what surgery must get right:
GQA, Qwen2 q/k/v biases, Qwen3 q/k norms, tied embeddings and Llama-3 rope scaling.
"""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .config import ConfigError
from .dtypes import cast_model

_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}

# name -> (family, overrides). Each variant exercises a different surgery path.
TINY_TEACHER_VARIANTS: dict[str, tuple[str, dict]] = {
    "llama-gqa": ("llama", {"num_key_value_heads": 2}),
    "llama3-rope-tied": (
        "llama",
        {
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2-bias-tied": ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen3-qknorm": ("qwen3", {"num_key_value_heads": 2, "head_dim": 16}),
    "mistral": ("mistral", {"num_key_value_heads": 1, "sliding_window": None}),
}


def tiny_teacher_config(family: str, **overrides):
    """A small config of `family` (llama, mistral, qwen2, qwen3); `overrides` replace any field."""
    if family not in _FAMILIES:
        raise ConfigError(f"Unknown family {family!r}; choose from {sorted(_FAMILIES)}")
    config_cls, _ = _FAMILIES[family]
    fields = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    config = config_cls(**fields)
    config._attn_implementation = "sdpa"
    return config


def tiny_teacher(family_or_variant: str = "llama-gqa", seed: int = 0, dtype=torch.float32, **overrides) -> PreTrainedModel:
    """Build a random-weight teacher; accepts a family name or a key of `TINY_TEACHER_VARIANTS`."""
    if family_or_variant in TINY_TEACHER_VARIANTS:
        family, variant_overrides = TINY_TEACHER_VARIANTS[family_or_variant]
        overrides = {**variant_overrides, **overrides}
    elif family_or_variant in _FAMILIES:
        family = family_or_variant
    else:
        raise ConfigError(
            f"Unknown tiny teacher {family_or_variant!r}; choose a variant {sorted(TINY_TEACHER_VARIANTS)} "
            f"or a family {sorted(_FAMILIES)}"
        )
    config = tiny_teacher_config(family, **overrides)
    _, model_cls = _FAMILIES[family]
    torch.manual_seed(seed)
    model = cast_model(model_cls(config), dtype)
    if family == "qwen2":  # HF initializes biases to zero; make them non-zero so bias transfer is tested
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    return model.eval()
