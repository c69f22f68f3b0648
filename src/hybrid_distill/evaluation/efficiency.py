"""Inference efficiency: prefill latency, decode throughput, cache size and peak memory.

Decode runs one greedy token per step through a real KV cache for softmax layers and fla's fused
recurrent kernels for linear layers, either with `StaticDecoder` (preallocated cache, CUDA graph:
what a serving engine does) or through the model's own HF cache in eager mode (what `generate()` does).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..dtypes import cast_model
from ..modeling import CACHE_ARG, output_cache
from ..modeling.static_decode import StaticDecoder, layer_kinds


@dataclass
class EfficiencyResult:
    model: str
    context: int
    batch: int
    prefill_ms: float
    decode_ms_per_step: float
    decode_tokens_per_s: float
    cache_gib: float
    peak_gib: float
    oom: bool = False
    min_read_gib: float = float("nan")  # least bytes a decode step must read (`decode_step_min_bytes`)

    @property
    def read_tb_per_s(self) -> float:
        """The decode step's effective memory bandwidth: `min_read_gib` per step time, in TB/s."""
        return self.min_read_gib * 2**30 / (self.decode_ms_per_step * 1e-3) / 1e12

    def speed_up_over(self, base: "EfficiencyResult") -> float:
        """Decode speed-up over ``base`` (its step time over this one's)."""
        return base.decode_ms_per_step / self.decode_ms_per_step

    def bandwidth_bound_over(self, base: "EfficiencyResult") -> float:
        """The speed-up over ``base`` if both steps read their `min_read_gib` at the same bandwidth."""
        return base.min_read_gib / self.min_read_gib

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EfficiencyResult":
        """Inverse of `to_dict`, also after JSON, which stores NaN (unmeasured) as null."""
        return cls(**{k: (math.nan if v is None and k not in ("model", "oom") else v) for k, v in d.items()})


def cache_bytes(cache) -> int:
    """Bytes held by a cache's tensors (KV tensors, recurrent and conv states)."""
    total, seen = 0, set()

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for layer in cache.layers:
        for name in ("keys", "values", "recurrent_state"):
            add(getattr(layer, name, None))
        for t in getattr(layer, "conv_states", {}).values():
            add(t)
    return total


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an input embedding matrix that
    is not tied to the lm_head (the lookup reads only the batch's rows)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding or p is head)


def decode_step_min_bytes(model, cache, tokens: int) -> int:
    """The least bytes a decode step must read with ``tokens`` tokens in ``cache`` (a `StaticDecoder`'s
    or the model's own): the weights (`decode_weight_bytes`); per softmax layer the keys and values
    of the visible tokens (a sliding layer's window), whatever the buffers' allocated length; per
    linear layer its recurrent and conv states, read and written once each. Decode at a few rows per
    step is bound by memory bandwidth, so the ratio of two models' bytes bounds their speed-up.
    """
    total = decode_weight_bytes(model)
    for layer, (kind, window) in zip(cache.layers, layer_kinds(model.config)):
        if kind == "linear":
            states = [layer.recurrent_state, *getattr(layer, "conv_states", {}).values()]
            total += 2 * sum(t.numel() * t.element_size() for t in states if isinstance(t, torch.Tensor))
            continue
        keys = layer.keys  # [B, Hkv, n, D]
        visible = tokens if window is None else min(tokens, window)
        total += 2 * keys.shape[0] * keys.shape[1] * keys.shape[3] * keys.element_size() * visible
    return total


DECODE_MODES = ("static", "hf")


def _timed(fn, device: torch.device):
    """``(fn(), milliseconds)``: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type != "cuda":
        start = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize(device)
    return out, start.elapsed_time(end)


@torch.no_grad()
def measure(
    model,
    name: str,
    context: int,
    batch: int,
    decode_steps: int = 32,
    warmup_steps: int = 4,
    vocab_limit: int = 1000,
    decode: str = "static",
    prefill_rows: int | None = None,
    compile: bool = False,
    linear_kernels: str | None = None,
    fuse_projections: bool = True,
    compile_mode: str | None = None,
):
    """Prefill `batch` random prompts of `context` tokens, then decode `decode_steps` tokens greedily.

    ``decode="static"``: `StaticDecoder` (preallocated cache, CUDA-graph step; the warm-up steps
    include the capture); the decode time is the mean over the timed steps, and the cache size is
    that of the preallocated buffers. ``decode="hf"``: the model's own cache grown step by step in
    eager mode, median per-step time. ``prefill_rows`` prefills that many rows per forward and
    ``compile`` runs the step through torch.compile (in ``compile_mode``), ``linear_kernels`` picks the
    linear mixers' backend inside the step and ``fuse_projections`` its one-GEMM input projections (static
    only; see `StaticDecoder`).
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(3, min(vocab_limit, model.config.vocab_size), (batch, context), device=device)
    try:
        if decode == "static":
            dec = StaticDecoder(
                model, batch, context + warmup_steps + decode_steps + 1, compile=compile, linear_kernels=linear_kernels,
                fuse_projections=fuse_projections, compile_mode=compile_mode,
            )
            _, prefill_ms = _timed(lambda: dec.prefill(ids, prefill_rows), device)
            for _ in range(warmup_steps):
                dec.step()

            def run():
                for _ in range(decode_steps):
                    dec.step()

            _, total_ms = _timed(run, device)
            ms, cache_size = total_ms / decode_steps, cache_bytes(dec.cache)
            min_read = decode_step_min_bytes(model, dec.cache, context)
            del dec, run
            if compile:  # compiled code keeps references to the decoder's buffers
                torch._dynamo.reset()
        else:
            out, prefill_ms = _timed(lambda: model(ids, use_cache=True, logits_to_keep=1), device)
            cache = output_cache(out)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            step_ms = []
            for i in range(warmup_steps + decode_steps):
                out, t = _timed(lambda: model(token, use_cache=True, **{CACHE_ARG: cache}), device)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                if i >= warmup_steps:
                    step_ms.append(t)
            ms, cache_size = statistics.median(step_ms), cache_bytes(cache)
            min_read = decode_step_min_bytes(model, cache, context)
            del out, cache
        result = EfficiencyResult(
            name, context, batch, prefill_ms, ms, batch / ms * 1e3, cache_size / 2**30,
            torch.cuda.max_memory_allocated(device) / 2**30 if cuda else math.nan, min_read_gib=min_read / 2**30,
        )
    except torch.cuda.OutOfMemoryError:
        result = EfficiencyResult(name, context, batch, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), oom=True)
    if cuda:
        torch.cuda.empty_cache()
    return result


def _gib(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.2f}"  # peak memory is measured on CUDA only


def results_markdown(results: list[EfficiencyResult], baseline: str | None = None) -> str:
    """A Markdown table; with `baseline`, adds decode speed-up and cache ratio against that model, and the
    speed-up the bytes each step must read allow (`decode_step_min_bytes`: the bandwidth bound)."""
    base = {(r.context, r.batch): r for r in results if r.model == baseline and not r.oom}
    head = (
        "| model | context | batch | prefill ms | decode ms/step | decode tok/s | cache GiB | peak GiB "
        "| min read GiB/step | read TB/s |"
    )
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if baseline:
        head += " decode speed-up | bandwidth-bound speed-up | cache / teacher |"
        sep += "---:|---:|---:|"
    lines = [head, sep]
    for r in results:
        if r.oom:
            lines.append(f"| {r.model} | {r.context} | {r.batch} | OOM | | | | | | |" + (" | | |" if baseline else ""))
            continue
        row = (
            f"| {r.model} | {r.context} | {r.batch} | {r.prefill_ms:.1f} | {r.decode_ms_per_step:.2f} | "
            f"{r.decode_tokens_per_s:,.0f} | {r.cache_gib:.3f} | {_gib(r.peak_gib)} | {r.min_read_gib:.3f} | "
            f"{r.read_tb_per_s:.2f} |"
        )
        if baseline:
            b = base.get((r.context, r.batch))
            if b is None:
                row += " | | |"
            else:
                row += (
                    f" {r.speed_up_over(b):.2f}x | {r.bandwidth_bound_over(b):.2f}x | "
                    f"{r.cache_gib / b.cache_gib:.1%} |"
                )
        lines.append(row)
    return "\n".join(lines) + "\n"


BASELINE_NAME = "teacher"


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def run_efficiency(
    model,
    contexts,
    batches,
    *,
    teacher=None,
    model_name: str = "model",
    decode_steps: int = 32,
    compile: bool = False,
    prefill_rows: int | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
) -> dict:
    """`measure` ``model`` (and ``teacher``, the baseline, in the same process) at every context x batch.

    Decode goes through `StaticDecoder` (static KV buffers, the linear mixers' own kernels, a CUDA
    graph per step on a GPU). Before timing, each model decodes a short prompt at every batch size and, on a
    GPU, runs an untimed prefill of the timed prefill's shape at every point, so first-call costs (fla's
    autotuning per shape, cuBLAS set-up) stay out of the numbers.
    Returns ``{"rows", "baseline", "fits", "device", ...}`` (rows as `EfficiencyResult` dicts; ``fits``:
    `fit_step_cost` per batch size with three rows or more).

    ``dtype`` (e.g. bf16, what is served) measures copies of the models in that dtype where theirs differs
    (the copies cost their memory while they are measured); without it both must already share a dtype.
    """
    from tqdm.auto import tqdm

    contexts, batches = [int(c) for c in contexts], [int(b) for b in batches]
    if not contexts or not batches or min(contexts + batches) < 1:
        raise ValueError(f"contexts and batches must be positive integers, got {contexts} and {batches}")
    if teacher is not None and model_name == BASELINE_NAME:
        raise ValueError(f"model_name {BASELINE_NAME!r} is the baseline's; give the model another name")
    models = ([(BASELINE_NAME, teacher)] if teacher is not None else []) + [(model_name, model)]
    if dtype is not None:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        models = [(name, m if _dtype(m) == dtype else cast_model(copy.deepcopy(m), dtype)) for name, m in models]
    if len({_dtype(m) for _, m in models}) > 1:
        raise ValueError(
            f"the model is in {_dtype(model)} and the teacher in {_dtype(teacher)}: measure both in one dtype "
            "(dtype=torch.bfloat16; `hybrid-distill eval --efficiency-dtype bfloat16`)"
        )
    model = models[-1][1]
    device = next(model.parameters()).device
    for _, m in models:
        for b in batches:
            measure(m, "warm-up", min(16, min(contexts)), b, decode_steps=2, warmup_steps=2)  # a compiled step compiles per point
    rows = []
    points = [(c, b) for c in contexts for b in batches]
    for context, batch in tqdm(points, desc="efficiency", disable=not progress):
        for name, m in models:
            if device.type == "cuda":
                rows_per_forward = min(batch, prefill_rows or batch)
                m(torch.randint(3, min(1000, m.config.vocab_size), (rows_per_forward, context), device=device),
                  use_cache=True, logits_to_keep=1)
                torch.cuda.empty_cache()
            rows.append(measure(m, name, context, batch, decode_steps=decode_steps, compile=compile,
                                prefill_rows=prefill_rows))
    return {
        "rows": [r.to_dict() for r in rows],
        "baseline": BASELINE_NAME if teacher is not None else None,
        "model": model_name,
        "fits": [asdict(f) for f in fit_step_cost(rows, min_rows=3)],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": str(_dtype(model)).replace("torch.", ""),
        "decode": "static",
        "decode_steps": decode_steps,
        "compile": compile,
        "prefill_rows": prefill_rows,
    }


def efficiency_markdown(section: dict) -> str:
    """The table (with speed-ups over the baseline when there is one) and the step-cost fits of a
    `run_efficiency` result."""
    rows = [EfficiencyResult.from_dict(r) for r in section["rows"]]
    text = results_markdown(rows, baseline=section.get("baseline"))
    fits = [StepCostFit(**{k: (math.nan if v is None else v) for k, v in f.items()}) for f in section.get("fits", [])]
    if fits:
        text += "\nStep time as a fixed cost plus the min read at one bandwidth:\n" + "".join(
            f"- {fit.describe()}\n" for fit in fits
        )
    return text


@dataclass
class StepCostFit:
    """``decode ms/step ≈ fixed_ms + min read / bandwidth``, least squares over one batch size's rows."""

    batch: int
    fixed_ms: float  # per-step cost that does not grow with the bytes read (kernel launches, tails, syncs)
    tb_per_s: float  # the bandwidth at which the step streams its bytes beyond that
    max_rel_error: float  # largest |fit - measured| / measured over the rows
    rows: int

    def describe(self) -> str:
        if not math.isfinite(self.tb_per_s):
            return (
                f"batch {self.batch}: the step time does not grow with the bytes read at these points "
                f"({self.fixed_ms:.2f} ms fixed per step; {self.rows} rows)"
            )
        return (
            f"batch {self.batch}: {self.fixed_ms:.2f} ms fixed per step + the min read at {self.tb_per_s:.2f} TB/s "
            f"(least squares over {self.rows} rows, largest deviation {self.max_rel_error:.1%})"
        )


def fit_step_cost(results: list[EfficiencyResult], min_rows: int = 2) -> list[StepCostFit]:
    """Per batch size, fit each decode step's time as a fixed cost plus its `min_read_gib` at one bandwidth.

    It splits a step into what more bandwidth would speed up and what it would not; with the same fixed cost
    for two models, their speed-up is (fixed + teacher bytes / bw) / (fixed + model bytes / bw), below the
    bandwidth bound. Batch sizes with fewer than two distinct byte counts, or fewer than ``min_rows`` rows,
    give no fit (two rows always fit exactly, so they test nothing).
    """
    fits = []
    for batch in sorted({r.batch for r in results}):
        rows = [r for r in results if r.batch == batch and not r.oom and not math.isnan(r.min_read_gib)]
        if len({r.min_read_gib for r in rows}) < 2 or len(rows) < min_rows:
            continue
        x = torch.tensor([[1.0, r.min_read_gib] for r in rows], dtype=torch.float64)
        y = torch.tensor([r.decode_ms_per_step for r in rows], dtype=torch.float64)
        fixed, ms_per_gib = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1).tolist()
        pred = x @ torch.tensor([fixed, ms_per_gib], dtype=torch.float64)
        rel = ((pred - y).abs() / y).max().item()
        tb_per_s = 2**30 / (ms_per_gib * 1e-3) / 1e12 if ms_per_gib > 0 else float("inf")
        fits.append(StepCostFit(batch, fixed, tb_per_s, rel, len(rows)))
    return fits


def plot_efficiency(results: list[EfficiencyResult], path: str, batch: int, baseline: str | None = None) -> None:
    """Decode tokens/s and cache size against context length, one line per model; with ``baseline``, a third
    panel: each model's decode speed-up over it (solid) and the bandwidth-bound speed-up (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {r.context: r for r in results if r.model == baseline and r.batch == batch and not r.oom}
    panels = ["decode tokens/s", "cache GiB"] + (["decode speed-up (dashed: bandwidth bound)"] if base else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for model in dict.fromkeys(r.model for r in results):
        rows = sorted((r for r in results if r.model == model and r.batch == batch and not r.oom), key=lambda r: r.context)
        if not rows:
            continue
        ctx = [r.context for r in rows]
        (line,) = axes[0].plot(ctx, [r.decode_tokens_per_s for r in rows], marker="o", label=model)
        axes[1].plot(ctx, [r.cache_gib for r in rows], marker="o", label=model)
        paired = [(r, base[r.context]) for r in rows if r.context in base]
        if base and model != baseline and paired:
            ctx_b = [r.context for r, _ in paired]
            axes[2].plot(ctx_b, [r.speed_up_over(b) for r, b in paired], marker="o",
                         color=line.get_color(), label=model)
            axes[2].plot(ctx_b, [r.bandwidth_bound_over(b) for r, b in paired], linestyle="--",
                         color=line.get_color())
    for ax, title in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(f"{title} (batch {batch})", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
