"""torch.compile settings shared by compiled training layers and the compiled decode step."""

from __future__ import annotations

import torch

# Decoder layers differ only in which mixer they hold, but torch.compile guards on per-layer
# attributes and would recompile per layer; past its default limit of 8 it silently falls back to
# eager for the rest. Deep models need one entry per layer.
_MIN_CACHE_SIZE = 256


def relax_recompile_limits(unspecialize_module_ints: bool = True) -> None:
    """Let deep models compile every layer, and (``unspecialize_module_ints``) one graph serve all
    layers of a type.

    The recompile limits are raised to cover what recompiles per layer. With
    ``unspecialize_module_ints``, integer module attributes (``layer_idx``) become graph inputs
    instead of constants (otherwise each layer gets its own cache entry, all of whose guards are
    checked on every call).
    """
    dynamo = torch._dynamo.config
    if unspecialize_module_ints and hasattr(dynamo, "allow_unspec_int_on_nn_module"):
        dynamo.allow_unspec_int_on_nn_module = True
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, _MIN_CACHE_SIZE)
    if hasattr(dynamo, "accumulated_cache_size_limit"):
        dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, _MIN_CACHE_SIZE)
