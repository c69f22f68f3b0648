"""One-off GPU check of `evaluate_model(suite="efficiency")` (session 15): a 4-layer Qwen2.5-1.5B-shaped
teacher (fp32, random weights) and a GDN hybrid, measured as bf16 copies. Run from the repo root with $OUT set."""
import os, sys, time, torch
sys.path.insert(0, "benchmarks")
from bench_inference import QWEN25_15B
from transformers import Qwen2Config, Qwen2ForCausalLM
from hybrid_distill.surgery import build_student
from hybrid_distill.tokenization import tiny_tokenizer
from hybrid_distill.evaluation.suite import evaluate_model

cfg = Qwen2Config(**{**QWEN25_15B, "num_hidden_layers": 4})
torch.manual_seed(0)
with torch.device("cuda"):
    teacher = Qwen2ForCausalLM(cfg).eval()
student = build_student(teacher, ["gdn", "softmax", "gdn", "gdn"]).eval()
t0 = time.time()
res = evaluate_model(student, tiny_tokenizer(), os.environ["OUT"] + "/eff", suite="efficiency", teacher=teacher,
                     lengths=[4096], efficiency_batches=[1, 8], decode_steps=16, efficiency_dtype="bfloat16",
                     model_name="hybrid-4L", progress=False)
print(open(os.environ["OUT"] + "/eff/summary.md").read())
print("seconds", time.time() - t0, "teacher dtype after", next(teacher.parameters()).dtype)
