"""An exported hybrid through stock transformers vs the student it came from: bf16 logits and decode speed.

Qwen2.5-1.5B-shaped teacher with random weights; a GDN hybrid in the exportable form (student layout
``qwen3_5``) with uniformly placed softmax layers; `export_model` writes it as Qwen3.5 text; the export is
loaded by ``AutoModelForCausalLM`` (no remote code) and compared with the student on the same random prompt:

- logits: the bf16 export's and the bf16 student's error against the fp32 student (RMS and max);
- decode: greedy tokens per second through each model's own Hugging Face ``generate`` (eager, dynamic cache),
  and through our `StaticDecoder` (preallocated cache, CUDA graph) on the student;
- greedy tokens: how many leading tokens the bf16 student and the bf16 export share with the fp32 student's greedy
  continuation (after the first difference the continuations are different texts, so later positions say nothing);
- which GDN kernels the export ran: fla's (Triton kernels in a profile of its forward) or transformers' torch path.

    python benchmarks/bench_export.py --context 1024 --batch 1,8 --markdown benchmarks/RESULTS.md
    python benchmarks/bench_export.py --tiny            # CPU smoke test: a 2-layer model
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from bench_inference import QWEN25_15B, uniform_layers
from common import provenance, publish

from hybrid_distill.dtypes import cast_model
from hybrid_distill.export import export_model
from hybrid_distill.modeling.configuration_hybrid import layout_mixer_options
from hybrid_distill.modeling.static_decode import StaticDecoder
from hybrid_distill.surgery import build_student, mixers_from_softmax_layers

TINY = dict(QWEN25_15B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_decode(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens from ``generate`` and the decode rate in tokens/s (prefill timed apart and subtracted)."""
    device = ids.device
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, max_new_tokens=2, **kw)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kw)
    sync(device)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, **kw)
    sync(device)
    decode = max(time.perf_counter() - t0 - prefill, 1e-9)
    return out[:, ids.shape[1]:], ids.shape[0] * (new - 1) / decode


def static_decode(model, ids: torch.Tensor, new: int) -> float:
    dec = StaticDecoder(model, batch_size=ids.shape[0], max_length=ids.shape[1] + new + 1)
    dec.generate(ids, max_new_tokens=4)  # warm-up (graph capture)
    sync(ids.device)
    t0 = time.perf_counter()
    dec.generate(ids, max_new_tokens=1)
    sync(ids.device)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec.generate(ids, max_new_tokens=new)
    sync(ids.device)
    return ids.shape[0] * (new - 1) / max(time.perf_counter() - t0 - prefill, 1e-9)


def leading_agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading positions where two greedy continuations (first row) agree."""
    differ = (a[0] != b[0]).nonzero()
    return int(differ[0]) if len(differ) else a.shape[1]


def gdn_kernels(model, ids: torch.Tensor) -> str:
    """``fla`` if a forward of `model` launches fla's gated-delta-rule Triton kernels, else ``torch``."""
    if ids.device.type != "cuda":
        return "torch"
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(ids[:, :128])
        sync(ids.device)
    names = {e.name for e in prof.events()}
    return "fla" if any("delta_rule" in n or "chunk_fwd_kernel" in n for n in names) else "torch"


def error(a: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    d = a.float() - ref
    return {"rms": d.pow(2).mean().sqrt().item(), "max": d.abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", default="1,8", help="comma-separated decode batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--softmax-ratio", type=float, default=0.25)
    parser.add_argument("--tiny", action="store_true", help="a 4-layer model (CPU smoke test)")
    parser.add_argument("--cudnn-tf32", choices=("on", "off"), default="on",
                        help="cuDNN's TF32 convolutions (torch's default: on) during the fp32 logit check and after")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = args.cudnn_tf32 == "on"
    shape = TINY if args.tiny else QWEN25_15B
    torch.manual_seed(0)
    with torch.device(device):
        teacher = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation="sdpa")).float().eval()
    n = teacher.config.num_hidden_layers
    softmax = uniform_layers(n, round(args.softmax_ratio * n))
    student = build_student(teacher, mixers_from_softmax_layers(n, softmax, "gdn"), layout_mixer_options("qwen3_5")).eval()
    del teacher
    ids = torch.randint(0, shape["vocab_size"], (1, args.context), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = student(ids).logits.float()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = export_model(student, tmp, dtype=torch.bfloat16)
        export_s = time.perf_counter() - t0
        exported = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(device).eval()
    with torch.no_grad():
        fp32_tokens, _ = hf_decode(student, ids, args.new_tokens)
    student = cast_model(student, torch.bfloat16).eval()
    with torch.no_grad():
        errors = {"student bf16": error(student(ids).logits, reference), "export bf16": error(exported(ids).logits, reference)}
        kernels = gdn_kernels(exported, ids)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        prompt = ids.expand(batch, -1).contiguous()
        with torch.no_grad():
            ours, ours_hf = hf_decode(student, prompt, args.new_tokens)
            theirs, export_hf = hf_decode(exported, prompt, args.new_tokens)
            static = static_decode(student, prompt, args.new_tokens)
        rows.append({"batch": batch, "student_generate_tok_s": ours_hf, "export_generate_tok_s": export_hf,
                     "student_static_tok_s": static,
                     "leading_tokens_as_fp32": {"student bf16": leading_agreement(ours, fp32_tokens),
                                                "export bf16": leading_agreement(theirs, fp32_tokens)}})
    out = {"shape": "tiny" if args.tiny else "Qwen2.5-1.5B", "layers": n, "softmax_layers": softmax,
           "context": args.context, "new_tokens": args.new_tokens, "export_s": export_s,
           "fp32_max_logit_error": result.max_logit_error, "max_logit": result.max_logit, "errors": errors, "decode": rows,
           "model_class": type(exported).__name__, "export_gdn_kernels": kernels, "cudnn_tf32": args.cudnn_tf32}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    lines = [f"### Export to Qwen3.5 text: {out['shape']}-shaped GDN hybrid, softmax layers {softmax} of {n}", "",
             f"Command: `python benchmarks/bench_export.py --context {args.context} --batch {args.batch} "
             f"--new-tokens {args.new_tokens} --cudnn-tf32 {args.cudnn_tf32}`; {provenance()}; stock `{out['model_class']}`, GDN kernels in the "
             f"export's forward: {kernels}.", "",
             f"Export {export_s:.1f} s; fp32 logit check: max |student − export| {result.max_logit_error:.2g} "
             f"(largest |logit| {result.max_logit:.3g}). Against the fp32 student on a {args.context}-token prompt: "
             f"student bf16 RMS {errors['student bf16']['rms']:.4f} / max {errors['student bf16']['max']:.3f}; "
             f"export bf16 RMS {errors['export bf16']['rms']:.4f} / max {errors['export bf16']['max']:.3f}.", "",
             f"| batch | student `generate` tok/s | export `generate` tok/s | student `StaticDecoder` tok/s | "
             f"leading greedy tokens as the fp32 student's, of {args.new_tokens}: student bf16 / export bf16 |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['student_generate_tok_s']:,.0f} | {r['export_generate_tok_s']:,.0f} | "
              f"{r['student_static_tok_s']:,.0f} | {r['leading_tokens_as_fp32']['student bf16']} / "
              f"{r['leading_tokens_as_fp32']['export bf16']} |" for r in rows]
    publish("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
