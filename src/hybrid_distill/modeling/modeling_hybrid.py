"""Hybrid students: a Hugging Face teacher whose attention is swapped per layer for a linear mixer.

Layer `i` runs `config.mixers[i]`:
- ``softmax``: the teacher's own attention module, unchanged.
- ``swa``: the teacher's attention module under a sliding-window mask (`swa_window` tokens).
- ``gdn`` / ``gla``: Gated DeltaNet / gated linear attention that takes over the teacher attention's
  ``q_proj/k_proj/v_proj/o_proj`` (and Qwen3's ``q_norm/k_norm``), so state-dict keys, shapes and
  biases stay the teacher's and the student loads straight from a teacher checkpoint. GQA K/V heads
  are repeated per head at run time.

Self-contained (torch + transformers, relative imports only): this file is copied next to saved
checkpoints and loaded as remote code where `hybrid_distill` is not installed.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    MistralModel,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen3ForCausalLM,
    Qwen3Model,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_hybrid import (
    LINEAR_MIXERS,
    HybridLlamaConfig,
    HybridMistralConfig,
    HybridQwen2Config,
    HybridQwen3Config,
)
from .hybrid_ops import gated_delta_rule, gated_linear_attention

# transformers 5.24 renamed the cache argument of forward(), generate()'s model kwargs and the output
# field from `past_key_values` to `cache`. The hybrid model speaks whichever the installed version uses.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"
# transformers 5.24 also changed `Cache.crop(n)`: n tokens to remove (n <= 0) instead of the length to keep
# (negative: counted from the end); generate() there calls `crop(0)` as a no-op on some devices.
CROP_REMOVES_TOKENS = "tokens_to_remove" in inspect.signature(DynamicLayer.crop).parameters


def crop_removes_tokens(n: int, seq_length: int) -> bool:
    """Whether ``Cache.crop(n)`` drops any of ``seq_length`` cached tokens under the installed transformers."""
    if CROP_REMOVES_TOKENS:
        return n != 0
    keep = seq_length + n if n < 0 else n
    return keep < seq_length


def output_cache(outputs):
    """The cache a model output carries, under either transformers spelling."""
    return getattr(outputs, CACHE_ARG)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


class LinearStateLayer(CacheLayerMixin):
    """Cache of one linear-attention layer: a recurrent state [B, H, K, V] (fp32) and short-conv states.

    It also counts the tokens it has seen, so `get_seq_length` works for an all-linear student.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.recurrent_state: torch.Tensor | None = None
        self.conv_states: dict[str, torch.Tensor] = {}
        self.seen_tokens = 0

    def lazy_initialization(self, *args, **kwargs) -> None:
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise RuntimeError("A linear-attention layer stores a recurrent state, not keys and values.")

    def update_state(self, recurrent_state: torch.Tensor | None, conv_states: dict[str, torch.Tensor], num_tokens: int):
        self.recurrent_state = recurrent_state
        self.conv_states = conv_states
        self.seen_tokens += num_tokens
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def offload(self):  # states are small; keep them on device
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        self.recurrent_state, self.conv_states, self.seen_tokens = None, {}, 0

    def _map_batch(self, fn) -> None:
        if self.recurrent_state is not None:
            self.recurrent_state = fn(self.recurrent_state)
        self.conv_states = {name: fn(s) for name, s in self.conv_states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, n: int) -> None:
        if crop_removes_tokens(n, self.seen_tokens):
            raise NotImplementedError(
                "A linear-attention layer's recurrent state cannot be rolled back to an earlier token, so this "
                "cache cannot be cropped (assisted/speculative decoding and rollbacks are not supported)."
            )


def teacher_sliding_window(config, layer_idx: int) -> int | None:
    """The teacher's own sliding window for a softmax layer (Mistral, or Qwen2/3 `sliding_attention`)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral: every layer uses the window when it is set
        return window
    return window if layer_types[layer_idx] == "sliding_attention" else None


def layer_mask_kind(config, layer_idx: int) -> str:
    """Which mask a layer needs: 'linear' (2-D padding mask), 'swa', 'sliding' (teacher's window) or 'full'."""
    mixer = config.mixers[layer_idx]
    if mixer in LINEAR_MIXERS:
        return "linear"
    if mixer == "swa":
        return "swa"
    return "sliding" if teacher_sliding_window(config, layer_idx) is not None else "full"


def packed_cu_seqlens(position_ids: torch.Tensor, batch_size: int) -> torch.Tensor | None:
    """Document boundaries of packed rows as cumulative lengths over the flattened ``[B*T]`` tokens, or
    None when every row holds one document. Documents start where the position ids do not go up by one,
    as transformers' ``find_packed_sequence_indices`` reads them for the softmax layers' masks."""
    pos = position_ids.expand(batch_size, -1)
    starts = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1
    starts[:, 0] = True
    if int(starts.sum()) == batch_size:  # a host read, as in transformers' own check
        return None
    idx = torch.nonzero(starts.flatten()).flatten()
    end = torch.tensor([starts.numel()], device=idx.device)
    return torch.cat([idx, end]).to(torch.int32)


class HybridCache(Cache):
    """Per layer: a KV cache (softmax), a sliding-window KV cache (swa / teacher sliding layers) or a
    recurrent state (linear layers)."""

    def __init__(self, config, **kwargs):
        layers = []
        for i in range(config.num_hidden_layers):
            kind = layer_mask_kind(config, i)
            if kind == "linear":
                layers.append(LinearStateLayer())
            elif kind == "swa":
                layers.append(DynamicSlidingWindowLayer(sliding_window=int(config.mixer_options["swa_window"])))
            elif kind == "sliding":
                layers.append(DynamicSlidingWindowLayer(sliding_window=teacher_sliding_window(config, i)))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)

    def crop(self, n: int) -> None:
        """Crop the softmax layers' caches; refused before any layer changes when a linear state would have to
        be rolled back (a partial crop would leave the layers at different lengths)."""
        for layer in self.layers:
            if isinstance(layer, LinearStateLayer):
                layer.crop(n)  # raises if this crop would drop tokens
        super().crop(n)


# --------------------------------------------------------------------------------------------
# Linear mixers
# --------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x).to(dtype)


class ShortConvolution(nn.Module):
    """Depthwise causal conv1d + SiLU over [B, T, C], with a cache of the last `kernel_size - 1` inputs."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, cu_seqlens=None):
        """Return (y, new_state); `state` is [B, C, kernel_size - 1] (zeros when None)."""
        if cu_seqlens is not None:  # packed documents: never convolve across a boundary
            ys = [self.forward(x[:, s:e])[0] for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
            return torch.cat(ys, dim=1), None
        x = x.transpose(1, 2)  # [B, C, T]
        pad = self.kernel_size - 1
        if state is None:
            state = x.new_zeros(x.shape[0], x.shape[1], pad)
        full = torch.cat([state.to(x.dtype), x], dim=-1)
        if x.shape[-1] == 1:  # a decode step: one dot product per channel (a conv call is a kernel launch of its own)
            y = (full.float() * self.conv.weight[:, 0].float()).sum(-1, keepdim=True).to(x.dtype)
        else:
            y = F.conv1d(full, self.conv.weight, groups=x.shape[1])
        return F.silu(y).transpose(1, 2), full[..., full.shape[-1] - pad :]


def stack_linear_maps(maps: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """(weight, bias or None, output sizes) of one linear map computing all of ``maps`` [(weight, bias)]
    side by side; maps without a bias get zeros when another has one."""
    weight = torch.cat([w for w, _ in maps])
    bias = None
    if any(b is not None for _, b in maps):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in maps])
    return weight, bias, tuple(w.shape[0] for w, _ in maps)


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, Hkv * n_rep, D]; query head h uses KV head h // n_rep (as HF's repeat_kv)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)


class LinearAttentionMixer(nn.Module):
    """Shared part of the linear mixers: teacher projections, GQA, padding, cache, output norm/gate.

    Subclasses define the gate parameters (`_gates`) and the kernel (`_kernel`).
    """

    # Parameters kept in fp32 even when the model is cast to bf16/fp16.
    fp32_parameters: tuple[str, ...] = ()
    # (weight, bias, names, sizes) of all input projections stacked, set by a decoder for its steps
    # (see `fused_input_projection`); None: one GEMM per projection.
    fused_projection: tuple | None = None

    def __init__(self, config, layer_idx: int, attention: nn.Module, *, use_short_conv: bool, use_output_gate: bool,
                 use_qkv_bias: bool = True, use_qk_norm: bool = True):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.options = config.mixer_options
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.eps = float(self.options["norm_eps"])
        # Teacher weights, taken over as they are (attention-weight transfer).
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
        )
        # Teacher parameters this mixer leaves out (names relative to the mixer), so that loading the teacher's
        # state dict into the student expects them to be unused.
        dropped = []
        if not use_qkv_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                proj = getattr(self, name)
                if proj.bias is not None:
                    proj.bias = None
                    dropped.append(f"{name}.bias")
        self.q_norm = getattr(attention, "q_norm", None) if use_qk_norm else None
        self.k_norm = getattr(attention, "k_norm", None) if use_qk_norm else None
        if not use_qk_norm:
            dropped += [f"{name}.{p}" for name in ("q_norm", "k_norm") if getattr(attention, name, None) is not None
                        for p, _ in getattr(attention, name).named_parameters()]
        self.dropped_teacher_parameters: tuple[str, ...] = tuple(dropped)
        self.use_short_conv = use_short_conv
        if use_short_conv:
            size = int(self.options["gdn_conv_size"])
            self.q_conv1d = ShortConvolution(self.num_heads * self.head_dim, size)
            self.k_conv1d = ShortConvolution(self.num_kv_heads * self.head_dim, size)
            self.v_conv1d = ShortConvolution(self.num_kv_heads * self.head_dim, size)
        self.use_output_gate = use_output_gate
        if use_output_gate:
            self.g_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.o_norm_weight = nn.Parameter(torch.ones(self.head_dim))

    # -- parameters the teacher lacks ----------------------------------------------------------
    def new_modules(self) -> list[nn.Module]:
        """Submodules that are not taken over from the teacher (they need fresh initialization)."""
        mods = [m for name, m in self.named_children() if name not in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
        return [sub for m in mods for sub in m.modules()]

    def init_new_parameters(self) -> None:
        """Standard init for the parameters the teacher lacks; respects HF's `_is_hf_initialized` flags."""
        std = getattr(self.config, "initializer_range", 0.02)
        for module in self.new_modules():
            if isinstance(module, nn.Linear):
                init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):
                bound = 1.0 / math.sqrt(module.weight.shape[-1])  # nn.Conv1d's default (kaiming-uniform, a=sqrt(5))
                init.uniform_(module.weight, -bound, bound)
        init.ones_(self.o_norm_weight)

    def _apply(self, fn, recurse=True):
        keep = {name: getattr(self, name).data for name in self.fp32_parameters}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            param = getattr(self, name)
            if param.dtype != torch.float32 and old.dtype == torch.float32:
                param.data = old.to(param.device)
        return self

    # -- input projections -------------------------------------------------------------------------
    def input_projections(self) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(name, weight, bias) of every linear map `forward` applies to the layer input."""
        maps = [(name, proj.weight, proj.bias) for name, proj in (("q", self.q_proj), ("k", self.k_proj), ("v", self.v_proj))]
        maps += self._gate_input_projections()
        if self.use_output_gate:
            maps.append(("g", self.g_proj.weight, None))
        return maps

    def _gate_input_projections(self) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        return []

    def fused_input_projection(self) -> tuple:
        """All input projections stacked for one GEMM: (weight, bias or None, names, sizes).

        A decode step at a few rows reads each projection's weights in a GEMM of its own, most of them
        too small to use the memory bandwidth; one GEMM over the stacked weights reads them in one pass.
        Install the result as ``fused_projection`` (a copy of the weights: re-make it after training).
        """
        maps = self.input_projections()
        weight, bias, sizes = stack_linear_maps([(w, b) for _, w, b in maps])
        return weight, bias, tuple(n for n, _, _ in maps), sizes

    def _projections(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> projection of ``x`` from the installed fused GEMM ({} when none is installed)."""
        if self.fused_projection is None:
            return {}
        weight, bias, names, sizes = self.fused_projection
        return dict(zip(names, F.linear(x, weight, bias).split(sizes, dim=-1)))

    # -- forward ---------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, mask: torch.Tensor | None, conv_states: dict, cu_seqlens, proj: dict):
        B, T, _ = x.shape
        q = (proj["q"] if proj else self.q_proj(x)).view(B, T, self.num_heads, self.head_dim)
        k = (proj["k"] if proj else self.k_proj(x)).view(B, T, self.num_kv_heads, self.head_dim)
        v = (proj["v"] if proj else self.v_proj(x)).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if mask is not None:  # padded positions must not write into the state (biases make them non-zero)
            m = mask[:, :, None, None].to(q.dtype)
            q, k, v = q * m, k * m, v * m
        new_conv = {}
        if self.use_short_conv:
            outs = []
            for name, t, conv in (("q", q, self.q_conv1d), ("k", k, self.k_conv1d), ("v", v, self.v_conv1d)):
                y, new_conv[name] = conv(t.reshape(B, T, -1), conv_states.get(name), cu_seqlens)
                outs.append(y.view_as(t))
            q, k, v = outs
        elif self._qkv_activation == "silu":
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        return q, _repeat_heads(k, self.num_kv_groups), _repeat_heads(v, self.num_kv_groups), new_conv

    _qkv_activation = "identity"

    def _output(self, o: torch.Tensor, x: torch.Tensor, proj: dict) -> torch.Tensor:
        B, T = x.shape[:2]
        o = rms_norm(o, self.o_norm_weight, self.eps)
        if self.use_output_gate:
            g = proj["g"] if proj else self.g_proj(x)
            o = o * F.silu(g.view(B, T, self.num_heads, self.head_dim))
        return self.o_proj(o.reshape(B, T, -1))

    def forward(
        self, hidden_states, attention_mask=None, past_key_values=None, position_embeddings=None, cache=None, **kwargs
    ):
        """HF attention signature; `attention_mask` is a 2-D padding mask [B, S] (1 = token) or None."""
        past_key_values = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is not None and B > 1:  # packed rows: boundaries index the flattened tokens
            out, _ = self.forward(hidden_states.reshape(1, B * T, -1), None, past_key_values, position_embeddings,
                                  **kwargs)
            return out.reshape(B, T, -1), None
        mask = attention_mask[:, -T:] if attention_mask is not None else None
        layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        prev_state = layer.recurrent_state if layer is not None and layer.seen_tokens > 0 else None
        conv_states = layer.conv_states if layer is not None and layer.seen_tokens > 0 else {}
        proj = self._projections(hidden_states)
        q, k, v, new_conv = self._project(hidden_states, mask, conv_states, cu_seqlens, proj)
        gates = self._gates(hidden_states, mask, proj)
        o, final_state = self._kernel(q, k, v, gates, prev_state, layer is not None, cu_seqlens)
        if layer is not None:
            layer.update_state(final_state, new_conv, T)
        return self._output(o, hidden_states, proj), None


class GatedDeltaNetMixer(LinearAttentionMixer):
    """Gated DeltaNet (fla semantics): S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = S_t^T q_t.

    q and k are L2-normalized in the kernel; a_t = exp(-exp(A_log) * softplus(a_proj x + dt_bias)),
    b_t = sigmoid(b_proj x); output goes through an RMSNorm (gated by silu(g_proj x)) and o_proj.
    """

    fp32_parameters = ("A_log", "dt_bias")

    def __init__(self, config, layer_idx: int, attention: nn.Module):
        opts = config.mixer_options
        super().__init__(
            config,
            layer_idx,
            attention,
            use_short_conv=bool(opts["gdn_use_short_conv"]),
            use_output_gate=bool(opts["gdn_use_output_gate"]),
            use_qkv_bias=bool(opts["gdn_use_qkv_bias"]),
            use_qk_norm=bool(opts["gdn_use_qk_norm"]),
        )
        self._qkv_activation = opts["gdn_qkv_activation"]
        self.a_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        self.b_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.init_new_parameters()

    def init_new_parameters(self) -> None:
        super().init_new_parameters()
        # As fla's GatedDeltaNet: A ~ U(0, 16); dt log-uniform in [1e-3, 0.1], dt_bias = softplus^-1(dt).
        a = torch.empty(self.num_heads, dtype=torch.float32).uniform_(0, 16)
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        init.copy_(self.A_log, torch.log(a))
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    def _gate_input_projections(self):
        # One GEMM for both: with H (e.g. 12) outputs each, rows of H bf16 values are not 16-byte
        # aligned and cuBLAS falls back to a slow kernel (16 us per call at 8 rows, ~17% of a decode step).
        return [("ab", torch.cat([self.a_proj.weight, self.b_proj.weight]), None)]

    def _gates(self, x: torch.Tensor, mask: torch.Tensor | None, proj: dict):
        ab = proj["ab"] if proj else F.linear(x, self._gate_input_projections()[0][1])
        a, b = ab.float().chunk(2, dim=-1)
        beta = torch.sigmoid(b)
        g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        if mask is not None:  # padded positions: no write (beta=0), no decay (g=0)
            m = mask[..., None].to(beta.dtype)
            beta, g = beta * m, g * m
        return g, beta

    def _kernel(self, q, k, v, gates, initial_state, output_final_state, cu_seqlens):
        g, beta = gates
        return gated_delta_rule(
            q,
            k,
            v,
            g,
            beta.to(q.dtype),
            scale=self.head_dim**-0.5,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm=True,
            cu_seqlens=cu_seqlens,
            backend=self.options["kernel_backend"],
        )


class GLAMixer(LinearAttentionMixer):
    """Gated linear attention (fla semantics): S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

    log a_t = logsigmoid(gk_proj x) / gate_logit_normalizer per key dimension (low-rank gk_proj).
    """

    def __init__(self, config, layer_idx: int, attention: nn.Module):
        opts = config.mixer_options
        super().__init__(config, layer_idx, attention, use_short_conv=False, use_output_gate=bool(opts["gla_use_output_gate"]))
        rank = int(opts["gla_gate_low_rank_dim"])
        self.gate_logit_normalizer = float(opts["gla_gate_logit_normalizer"])
        self.gk_proj = nn.Sequential(
            nn.Linear(self.hidden_size, rank, bias=False), nn.Linear(rank, self.num_heads * self.head_dim, bias=True)
        )
        self.init_new_parameters()

    def _gate_input_projections(self):
        return [("gk", self.gk_proj[0].weight, None)]  # the low-rank map's first factor

    def _gates(self, x: torch.Tensor, mask: torch.Tensor | None, proj: dict):
        B, T, _ = x.shape
        low_rank = proj["gk"] if proj else self.gk_proj[0](x)
        gk = F.logsigmoid(self.gk_proj[1](low_rank).float()).view(B, T, self.num_heads, self.head_dim) / self.gate_logit_normalizer
        if mask is not None:
            gk = gk * mask[:, :, None, None].to(gk.dtype)
        return gk

    def _kernel(self, q, k, v, gk, initial_state, output_final_state, cu_seqlens):
        return gated_linear_attention(
            q,
            k,
            v,
            gk,
            scale=self.head_dim**-0.5,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            backend=self.options["kernel_backend"],
        )


MIXER_CLASSES = {"gdn": GatedDeltaNetMixer, "gla": GLAMixer}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class _ConfigWithOverrides:
    """A view of a shared config with some attributes replaced (reads and writes of the others go through)."""

    def __init__(self, base, **overrides):
        self.__dict__.update(_base=base, _overrides=overrides)

    def __getattr__(self, name):
        d = self.__dict__
        if "_base" not in d:  # half-built (copy / unpickle)
            raise AttributeError(name)
        return d["_overrides"][name] if name in d["_overrides"] else getattr(d["_base"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["_base"], name, value)


def _give_window(attention: nn.Module, config, window: int) -> dict:
    """Make a teacher-family attention module a sliding-window (``swa``) one for every attention backend.

    The sdpa/eager masks carry the window (`_layer_masks`); flash-attention backends take it only from the
    ``sliding_window`` argument of the attention function, which Qwen2/3 pass from ``self.sliding_window``,
    Mistral from ``self.config.sliding_window`` and Llama not at all. Returns the keyword arguments the
    model's forward must add for this layer (``{"sliding_window": window}`` for Llama's, else none).
    """
    attention.sliding_window = window
    attention.config = _ConfigWithOverrides(config, sliding_window=window)
    try:
        passes_window = "sliding_window=" in inspect.getsource(type(attention).forward)
    except (OSError, TypeError):  # no source shipped: assume it does, as all but Llama's do
        passes_window = True
    return {} if passes_window else {"sliding_window": window}


class HybridInitMixin:
    """Initialization of the parameters the teacher lacks; on both the inner model and the causal LM,
    since `from_pretrained` dispatches `_init_weights` to each `PreTrainedModel` in the tree."""

    _keep_in_fp32_modules_strict = ["A_log", "dt_bias"]

    def _init_weights(self, module):
        if isinstance(module, LinearAttentionMixer):
            module.init_new_parameters()
        else:
            super()._init_weights(module)


class HybridModelMixin(HybridInitMixin):
    """Swaps attention modules for mixers after the teacher family's `__init__` and replaces `forward`
    so each layer gets its own mask (and left-padded batches are right for linear layers)."""

    def _install_mixers(self) -> None:
        self._layer_extra_kwargs: dict[int, dict] = {}  # per layer: keyword arguments forward adds
        for i, layer in enumerate(self.layers):
            mixer = self.config.mixers[i]
            if mixer in MIXER_CLASSES:
                layer.self_attn = MIXER_CLASSES[mixer](self.config, i, layer.self_attn)
            elif mixer == "swa":
                extra = _give_window(layer.self_attn, self.config, int(self.config.mixer_options["swa_window"]))
                if extra:
                    self._layer_extra_kwargs[i] = extra

    def _layer_masks(self, inputs_embeds, attention_mask, past_key_values, position_ids) -> list:
        kinds = [layer_mask_kind(self.config, i) for i in range(self.config.num_hidden_layers)]
        common = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            CACHE_ARG: past_key_values,
            "position_ids": position_ids,
        }
        masks = {}
        if "full" in kinds:
            masks["full"] = create_causal_mask(config=self.config, layer_idx=kinds.index("full"), **common)
        if "sliding" in kinds:
            masks["sliding"] = create_sliding_window_causal_mask(config=self.config, layer_idx=kinds.index("sliding"), **common)
        if "swa" in kinds:
            swa_config = copy.copy(self.config)
            swa_config.sliding_window = int(self.config.mixer_options["swa_window"])
            masks["swa"] = create_sliding_window_causal_mask(config=swa_config, layer_idx=kinds.index("swa"), **common)
        if "linear" in kinds:
            has_padding = attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all())
            masks["linear"] = attention_mask if has_padding else None
        return [masks[k] for k in kinds]

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = HybridCache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, HybridCache):
            raise TypeError(
                f"Hybrid students need a HybridCache, got {type(past_key_values).__name__}; pass none and one is created."
            )
        # Masks see only position ids the caller passed: from any position ids transformers tries to
        # infer packed documents, reading a device tensor on the host (a sync in every forward).
        layer_masks = self._layer_masks(inputs_embeds, attention_mask, past_key_values, position_ids)
        caller_position_ids = position_ids
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)
        layer_kwargs = [{**kwargs, **self._layer_extra_kwargs[i]} if i in self._layer_extra_kwargs else kwargs
                        for i in range(self.config.num_hidden_layers)]
        if caller_position_ids is not None and attention_mask is None and past_key_values is None \
                and "cu_seq_lens_q" not in kwargs and any(m in LINEAR_MIXERS for m in self.config.mixers):
            # Packed documents marked by position ids alone (transformers' flattening collator): the softmax
            # layers' masks separate them; linear layers need the boundaries to reset their state.
            cu_seqlens = packed_cu_seqlens(caller_position_ids, inputs_embeds.shape[0])
            if cu_seqlens is not None:
                layer_kwargs = [{**kw, "cu_seq_lens_q": cu_seqlens} if m in LINEAR_MIXERS else kw
                                for m, kw in zip(self.config.mixers, layer_kwargs)]
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer, mask, extra in zip(self.layers[: self.config.num_hidden_layers], layer_masks, layer_kwargs):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_ARG: past_key_values},
                **extra,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_ARG: past_key_values})


class HybridCausalLMMixin(HybridInitMixin):
    """Builds the family's causal LM around a hybrid inner model; generation uses `HybridCache`."""

    inner_model_class: type = None

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.model = self.inner_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own HybridCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if generation_config.use_cache is False or model_kwargs.get("use_cache") is False:
            return  # generate(use_cache=False): every step runs the whole sequence again, with no cache
        if model_kwargs.get(CACHE_ARG) is None:
            model_kwargs[CACHE_ARG] = HybridCache(self.config)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers decides this from this file's source (an `*Attention*(nn.Module)` class without
        # `ALL_ATTENTION_FUNCTIONS.get_interface(`); the softmax layers are the teacher family's own modules.
        return True

    @property
    def mixers(self) -> list[str]:
        return list(self.config.mixers)


class HybridLlamaModel(HybridModelMixin, LlamaModel):
    config_class = HybridLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_mixers()


class HybridLlamaForCausalLM(HybridCausalLMMixin, LlamaForCausalLM):
    config_class = HybridLlamaConfig
    inner_model_class = HybridLlamaModel


class HybridMistralModel(HybridModelMixin, MistralModel):
    config_class = HybridMistralConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_mixers()


class HybridMistralForCausalLM(HybridCausalLMMixin, MistralForCausalLM):
    config_class = HybridMistralConfig
    inner_model_class = HybridMistralModel


class HybridQwen2Model(HybridModelMixin, Qwen2Model):
    config_class = HybridQwen2Config

    def __init__(self, config):
        super().__init__(config)
        self._install_mixers()


class HybridQwen2ForCausalLM(HybridCausalLMMixin, Qwen2ForCausalLM):
    config_class = HybridQwen2Config
    inner_model_class = HybridQwen2Model


class HybridQwen3Model(HybridModelMixin, Qwen3Model):
    config_class = HybridQwen3Config

    def __init__(self, config):
        super().__init__(config)
        self._install_mixers()


class HybridQwen3ForCausalLM(HybridCausalLMMixin, Qwen3ForCausalLM):
    config_class = HybridQwen3Config
    inner_model_class = HybridQwen3Model


HYBRID_CAUSAL_LM_CLASSES = {
    "llama": HybridLlamaForCausalLM,
    "mistral": HybridMistralForCausalLM,
    "qwen2": HybridQwen2ForCausalLM,
    "qwen3": HybridQwen3ForCausalLM,
}
