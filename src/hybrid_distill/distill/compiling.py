"""``torch.compile`` for distillation: each decoder layer of the teacher and the student on its own.

Compiling layer by layer (not the whole model) keeps compile time to one graph per distinct layer
type, works under activation checkpointing and FSDP2 (compile first, then shard, as torchtitan
does), and leaves fla's Triton kernels as they are (`hybrid_ops` marks them
``torch.compiler.disable``, so each linear mixer's kernel is a graph break with compiled code
around it). Inductor then fuses what eager runs as separate kernels: RMSNorm, SwiGLU, residual
adds, rotary embeddings, the mixers' gates and norms.

"teacher" compiles the frozen teacher's layers; "all" the student's too, which makes a Stage-2 step faster
and smaller than eager (benchmarks/RESULTS.md) and is the setting to use. `hybrid_ops.fla_available` is a
constant to dynamo, so checking for fla does not split a mixer into several graphs.
"""

from __future__ import annotations

from torch import nn

from ..compile_config import relax_recompile_limits

BACKEND = "inductor"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers ModuleList to compile")
    return layers


def compile_decoder_layers(model: nn.Module, backend: str | None = None) -> int:
    """Compile every decoder layer of ``model`` in place (``nn.Module.compile``); returns how many.

    Layers already compiled are left alone, so calling it again (e.g. on a teacher shared by
    several runs) costs nothing.
    """
    relax_recompile_limits()
    count = 0
    for layer in decoder_layers(model):
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(backend=backend or BACKEND)
            count += 1
    return count
