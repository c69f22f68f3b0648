"""Fast greedy decoding for teachers and hybrid students: a preallocated cache and a CUDA-graph step.

HF's eager decode loop re-grows every KV cache with ``torch.cat`` and launches ~40 kernels per
layer from Python, so at batch 8 a decode step of a 1.5B model is host-bound (a 72 ms step holds
11 ms of GPU work). `StaticDecoder` removes both costs, for the teacher and the hybrid alike:

* prefill runs the model's own forward (row groups at a time if asked, to bound activation
  memory) and copies its cache into preallocated buffers: ``[B, Hkv, S, D]`` keys and values per
  softmax layer (S = max_length rounded up to a multiple of KEY_BLOCK), the fp32 recurrent state and short-conv states per linear layer;
* a decode step writes the new key/value in place at the current position (a device tensor),
  attends over the whole buffer with a mask derived from that position, updates linear states in
  place and picks the greedy token, so it has fixed shapes and no host synchronisation;
* on CUDA that step is captured once into a CUDA graph and replayed for every further token.

The step attends with `decode_attention` (one grouped GEMV pass over K and V per layer, keys of a
KV head shared by its query group), not SDPA: SDPA with a mask falls back to repeating K/V for
GQA, which would read the cache ``Hq / Hkv`` times.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compile_config import relax_recompile_limits
from .configuration_hybrid import LINEAR_MIXERS
from .modeling_hybrid import (
    CACHE_ARG,
    LinearAttentionMixer,
    output_cache,
    stack_linear_maps,
    teacher_sliding_window,
)

DECODE_ATTENTION = "hybrid_distill_decode"
KEY_BLOCK = 256  # static KV buffers are allocated in multiples of this many positions


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One-query attention over a static KV buffer (HF attention-function signature).

    query [B, Hq, 1, D]; key/value [B, Hkv, S, D]; attention_mask bool, broadcastable to
    [B, 1, 1, S], True where the key is visible. Returns ([B, 1, Hq, D], None).

    Scores are one GEMM per KV head over the query group. The softmax and the probabilities-times-
    values product then run per block of KEY_BLOCK keys, merged by their maxima and sums (flash-
    decoding's split-K): one [G, S] x [S, D] GEMM per head has too few output tiles to keep the GPU's
    memory bandwidth busy at long S, and a softmax over S in one row per query head (B·Hq rows) has
    too little parallelism; per-block rows have plenty.
    """
    B, Hq, T, D = query.shape
    if T != 1:
        raise ValueError(f"decode_attention serves one query position per step, got {T}")
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scaling is None else scaling
    q = query.reshape(B, Hkv, G, D)  # query head h reads KV head h // G, as repeat_kv
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [B, Hkv, G, S]
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    if S % KEY_BLOCK or S <= KEY_BLOCK:
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        return torch.matmul(probs, value).reshape(B, 1, Hq, D), None  # [B, Hkv, G, D]
    n = S // KEY_BLOCK
    blocks = scores.view(B, Hkv, G, n, KEY_BLOCK)
    block_max = blocks.amax(-1, keepdim=True)  # -inf for a block with no visible key
    block_max = block_max.masked_fill(torch.isinf(block_max), 0.0)
    probs = torch.exp(blocks - block_max)  # [B, Hkv, G, n, KEY_BLOCK], unnormalised per block
    block_sum = probs.sum(-1)  # [B, Hkv, G, n]
    block_out = torch.matmul(probs.to(value.dtype).transpose(2, 3), value.view(B, Hkv, n, KEY_BLOCK, D))  # [B, Hkv, n, G, D]
    block_max = block_max.squeeze(-1)
    weight = torch.exp(block_max - block_max.amax(-1, keepdim=True)) * (block_sum > 0)  # [B, Hkv, G, n]
    out = (block_out.float() * weight.transpose(2, 3)[..., None]).sum(2)  # [B, Hkv, G, D]
    out = out / (block_sum * weight).sum(-1)[..., None]
    return out.to(value.dtype).reshape(B, 1, Hq, D), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)


class _StaticKVLayer:
    """Keys and values of one softmax layer in a preallocated [B, Hkv, S, D] buffer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor):
        self.keys, self.values, self.position = keys, values, position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        self.keys.index_copy_(2, self.position, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, self.position, value_states.to(self.values.dtype))
        return self.keys, self.values


class _StaticLinearLayer:
    """Recurrent and short-conv states of one linear layer, updated in place (the mixers' cache API)."""

    seen_tokens = 1  # > 0: the mixer continues from the stored state

    def __init__(self, recurrent_state: torch.Tensor, conv_states: dict[str, torch.Tensor]):
        self.recurrent_state, self.conv_states = recurrent_state, conv_states

    def update_state(self, recurrent_state, conv_states, num_tokens):
        self.recurrent_state.copy_(recurrent_state)
        for name, state in conv_states.items():
            self.conv_states[name].copy_(state)


class _FusedQKVAttention(nn.Module):
    """A teacher-family softmax attention (Llama, Qwen2/3, Mistral) for the decode step: q, k and v
    from one GEMM over their stacked weights, then as the family's own forward (q/k norms, rotary,
    cache update) with `decode_attention`. At a few rows per step the separate k and v GEMMs are too
    small to use the memory bandwidth.
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention
        projs = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.weight, self.bias, self.sizes = stack_linear_maps([(p.weight, p.bias) for p in projs])
        self.apply_rotary_pos_emb = sys.modules[type(attention).__module__].apply_rotary_pos_emb

    def forward(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        attn = self.attention
        cache = kwargs.get(CACHE_ARG, kwargs.get("past_key_values"))
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, attn.head_dim)
        q, k, v = (t.view(hidden_shape) for t in F.linear(hidden_states, self.weight, self.bias).split(self.sizes, dim=-1))
        if getattr(attn, "q_norm", None) is not None:  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.apply_rotary_pos_emb(q, k, cos, sin)
        k, v = cache.update(k, v, attn.layer_idx)
        out, _ = decode_attention(attn, q, k, v, attention_mask, scaling=attn.scaling)
        return attn.o_proj(out.reshape(*input_shape, -1)), None


class StaticCache:
    """What the attention modules and linear mixers see as ``past_key_values`` during a static step."""

    def __init__(self, layers: list, position: torch.Tensor):
        self.layers, self.position = layers, position

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)


def layer_kinds(config) -> list[tuple[str, int | None]]:
    """Per layer: ("linear", None), ("full", None) or ("sliding", window), for teachers and hybrids."""
    mixers = getattr(config, "mixers", None)
    kinds = []
    for i in range(config.num_hidden_layers):
        mixer = mixers[i] if mixers is not None else "softmax"
        if mixer in LINEAR_MIXERS:
            kinds.append(("linear", None))
        elif mixer == "swa":
            kinds.append(("sliding", int(config.mixer_options["swa_window"])))
        else:
            window = teacher_sliding_window(config, i)
            kinds.append(("full", None) if window is None else ("sliding", int(window)))
    return kinds


@contextmanager
def _attention_implementation(config, name: str):
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def _mixer_options(model) -> list[dict]:
    """The distinct ``options`` dicts of the model's linear mixers (usually one: the config's, shared by all)."""
    mixers = [m for m in model.modules() if hasattr(m, "_kernel") and isinstance(getattr(m, "options", None), dict)]
    return list({id(m.options): m.options for m in mixers}.values())


@contextmanager
def _linear_kernel_backend(options: list[dict], backend: str | None):
    """Run the linear mixers owning ``options`` with ``backend`` ("torch", "fla", "auto") instead of their own."""
    if backend is None:
        yield
        return
    old = [opts.get("kernel_backend") for opts in options]
    for opts in options:
        opts["kernel_backend"] = backend
    try:
        yield
    finally:
        for opts, value in zip(options, old):
            opts["kernel_backend"] = value


# torch.compile modes whose code replays its own CUDA graphs (cudagraph trees).
_GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")
# Rotary types whose frequencies transformers re-derives from the largest position at each call, through a
# branch taken on the host: a captured graph would replay the frequencies of the step it captured.
_HOST_UPDATED_ROPE_TYPES = ("dynamic", "longrope")


def host_updated_rope_type(model) -> str | None:
    """The model's rotary type when transformers updates its frequencies on the host at each call, else None."""
    rope_type = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
    for name in rope_type.values() if isinstance(rope_type, dict) else [rope_type]:
        if isinstance(name, str) and any(kind in name for kind in _HOST_UPDATED_ROPE_TYPES):
            return name
    return None


class StaticDecoder:
    """Greedy decoding of a causal LM with a preallocated cache (and a CUDA graph on CUDA).

    >>> dec = StaticDecoder(model, batch_size=8, max_length=32768 + 256)
    >>> new_tokens = dec.generate(input_ids, max_new_tokens=256)   # [8, 256]

    Works for HF Llama/Qwen2/Qwen3/Mistral teachers and for hybrid students; prompts are unpadded
    and of equal length. ``cuda_graph=None`` captures a graph when the model is on CUDA, unless its
    rotary embedding is of a type whose frequencies change with the position ("dynamic", "longrope"),
    which a graph or a compiled step cannot follow: those decode eagerly.
    ``compile=True`` runs the step through ``torch.compile`` (fuses the many small element-wise
    kernels of a step; the first step compiles, which takes a while). ``compile_mode`` is passed to
    it: "max-autotune-no-cudagraphs" lets inductor time Triton GEMM templates against cuBLAS for the
    step's few-row GEMMs (minutes more of compiling). Modes that capture CUDA graphs themselves
    ("reduce-overhead", "max-autotune") are refused while this decoder captures its own.

    ``linear_kernels``: the linear mixers' backend inside the step; ``None`` = the model's own
    ``kernel_backend`` (default "auto": fla's fused recurrent kernels on CUDA). "torch" compiles the
    one-token recurrence into the step's graph instead of breaking the graph at each fla call (fla's kernels
    are the default because they measured faster at a 1.5B shape: benchmarks/RESULTS.md).

    ``fuse_projections``: each layer's projections of its input (q/k/v; for linear mixers also their
    gate and output-gate projections) run as one GEMM in the step, from stacked copies of the weights
    made here (about 6-11 MB per layer of a 1.5B model). Weights changed after construction are not
    seen by those GEMMs: build a new decoder.
    """

    def __init__(
        self,
        model,
        batch_size: int,
        max_length: int,
        cuda_graph: bool | None = None,
        compile: bool = False,
        linear_kernels: str | None = None,
        fuse_projections: bool = True,
        compile_mode: str | None = None,
    ):
        _register_attention()
        self.model = model.eval()
        self.config = model.config
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.buffer_length = -(-self.max_length // KEY_BLOCK) * KEY_BLOCK
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        rope_type = host_updated_rope_type(model)
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda" and rope_type is None
        self.use_graph = bool(cuda_graph)
        if self.use_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        if rope_type is not None and (self.use_graph or compile):
            raise ValueError(
                f"this model's rotary embedding ({rope_type!r}) recomputes its frequencies from the position on the "
                "host at every step, which a CUDA graph or a torch.compile'd step cannot follow: use "
                "cuda_graph=False and compile=False (eager static decoding handles it)"
            )
        self.kinds = layer_kinds(self.config)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        self.next_tokens = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self._key_positions = torch.arange(self.buffer_length, device=self.device)
        self.cache: StaticCache | None = None
        self.length = 0
        self.graph = None
        self._eager_steps = 0
        if linear_kernels not in (None, "auto", "torch", "fla"):
            raise ValueError(f"linear_kernels must be None, 'auto', 'torch' or 'fla', got {linear_kernels!r}")
        self.linear_kernels = linear_kernels
        self._linear_options = _mixer_options(model) if self.linear_kernels is not None else []
        self._fused_layers = self._fuse_projections() if fuse_projections else []
        if compile:
            # With fla kernels the step breaks at each mixer, whose frames recompile per layer.
            relax_recompile_limits(unspecialize_module_ints=False)
        if compile_mode is not None and not compile:
            raise ValueError(f"compile_mode={compile_mode!r} needs compile=True")
        if compile_mode in _GRAPHING_COMPILE_MODES and self.use_graph:
            raise ValueError(
                f"compile_mode={compile_mode!r} captures CUDA graphs itself, and so does this decoder: use "
                "'max-autotune-no-cudagraphs' (or the default mode), or cuda_graph=False"
            )
        self._step_fn = torch.compile(self._step, dynamic=False, mode=compile_mode) if compile else self._step

    @torch.no_grad()
    def _fuse_projections(self) -> list[tuple[nn.Module, str, Any]]:
        """(owner, attribute, value during a step): the fused projections `_step_context` installs."""
        fused = []
        for layer, (kind, _) in zip(self.model.model.layers[: self.config.num_hidden_layers], self.kinds):
            attn = layer.self_attn
            if isinstance(attn, LinearAttentionMixer):
                fused.append((attn, "fused_projection", attn.fused_input_projection()))
            elif (
                kind != "linear"
                and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
                and hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")
            ):
                fused.append((layer, "self_attn", _FusedQKVAttention(attn)))
        return fused

    @contextmanager
    def _step_context(self):
        """The step's attention function, linear kernels and fused projections, undone afterwards."""
        old = [getattr(owner, name) for owner, name, _ in self._fused_layers]
        for owner, name, value in self._fused_layers:
            setattr(owner, name, value)
        try:
            with _attention_implementation(self.config, DECODE_ATTENTION), _linear_kernel_backend(self._linear_options, self.linear_kernels):
                yield
        finally:
            for (owner, name, _), value in zip(self._fused_layers, old):
                setattr(owner, name, value)

    # -- prefill -----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, rows_per_forward: int | None = None) -> torch.Tensor:
        """Run the prompt [B, T] through the model, fill the static cache; returns the next tokens [B]."""
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"prompt batch {B} != the decoder's batch_size {self.batch_size}")
        if T >= self.max_length:
            raise ValueError(f"prompt of {T} tokens leaves no room to decode within max_length={self.max_length}")
        input_ids = input_ids.to(self.device)
        rows = B if rows_per_forward is None else max(1, int(rows_per_forward))
        self.graph, self._eager_steps = None, 0
        buffers: list[Any] = [None] * len(self.kinds)
        for start in range(0, B, rows):
            out = self.model(input_ids=input_ids[start : start + rows], use_cache=True, logits_to_keep=1)
            self.next_tokens[start : start + rows] = out.logits[:, -1].float().argmax(-1)
            self._copy_cache(output_cache(out), buffers, slice(start, start + rows), T)
            del out
        self.position.fill_(T)
        self.length = T
        self.cache = StaticCache(buffers, self.position)
        self.tokens.copy_(self.next_tokens.view(-1, 1))
        return self.next_tokens.clone()

    def _copy_cache(self, cache, buffers: list, rows: slice, T: int) -> None:
        B, S = self.batch_size, self.buffer_length
        for i, (kind, _) in enumerate(self.kinds):
            layer = cache.layers[i]
            if kind == "linear":
                if buffers[i] is None:
                    state = torch.zeros((B, *layer.recurrent_state.shape[1:]), dtype=layer.recurrent_state.dtype, device=self.device)
                    convs = {n: torch.zeros((B, *s.shape[1:]), dtype=s.dtype, device=self.device) for n, s in layer.conv_states.items()}
                    buffers[i] = _StaticLinearLayer(state, convs)
                buffers[i].recurrent_state[rows] = layer.recurrent_state
                for n, s in layer.conv_states.items():
                    buffers[i].conv_states[n][rows] = s
                continue
            keys, values = layer.keys, layer.values  # [b, Hkv, n, D]; sliding layers keep the last n <= T
            if buffers[i] is None:
                shape = (B, keys.shape[1], S, keys.shape[3])
                buffers[i] = _StaticKVLayer(
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                    self.position,
                )
            n = keys.shape[2]
            buffers[i].keys[rows, :, T - n : T] = keys
            buffers[i].values[rows, :, T - n : T] = values

    # -- decode ------------------------------------------------------------------------------
    def _step(self) -> None:
        """One decode step on static buffers: consumes ``tokens``, writes ``next_tokens``, advances."""
        inner = self.model.model
        B = self.batch_size
        hidden = inner.embed_tokens(self.tokens)
        position_ids = self.position.view(1, 1).expand(B, 1)
        position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
        visible = self._key_positions <= self.position
        masks = {None: visible.view(1, 1, 1, -1)}
        for kind, window in self.kinds:
            if kind == "sliding" and window not in masks:
                masks[window] = (visible & (self._key_positions > self.position - window)).view(1, 1, 1, -1)
        for layer, (kind, window) in zip(inner.layers[: self.config.num_hidden_layers], self.kinds):
            hidden = layer(
                hidden,
                attention_mask=None if kind == "linear" else masks[window],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=True,
                **{CACHE_ARG: self.cache},
            )
        hidden = inner.norm(hidden[:, -1])
        self.next_tokens.copy_(self.model.lm_head(hidden).float().argmax(-1))
        self.tokens.copy_(self.next_tokens.view(-1, 1))
        self.position.add_(1)

    @torch.no_grad()
    def step(self, graph: bool = True) -> torch.Tensor:
        """Feed the last chosen tokens, return the next ones [B] (a view of a static buffer).

        ``graph=False`` runs the step function itself (compiled if asked) even where a CUDA graph
        is captured, e.g. to see its kernels in a profiler.
        """
        if self.cache is None:
            raise RuntimeError("call prefill() before step()")
        if self.length >= self.max_length:
            raise ValueError(f"the static cache is full (max_length={self.max_length}); build a larger StaticDecoder")
        if graph and self.graph is not None:
            self.graph.replay()
        elif graph and self.use_graph and self._eager_steps >= 2:  # kernels tuned and compiled by the eager steps
            self._capture()
            self.graph.replay()
        elif graph and self.use_graph:  # warm-up on a side stream, as CUDA-graph capture requires
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._run_step_function()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._eager_steps += 1
        else:
            self._run_step_function()
        self.length += 1
        return self.next_tokens

    def _run_step_function(self) -> None:
        with self._step_context():
            self._step_fn()

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run_step_function()
        self.graph = graph

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, rows_per_forward: int | None = None) -> torch.Tensor:
        """Greedy continuation [B, max_new_tokens] of an unpadded prompt batch [B, T]."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if input_ids.shape[1] + max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds max_length={self.max_length}"
            )
        out = [self.prefill(input_ids, rows_per_forward)]
        for _ in range(max_new_tokens - 1):
            out.append(self.step().clone())
        return torch.stack(out, dim=1)
