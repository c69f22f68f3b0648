"""Casting whole models between dtypes without rounding the buffers that must stay in fp32."""

from __future__ import annotations

import torch
from torch import nn

# Rotary inverse frequencies: transformers computes them in fp32 and the angles as position x inv_freq in
# fp32. Rounded to bf16 (relative error ~2^-9) the angle at position p is off by up to ~p/500 rad, so a
# `model.to(torch.bfloat16)` model no longer matches the same checkpoint loaded in bf16 (whose non-persistent
# buffers are rebuilt in fp32) beyond a few hundred tokens.
FP32_BUFFER_SUFFIXES = ("inv_freq",)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` (in place), except that rotary ``inv_freq`` buffers keep their fp32 values."""
    kept = {name: buf for name, buf in model.named_buffers()
            if name.endswith(FP32_BUFFER_SUFFIXES) and buf.dtype == torch.float32}
    model.to(dtype)
    for name, buf in kept.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[leaf] = buf.to(owner._buffers[leaf].device)
    return model
