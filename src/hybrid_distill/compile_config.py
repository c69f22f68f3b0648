"""torch.compile settings shared by compiled training layers and the compiled decode step."""

from __future__ import annotations

import torch

# Decoder layers differ only in which mixer they hold, but torch.compile guards on per-layer
# attributes and would recompile per layer; past its default limit of 8 it silently falls back to
# eager for the rest. Deep models need one entry per layer.
_MIN_CACHE_SIZE = 256


def relax_recompile_limits() -> None:
    """Let one compiled graph serve every layer of a type, and let deep models compile every layer.

    Integer module attributes (``layer_idx``) become graph inputs instead of constants (otherwise
    each layer gets its own cache entry, all of whose guards are checked on every call), and the
    recompile limits are raised to cover what still recompiles per layer.
    """
    dynamo = torch._dynamo.config
    if hasattr(dynamo, "allow_unspec_int_on_nn_module"):
        dynamo.allow_unspec_int_on_nn_module = True
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, _MIN_CACHE_SIZE)
    if hasattr(dynamo, "accumulated_cache_size_limit"):
        dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, _MIN_CACHE_SIZE)
