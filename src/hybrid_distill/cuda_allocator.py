"""CUDA caching-allocator settings: expandable segments unless the user configured the allocator."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

# torch reads the first of these that is set (PYTORCH_ALLOC_CONF from torch 2.9 on, the others before).
ALLOCATOR_ENV_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def prefer_expandable_segments(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Turn on the allocator's expandable segments unless the user configured the allocator.

    Segments that grow in place instead of new fixed-size blocks stop fragmentation from failing a
    run whose live tensors fit: Stage 2 at 4 x 4096 tokens under an 80 GB GPU's memory reserved
    77.9 GiB and once ran out of memory without it, 75.2-75.7 GiB with it (benchmarks/RESULTS.md).
    The allocator reads the variable when CUDA is first used, so call this before that. Returns
    whether the setting was added.
    """
    if configured_allocator_env(environ):
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return True


def prefer_expandable_segments_in_process(environ: MutableMapping[str, str] = os.environ) -> bool:
    """`prefer_expandable_segments` for a process that may be using CUDA already (the Python API).

    Besides the environment (read by the allocator at CUDA's start and inherited by child processes),
    the setting goes to the running allocator, whose segments made from then on grow in place; those
    made before keep their fixed size. Returns whether the setting was added.
    """
    if not prefer_expandable_segments(environ):
        return False
    if torch.cuda.is_available():
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9
        if setter is None:
            setter = torch.cuda.memory._set_allocator_settings
        setter(EXPANDABLE_SEGMENTS)
    return True


def configured_allocator_env(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """The allocator variables set in ``environ`` (to hand on to worker processes)."""
    return {name: environ[name] for name in ALLOCATOR_ENV_VARS if environ.get(name)}


def expandable_segments_configured(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether the environment asks the allocator for expandable segments."""
    configured = configured_allocator_env(environ)
    if not configured:
        return False
    value = next(iter(configured.values()))  # torch uses the first one set
    settings = dict(item.split(":", 1) for item in value.replace(" ", "").split(",") if ":" in item)
    return settings.get("expandable_segments", "").lower() == "true"
