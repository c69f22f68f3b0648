"""A hybrid student as stock Hugging Face Qwen3.5 text (`qwen3_5_text`, `Qwen3_5ForCausalLM`).

Qwen3.5 text runs any pattern of full-attention and Gated DeltaNet layers (`config.layer_types`) with
dense SwiGLU MLPs, and transformers, vLLM and llama.cpp load it without remote code. The map below
follows transformers' `models/qwen3_5` (the same in 5.17 and 5.25 for everything used here):

- Every `Qwen3_5RMSNorm` multiplies by ``1 + w`` (zero-centred weight, fp32). The input and post-attention
  norm scales are folded into the projections that read them, leaving ``w = 0``; the final norm's into
  lm_head unless the embeddings are tied (then ``w = scale - 1``).
- Full attention: `q_proj` emits ``[query | gate]`` per head and the output is multiplied by
  ``sigmoid(gate)``: zero gate rows give 1/2, which a doubled `o_proj` cancels (exact in binary). Its
  per-head q/k norms are mandatory: a Qwen3 teacher's are copied (``w - 1``); for teachers without them
  the projections are scaled so far below the norm's eps that the norm is linear to a proven relative
  error (`linearize_head_norm`). One `attention_bias` flag covers q/k/v/o (missing biases become zeros).
  Rotary: the teacher's `rope_parameters` (llama3 scaling included) with `partial_rotary_factor` 1.0,
  checked against the student's rotary embedding position by position (`rotary_mismatch`).
- Gated DeltaNet: one depthwise causal conv over ``[q | k | v]`` followed by SiLU, always: an identity
  tap (the conv's last weight 1) where the student has no short conv, whose SiLU on q/k/v is then the
  conv's; the student's convs otherwise. q and k share one head count, so the student's KV heads are
  repeated per query head (rows of k and v). Then the delta rule with L2-normalized q/k and scale
  ``head_dim ** -0.5``, ``beta = sigmoid(b)``, ``g = -exp(A_log) * softplus(a + dt_bias)``, and an RMSNorm
  with a plain weight (eps ``rms_norm_eps``) gated by ``silu(z)``; no biases anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen3_5ForCausalLM, Qwen3_5TextConfig

from ..modeling import GatedDeltaNetMixer
from ..modeling.modeling_hybrid import teacher_sliding_window
from .result import Blocker, ExportError, LayerExport

FORMAT = "qwen3_5"
MODEL_TYPE = "qwen3_5_text"
LAYOUT_HINT = "student layout qwen3_5"
# Relative error the linearized q/k norm may add to any query or key vector (below fp32 rounding, 2^-24).
HEAD_NORM_TOLERANCE = 2.0**-30
# Largest power of two used as the norm weight: keeps the scaled projection weights far above fp32/bf16 underflow.
MAX_NORM_WEIGHT_EXPONENT = 40
# Rotary cos/sin may differ by this much between the student and the export at position 0 (fp32 rounding).
ROTARY_TOLERANCE = 1e-5
ROTARY_ULPS = 8  # rounding of the inverse frequencies allowed at a position, in fp32 ulps of the angle


# --------------------------------------------------------------------------------------------
# What cannot be exported exactly
# --------------------------------------------------------------------------------------------


def find_blockers(student: PreTrainedModel) -> list[Blocker]:
    """Every part of `student` that Qwen3.5 text cannot compute exactly (read from the modules, no compute)."""
    config = student.config
    blockers = []
    if getattr(config, "mlp_bias", False):
        blockers.append(Blocker(None, None, "the MLPs have biases (the teacher's mlp_bias); Qwen3.5's MLPs have none",
                                "no student option: a teacher without mlp_bias", None))
    if "gdn" in config.mixers and config.hidden_act != "silu":
        blockers.append(Blocker(
            None, None, f"hidden_act is {config.hidden_act!r}: Qwen3.5 applies hidden_act in its MLPs and after the GDN "
            "conv, where the student's GDN layers use SiLU", "no student option: a teacher whose hidden_act is silu", None))
    for i, (mixer, layer) in enumerate(zip(config.mixers, student.model.layers)):
        if mixer == "gla":
            blockers.append(Blocker(i, mixer, "Qwen3.5 has no gated linear attention",
                                    "distill with gdn as the linear mixer (student.linear: gdn)", None))
        elif mixer == "swa":
            window = int(config.mixer_options["swa_window"])
            blockers.append(Blocker(i, mixer, f"sliding-window attention ({window} tokens); Qwen3.5's attention has no window",
                                    "softmax or gdn in this layer (no swa mixers)",
                                    f"full attention: the same outputs while a sequence has at most {window} tokens"))
        elif mixer == "softmax":
            window = teacher_sliding_window(config, i)
            if window is not None:
                blockers.append(Blocker(i, mixer, f"the teacher's sliding window ({window} tokens); Qwen3.5's attention "
                                        "has no window", "no student option: a teacher config without sliding_window",
                                        f"full attention: the same outputs while a sequence has at most {window} tokens"))
        elif mixer == "gdn":
            blockers += _gdn_blockers(i, layer.self_attn, config)
    return blockers


def _gdn_blockers(i: int, mixer: GatedDeltaNetMixer, config) -> list[Blocker]:
    found = []
    if not mixer.use_output_gate:
        found.append(Blocker(i, "gdn", "no output gate: Qwen3.5's GDN always multiplies its output by silu(z)",
                             f"mixer option gdn_use_output_gate: true ({LAYOUT_HINT})", None))
    if not mixer.use_short_conv and mixer.options["gdn_qkv_activation"] != "silu":
        found.append(Blocker(i, "gdn", "q/k/v without SiLU (gdn_qkv_activation: identity); Qwen3.5 applies SiLU after its conv",
                             f"mixer option gdn_qkv_activation: silu ({LAYOUT_HINT})", None))
    if any(p.bias is not None for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj)):
        found.append(Blocker(i, "gdn", "q/k/v biases (the teacher's); Qwen3.5's GDN projections have none",
                             f"mixer option gdn_use_qkv_bias: false ({LAYOUT_HINT})", "drops the biases"))
    if mixer.q_norm is not None:
        found.append(Blocker(i, "gdn", "per-head q/k RMSNorms (the teacher's); Qwen3.5's GDN has none",
                             f"mixer option gdn_use_qk_norm: false ({LAYOUT_HINT})",
                             "folds the norm weights into the q/k projections and drops the normalization"))
    if mixer.eps != float(config.rms_norm_eps):
        found.append(Blocker(i, "gdn", f"output-norm eps {mixer.eps:g} differs from rms_norm_eps {config.rms_norm_eps:g}, "
                             "which Qwen3.5's GDN norm uses", f"mixer option norm_eps: teacher ({LAYOUT_HINT})",
                             f"uses eps {config.rms_norm_eps:g}"))
    if mixer.o_proj.bias is not None:
        found.append(Blocker(i, "gdn", "o_proj has a bias (the teacher's attention_bias); Qwen3.5's GDN out_proj has none",
                             "no student option: a teacher without attention_bias", "drops the bias"))
    return found


# --------------------------------------------------------------------------------------------
# Linearized head norm (teachers without q/k norm)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadNormLinearization:
    """How a projection followed by Qwen3.5's per-head zero-centred RMSNorm computes the projection alone."""

    scale: float  # s: the projection's weight and bias are multiplied by it
    norm_weight: float  # w = 2^k, stored as the norm's weight (the norm multiplies by c = 1 + w)
    max_mean_square: float  # m_max: bound on mean(y_h^2) of every head output y_h of the unscaled projection
    bound: float  # m_max / (2 c^2): bound on the relative error |y_hat - y| / |y| of every head, every input


def linearize_head_norm(weight: torch.Tensor, bias: torch.Tensor | None, head_dim: int, eps: float,
                        tolerance: float = HEAD_NORM_TOLERANCE) -> HeadNormLinearization:
    """Scale for a projection ``y = W x + b`` ([heads * head_dim, hidden]) read by Qwen3.5's q/k norm.

    The norm computes, per head, ``y_hat = s y / sqrt(mean((s y)^2) + eps) * c``. With ``s = sqrt(eps) / c``
    this is ``y_hat = y / sqrt(1 + u)``, ``u = mean(y^2) / c^2``: the direction of ``y`` exactly, its length
    short by the relative ``1 - (1 + u)^(-1/2) <= u / 2``. The input ``x`` is an RMSNorm's output whose scale
    is folded into ``W``, ``x = h / sqrt(mean(h^2) + eps)``, so ``|x|^2 < hidden`` and, per head,
    ``|y_h| <= ||W_h||_2 sqrt(hidden) + |b_h|``: ``mean(y_h^2) <= m_max`` for every input. ``c = 1 + 2^k`` with
    the smallest ``k`` that brings ``m_max / (2 c^2)`` to `tolerance`; ``w = 2^k`` is exact in every float format.
    """
    w = weight.detach().double()
    heads = w.reshape(-1, head_dim, w.shape[-1])
    reach = torch.linalg.matrix_norm(heads, ord=2) * math.sqrt(w.shape[-1])
    if bias is not None:
        reach = reach + bias.detach().double().reshape(-1, head_dim).norm(dim=-1)
    m_max = float((reach**2 / head_dim).max())
    for k in range(MAX_NORM_WEIGHT_EXPONENT + 1):
        c = float(torch.tensor(1.0) + torch.tensor(2.0**k))  # 1 + w as the norm computes it, in fp32
        if m_max / (2 * c * c) <= tolerance:
            return HeadNormLinearization(scale=math.sqrt(eps) / c, norm_weight=2.0**k, max_mean_square=m_max,
                                         bound=m_max / (2 * c * c))
    raise ExportError(f"a q/k projection reaches mean(y^2) up to {m_max:.3g}; its norm cannot be made linear within "
                      f"{tolerance:g} (the weights would underflow)")


# --------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------


def keeps_tied_embeddings(student: PreTrainedModel) -> bool:
    """Whether the export ties lm_head to the embeddings as the student does.

    Tied, the final norm's scale cannot be folded into lm_head and is stored zero-centred (``w - 1``), which a
    16-bit float holds at least as precisely as ``w`` only where ``w >= 0.5``; below, lm_head is written untied
    (the embeddings times the norm scale) and the norm folded.
    """
    return bool(student.config.tie_word_embeddings) and bool((student.model.norm.weight >= 0.5).all())


def linearizes_head_norms(student: PreTrainedModel) -> bool:
    """Whether some full-attention layer of the export scales its q/k projections down (its teacher has no q/k
    norms; see `linearize_head_norm`), which puts those weights out of float16's range."""
    return any(m != "gdn" and getattr(layer.self_attn, "q_norm", None) is None
               for m, layer in zip(student.config.mixers, student.model.layers))


def qwen3_5_config(student: PreTrainedModel) -> Qwen3_5TextConfig:
    """The Qwen3.5 text config of `student`: its teacher's shapes, one layer type per mixer."""
    config = student.config
    attention_layers = [layer.self_attn for m, layer in zip(config.mixers, student.model.layers) if m != "gdn"]
    attention_bias = any(getattr(a, name).bias is not None for a in attention_layers
                         for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = ["linear_attention" if m == "gdn" else "full_attention" for m in config.mixers]
    rope = {**config.rope_parameters}
    rope.setdefault("partial_rotary_factor", 1.0)
    serving = {
        "qkv_bias": attention_bias,  # vLLM's Qwen3.5 attention reads this key, not attention_bias
        "mamba_ssm_dtype": "float32",  # the recurrent state's dtype, as official Qwen3.5 configs state it
    }
    interval = full_attention_interval(layer_types)
    if interval is not None:  # engines that place full-attention layers by this period alone (SGLang)
        serving["full_attention_interval"] = interval
    export_config = Qwen3_5TextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=keeps_tied_embeddings(student),
        rope_parameters=rope,
        attention_bias=attention_bias,
        linear_conv_kernel_dim=int(config.mixer_options["gdn_conv_size"]),
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_num_key_heads=config.num_attention_heads,
        linear_num_value_heads=config.num_attention_heads,
        layer_types=layer_types,
        # transformers' Qwen3.5 cache (5.17, 5.25) sizes attention masks from a full-attention layer and raises without one
        use_cache="full_attention" in layer_types,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        **serving,
    )
    # also at the top level, where SGLang's Qwen3.5 config reads it (defaulting to 0.25)
    export_config.partial_rotary_factor = rope["partial_rotary_factor"]
    return export_config


def full_attention_interval(layer_types: list[str]) -> int | None:
    """n where layer i is full attention exactly when (i + 1) % n == 0 (the layout engines without per-layer
    types assume), or None when the layers follow no such period."""
    for n in range(1, len(layer_types) + 1):
        if all((t == "full_attention") == ((i + 1) % n == 0) for i, t in enumerate(layer_types)):
            return n
    return None


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _scaled_columns(linear: nn.Linear, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of ``linear`` reading ``scale * x`` instead of ``x``: the norm scale folded in."""
    bias = None if linear.bias is None else _f64(linear.bias)
    return _f64(linear.weight) * scale, bias


def _repeat_head_rows(t: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Rows (or conv channels) of KV heads -> rows of query heads: query head h reads KV head h // n_rep."""
    return t.reshape(-1, head_dim, *t.shape[1:]).repeat_interleave(n_rep, dim=0).reshape(-1, *t.shape[1:])


def _attention_layer(attn: nn.Module, g1: torch.Tensor, config, attention_bias: bool, prefix: str) -> tuple[dict, list[str]]:
    """Weights of a Qwen3.5 full-attention layer computing the teacher-family attention `attn`."""
    H, D, eps = config.num_attention_heads, attn.head_dim, float(config.rms_norm_eps)
    (q_w, q_b), (k_w, k_b), (v_w, v_b) = (_scaled_columns(getattr(attn, n), g1) for n in ("q_proj", "k_proj", "v_proj"))
    notes = ["input-norm scale folded into q/k/v", "zero gate rows (sigmoid 0 = 1/2), o_proj doubled"]
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: the teacher's own per-head norms
        q_norm, k_norm = _f64(attn.q_norm.weight) - 1, _f64(attn.k_norm.weight) - 1
        notes.append("q/k norms: the teacher's, stored as w - 1")
        if float(min(q_norm.min(), k_norm.min())) < -0.5:  # a weight below 0.5
            notes.append("some q/k norm weights are below 0.5, which w - 1 holds less precisely in 16-bit floats than w")
    else:
        lq, lk = linearize_head_norm(q_w, q_b, D, eps), linearize_head_norm(k_w, k_b, D, eps)
        q_w, k_w = q_w * lq.scale, k_w * lk.scale
        q_b = None if q_b is None else q_b * lq.scale
        k_b = None if k_b is None else k_b * lk.scale
        q_norm, k_norm = torch.full((D,), lq.norm_weight, dtype=torch.float64), torch.full((D,), lk.norm_weight, dtype=torch.float64)
        notes.append(f"q/k norms linear: q/k projections scaled by {lq.scale:.3g}/{lk.scale:.3g}, norm weights "
                     f"2^{int(math.log2(lq.norm_weight))}/2^{int(math.log2(lk.norm_weight))}, relative error of any "
                     f"query/key vector <= {max(lq.bound, lk.bound):.2g}")
    hidden = q_w.shape[-1]
    state = {
        # per head [query | gate]: the gate rows are zero
        "q_proj.weight": torch.cat([q_w.reshape(H, D, hidden), torch.zeros(H, D, hidden, dtype=q_w.dtype)], 1).reshape(2 * H * D, hidden),
        "k_proj.weight": k_w,
        "v_proj.weight": v_w,
        "o_proj.weight": 2 * _f64(attn.o_proj.weight),
        "q_norm.weight": q_norm,
        "k_norm.weight": k_norm,
    }
    if attention_bias:
        def bias_or_zeros(b, rows):
            return b if b is not None else torch.zeros(rows, dtype=torch.float64)
        q_b = bias_or_zeros(q_b, H * D)
        state["q_proj.bias"] = torch.cat([q_b.reshape(H, D), torch.zeros(H, D, dtype=q_b.dtype)], 1).reshape(-1)
        state["k_proj.bias"] = bias_or_zeros(k_b, k_w.shape[0])
        state["v_proj.bias"] = bias_or_zeros(v_b, v_w.shape[0])
        o_b = attn.o_proj.bias
        state["o_proj.bias"] = _f64(o_b) if o_b is not None else torch.zeros(attn.o_proj.out_features, dtype=torch.float64)
        notes.append("biases copied (zeros where the teacher has none)")
    return {prefix + k: v for k, v in state.items()}, notes


def _gdn_layer(mixer: GatedDeltaNetMixer, g1: torch.Tensor, kernel_size: int, prefix: str) -> tuple[dict, list[str]]:
    """Weights of a Qwen3.5 Gated DeltaNet layer computing `mixer` (biases, q/k norms dropped: approximate only)."""
    H, D, n_rep = mixer.num_heads, mixer.head_dim, mixer.num_kv_groups
    (q_w, _), (k_w, _), (v_w, _) = (_scaled_columns(p, g1) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    notes = ["input-norm scale folded into in_proj_qkv/z/a/b"]
    if mixer.q_norm is not None:  # approximate only: keep the norm weights, drop the normalization
        q_w = q_w * _f64(mixer.q_norm.weight).repeat(H)[:, None]
        k_w = k_w * _f64(mixer.k_norm.weight).repeat(mixer.num_kv_heads)[:, None]
    if n_rep > 1:
        notes.append(f"k/v heads repeated x{n_rep} (one head count for q and k)")
    qkv = torch.cat([q_w, _repeat_head_rows(k_w, n_rep, D), _repeat_head_rows(v_w, n_rep, D)])
    if mixer.use_short_conv:
        conv = torch.cat([_f64(mixer.q_conv1d.conv.weight),
                          _repeat_head_rows(_f64(mixer.k_conv1d.conv.weight), n_rep, D),
                          _repeat_head_rows(_f64(mixer.v_conv1d.conv.weight), n_rep, D)])
        notes.append("the student's short convs")
    else:
        conv = torch.zeros(qkv.shape[0], 1, kernel_size, dtype=torch.float64)
        conv[..., -1] = 1.0
        notes.append("identity conv tap (the conv's SiLU is the student's SiLU on q/k/v)")
    (z_w, _), (a_w, _), (b_w, _) = (_scaled_columns(p, g1) for p in (mixer.g_proj, mixer.a_proj, mixer.b_proj))
    state = {
        "in_proj_qkv.weight": qkv,
        "conv1d.weight": conv,
        "in_proj_z.weight": z_w,
        "in_proj_a.weight": a_w,
        "in_proj_b.weight": b_w,
        "A_log": _f64(mixer.A_log),
        "dt_bias": _f64(mixer.dt_bias),
        "norm.weight": _f64(mixer.o_norm_weight),
        "out_proj.weight": _f64(mixer.o_proj.weight),
    }
    return {prefix + k: v for k, v in state.items()}, notes


def qwen3_5_state_dict(student: PreTrainedModel, config: Qwen3_5TextConfig) -> tuple[dict, list[LayerExport], list[str]]:
    """(fp32 state dict of `Qwen3_5ForCausalLM`, per-layer notes, model-wide notes) computing `student`; every
    tensor is computed in float64 and rounded once."""
    inner, scfg = student.model, student.config
    state: dict[str, torch.Tensor] = {}

    def put(entries: dict[str, torch.Tensor]) -> None:
        state.update({name: value.to(torch.float32) for name, value in entries.items()})

    put({"model.embed_tokens.weight": _f64(inner.embed_tokens.weight)})
    layers = []
    for i, (mixer, layer) in enumerate(zip(scfg.mixers, inner.layers)):
        prefix = f"model.layers.{i}."
        g1, g2 = _f64(layer.input_layernorm.weight), _f64(layer.post_attention_layernorm.weight)
        if mixer == "gdn":
            mixer_state, notes = _gdn_layer(layer.self_attn, g1, config.linear_conv_kernel_dim, prefix + "linear_attn.")
        else:
            mixer_state, notes = _attention_layer(layer.self_attn, g1, config, config.attention_bias, prefix + "self_attn.")
        put(mixer_state)
        mlp = layer.mlp
        put({
            prefix + "mlp.gate_proj.weight": _f64(mlp.gate_proj.weight) * g2,
            prefix + "mlp.up_proj.weight": _f64(mlp.up_proj.weight) * g2,
            prefix + "mlp.down_proj.weight": _f64(mlp.down_proj.weight),
            prefix + "input_layernorm.weight": torch.zeros_like(g1),
            prefix + "post_attention_layernorm.weight": torch.zeros_like(g2),
        })
        layers.append(LayerExport(i, mixer, config.layer_types[i], tuple(notes + ["post-attention norm scale folded into gate/up_proj"])))
    final = _f64(inner.norm.weight)
    if config.tie_word_embeddings:
        put({"model.norm.weight": final - 1})
        notes = ["embeddings tied; final norm stored as w - 1 (its scale cannot be folded into the tied lm_head)"]
    else:
        put({"model.norm.weight": torch.zeros_like(final), "lm_head.weight": _f64(student.lm_head.weight) * final})
        notes = ["final norm scale folded into lm_head"]
        if scfg.tie_word_embeddings:
            notes[0] += (" (untied: the student's final-norm weights go below 0.5, which w - 1 would hold less "
                         "precisely in bf16)")
    notes.append(f"rotary: {config.rope_parameters['rope_type']} rope, partial_rotary_factor "
                 f"{config.rope_parameters['partial_rotary_factor']}")
    if not config.use_cache:
        notes.append("no full-attention layer: use_cache is off, as transformers' Qwen3.5 cache (5.17 to 5.25) needs "
                     "one to size its masks (generate() recomputes the sequence; serving engines keep their own state)")
    return state, layers, notes


def rotary_mismatch(student: PreTrainedModel, export: PreTrainedModel) -> float:
    """Largest difference of the rotary cos/sin of `student` and `export` at the first 256 positions and the
    last 256 below max_position_embeddings (Qwen3.5 takes 3 rows of position ids: text, height, width), in units
    of the fp32 rounding expected at each position: inverse frequencies computed on different devices may differ by
    an ulp, which position p multiplies into an angle error of about p ulps. Above 1: not the same rotary."""
    top = int(student.config.max_position_embeddings)
    positions = torch.cat([torch.arange(256), torch.arange(max(256, top - 256), top)])[None]
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos_s, sin_s = student.model.rotary_emb(x, positions)
        cos_e, sin_e = export.model.rotary_emb(x, positions[None].expand(3, -1, -1))
    diff = torch.maximum((cos_s - cos_e).abs().amax(-1), (sin_s - sin_e).abs().amax(-1)).cpu()
    allowed = ROTARY_TOLERANCE + ROTARY_ULPS * torch.finfo(torch.float32).eps * positions.float()
    return float((diff / allowed).max())


def build_qwen3_5(student: PreTrainedModel) -> tuple[Qwen3_5ForCausalLM, list[LayerExport], list[str]]:
    """An fp32 `Qwen3_5ForCausalLM` computing `student` (its blockers must be accepted by the caller)."""
    config = qwen3_5_config(student)
    state, layers, notes = qwen3_5_state_dict(student, config)
    model = Qwen3_5ForCausalLM(config).float().eval()
    params = dict(model.state_dict())
    missing = [k for k in params if k not in state and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    unexpected = [k for k in state if k not in params]
    wrong_shape = [k for k, v in state.items() if k in params and tuple(v.shape) != tuple(params[k].shape)]
    if missing or unexpected or wrong_shape:
        raise RuntimeError(f"the Qwen3.5 weight map does not fit Qwen3_5ForCausalLM: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}, wrong shape {wrong_shape[:6]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    if config.attention_bias:
        notes.append("attention biases: transformers reads attention_bias, vLLM qkv_bias (both set); SGLang's Qwen3.5 "
                     "attention has no biases")
        if any(float(params[k].abs().max()) > 0 for k in params if k.endswith("self_attn.o_proj.bias")):
            notes.append("o_proj biases: vLLM's and SGLang's Qwen3.5 attention have none")
    mismatch = rotary_mismatch(student, model)
    if mismatch > 1.0:
        raise ExportError(f"Qwen3.5's rotary embedding differs from the student's ({mismatch:.3g} times the fp32 "
                          f"rounding allowed) with rope parameters {config.rope_parameters}; this rope type cannot be "
                          "exported")
    return model, layers, notes
