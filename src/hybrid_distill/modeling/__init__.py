"""Hybrid student models (Hugging Face native) and the surgery that builds them from a teacher."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_hybrid import (
    DEFAULT_MIXER_OPTIONS,
    HYBRID_CONFIG_CLASSES,
    LINEAR_MIXERS,
    MIXER_TYPES,
    NORM_EPS_TEACHER,
    STUDENT_LAYOUTS,
    SUPPORTED_TEACHER_TYPES,
    layout_mixer_options,
    resolve_mixer_options,
    validate_mixers,
)
from .modeling_hybrid import (
    CACHE_ARG,
    HYBRID_CAUSAL_LM_CLASSES,
    GatedDeltaNetMixer,
    GLAMixer,
    HybridCache,
    LinearAttentionMixer,
    LinearStateLayer,
    output_cache,
)

for _family, _config_cls in HYBRID_CONFIG_CLASSES.items():
    _model_cls = HYBRID_CAUSAL_LM_CLASSES[_family]
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)
    # save_pretrained copies the modeling files and writes `auto_map`, so checkpoints load with
    # trust_remote_code=True where hybrid_distill is not installed.
    _config_cls.register_for_auto_class()
    _model_cls.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CACHE_ARG",
    "DEFAULT_MIXER_OPTIONS",
    "HYBRID_CAUSAL_LM_CLASSES",
    "HYBRID_CONFIG_CLASSES",
    "LINEAR_MIXERS",
    "MIXER_TYPES",
    "NORM_EPS_TEACHER",
    "STUDENT_LAYOUTS",
    "SUPPORTED_TEACHER_TYPES",
    "GatedDeltaNetMixer",
    "GLAMixer",
    "HybridCache",
    "LinearAttentionMixer",
    "LinearStateLayer",
    "layout_mixer_options",
    "output_cache",
    "resolve_mixer_options",
    "validate_mixers",
]
