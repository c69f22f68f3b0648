"""Export to stock Qwen3.5 text: loaded by transformers alone, in a fresh process where hybrid_distill cannot be
imported, the export computes the student (fp32 logits, greedy decoding with a cache, bf16 error); what it
cannot compute is refused with the reason and the student option that fixes it."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

from hybrid_distill.checkpoint import save_student
from hybrid_distill.cli import main
from hybrid_distill.dtypes import cast_model
from hybrid_distill.export import ExportError, export_model, export_student
from hybrid_distill.export.exporter import CHECK_BATCH, CHECK_SEED, CHECK_TOKENS
from hybrid_distill.export import qwen3_5
from hybrid_distill.export.qwen3_5 import HEAD_NORM_TOLERANCE, linearize_head_norm
from hybrid_distill.modeling import layout_mixer_options
from hybrid_distill.surgery import build_student
from hybrid_distill.tiny_teachers import tiny_teacher
from hybrid_distill.tokenization import tiny_tokenizer

QWEN3_5 = layout_mixer_options("qwen3_5")
# name -> (tiny teacher, teacher overrides, mixers, mixer options, range of the final-norm weights)
CASES = {
    "llama-gqa": ("llama-gqa", {}, ["gdn", "softmax", "gdn", "gdn"], QWEN3_5, (0.05, 2.0)),
    # Llama 3's own rms_norm_eps: today's default mixer options export as they are
    "llama-default-options": ("llama-gqa", {"rms_norm_eps": 1e-5}, ["softmax", "gdn", "gdn", "softmax"], None, (0.05, 2.0)),
    # llama3 rope scaling, GQA, short convs, embeddings kept tied (final-norm weights >= 0.5)
    "llama3-rope-tied-conv": ("llama3-rope-tied", {}, ["gdn", "gdn", "softmax", "gdn"],
                              {**QWEN3_5, "gdn_use_short_conv": True}, (0.5, 2.0)),
    "mistral": ("mistral", {}, ["gdn", "softmax", "softmax", "gdn"], QWEN3_5, (0.05, 2.0)),
    # q/k/v biases in the softmax layers; tied embeddings written untied (final-norm weights below 0.5)
    "qwen2-bias": ("qwen2-bias-tied", {}, ["softmax", "gdn", "gdn", "softmax"], QWEN3_5, (0.05, 2.0)),
    "qwen3-qknorm": ("qwen3-qknorm", {}, ["gdn", "softmax", "gdn", "gdn"], QWEN3_5, (0.05, 2.0)),
    "all-linear": ("qwen2-bias-tied", {}, ["gdn"] * 4, QWEN3_5, (0.05, 2.0)),
    "softmax-only": ("llama3-rope-tied", {}, ["softmax"] * 4, None, (0.5, 2.0)),
}
# Exported anyway with approximate=True: Qwen2 GDN layers with their q/k/v biases and the default norm eps.
APPROXIMATE_CASE = ("qwen2-bias-tied", {}, ["gdn", "softmax", "gdn", "gdn"], None, (0.05, 2.0))
NEW_TOKENS = 16
TEXT = "Serve a distilled hybrid with no custom code."

# Runs in a fresh interpreter (-I: no PYTHONPATH, no user site): the editable install's path entry is
# removed and a meta-path finder refuses `hybrid_distill`, so only transformers' own code can load the export.
STOCK_CHECK = r'''
import importlib.abc, os, sys

class HideHybridDistill(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hybrid_distill":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden from the stock-transformers check)")
        return None

sys.meta_path.insert(0, HideHybridDistill())
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "hybrid_distill"))]
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

job = torch.load(sys.argv[1])
results = {}
for name, case in job.items():
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=dtype, trust_remote_code=False)
        with torch.no_grad():
            out[str(dtype)] = model(case["ids"]).logits.float()
    model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32, trust_remote_code=False)
    out["class"] = f"{type(model).__module__}.{type(model).__name__}"
    gen = model.generate(case["prompt"], attention_mask=case["prompt_mask"], do_sample=False, max_new_tokens=case["new_tokens"],
                         min_new_tokens=case["new_tokens"], return_dict_in_generate=True)
    out["generated"] = gen.sequences
    cache = getattr(gen, "cache", None) or getattr(gen, "past_key_values", None)
    out["cache"] = type(cache).__name__ if cache is not None else "none"
    out["tokens"] = torch.tensor(AutoTokenizer.from_pretrained(case["dir"])(case["text"])["input_ids"])
    results[name] = out
try:
    import hybrid_distill  # noqa: F401
    hidden = False
except ModuleNotFoundError:
    hidden = True
results["_env"] = {"hybrid_distill_hidden": hidden,
                   "hybrid_distill_loaded": any(k.split(".")[0] == "hybrid_distill" for k in sys.modules)}
torch.save(results, sys.argv[2])
'''


def _perturbed_student(variant, overrides, mixers, options, final_norm, seed=0):
    """A student whose every parameter the export maps matters: norms far from 1, random new GDN parameters."""
    student = build_student(tiny_teacher(variant, **overrides), mixers, options)
    g = torch.Generator().manual_seed(seed)

    def uniform(p, lo, hi):
        return torch.rand(p.shape, generator=g) * (hi - lo) + lo

    with torch.no_grad():
        for name, p in student.named_parameters():
            if name == "model.norm.weight":
                p.copy_(uniform(p, *final_norm))
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(uniform(p, 0.5, 2.0))
            elif name.endswith(("norm.weight", "o_norm_weight")):
                p.copy_(uniform(p, 0.05, 2.0))
            elif name.endswith(("A_log", "dt_bias")):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(("a_proj.weight", "b_proj.weight", "g_proj.weight")) or "conv1d" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return student.eval()


def _prompt(seed=3):
    """Two prompts, the second left-padded (pad id 0) by four tokens."""
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    return ids, mask


def _student_outputs(student, ids, prompt, prompt_mask):
    with torch.no_grad():
        logits = student(ids).logits
        bf16 = cast_model(copy.deepcopy(student), torch.bfloat16)(ids).logits.float()
        generated = student.generate(prompt, attention_mask=prompt_mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS)
    return {"logits": logits, "bf16": bf16, "generated": generated}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every case saved as a student, exported, and run by stock transformers in one fresh process."""
    root = tmp_path_factory.mktemp("export")
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    check_ids = torch.randint(0, 512, (CHECK_BATCH, CHECK_TOKENS), generator=torch.Generator().manual_seed(CHECK_SEED))
    prompt, prompt_mask = _prompt()
    cases, job = {}, {}
    for name, spec in {**CASES, "approximate": APPROXIMATE_CASE}.items():
        student = _perturbed_student(*spec)
        save_student(student, root / name / "student", tokenizer=tiny_tokenizer())
        result = export_student(root / name / "student", root / name / "export", approximate=name == "approximate")
        case_ids = check_ids if name == "approximate" else ids
        cases[name] = {"result": result, "student": _student_outputs(student, case_ids, prompt, prompt_mask),
                       "dir": root / name / "export"}
        job[name] = {"dir": str(root / name / "export"), "ids": case_ids, "prompt": prompt, "prompt_mask": prompt_mask,
                     "new_tokens": NEW_TOKENS, "text": TEXT}
    torch.save(job, root / "job.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-I", "-c", STOCK_CHECK, str(root / "job.pt"), str(root / "stock.pt")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stock = torch.load(root / "stock.pt")
    for name in cases:
        cases[name]["stock"] = stock[name]
    cases["_env"] = stock["_env"]
    return cases


@pytest.mark.parametrize("name", list(CASES))
def test_stock_transformers_loads_the_export_without_hybrid_distill(exports, name):
    case = exports[name]
    assert exports["_env"] == {"hybrid_distill_hidden": True, "hybrid_distill_loaded": False}
    assert case["stock"]["class"] == "transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5ForCausalLM"
    config = json.loads((case["dir"] / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_text" and config["architectures"] == ["Qwen3_5ForCausalLM"]
    assert "auto_map" not in config and not list(case["dir"].glob("*.py"))
    assert config["layer_types"] == ["linear_attention" if m == "gdn" else "full_attention" for m in CASES[name][2]]
    # keys serving engines read: vLLM qkv_bias, SGLang a top-level partial_rotary_factor (its default is 0.25)
    assert config["partial_rotary_factor"] == config["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert config["qkv_bias"] == config["attention_bias"] == (name == "qwen2-bias")
    assert config["mamba_ssm_dtype"] == "float32"
    files = set(case["result"].files)
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer.json"} <= files
    assert files == {str(p.relative_to(case["dir"])) for p in case["dir"].rglob("*") if p.is_file()}
    assert case["result"].exact and "exact by construction" in (case["dir"] / "README.md").read_text()
    assert torch.equal(case["stock"]["tokens"], torch.tensor(tiny_tokenizer()(TEXT)["input_ids"]))


@pytest.mark.parametrize("name", list(CASES))
def test_export_computes_the_students_fp32_logits(exports, name):
    case = exports[name]
    error = (case["stock"]["torch.float32"] - case["student"]["logits"]).abs().max().item()
    assert error <= 1e-4, error
    assert case["result"].max_logit_error <= 1e-4  # the export's own check, on its fixed random input


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_with_cache_matches_the_student(exports, name):
    case = exports[name]
    assert case["student"]["generated"].shape[1] == 10 + NEW_TOKENS
    assert torch.equal(case["stock"]["generated"], case["student"]["generated"])
    if name == "all-linear":  # transformers' Qwen3.5 cache needs a full-attention layer: generate() runs without one
        assert case["stock"]["cache"] == "none"
        assert json.loads((case["dir"] / "generation_config.json").read_text())["use_cache"] is False
    else:
        assert case["stock"]["cache"] == "DynamicCache"


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_error_is_no_larger_than_the_students_own(exports, name):
    """Both against the student's fp32 logits. RMS over all logits is the stable measure (within 10%); the
    maximum over ~20k logits of rounding noise varies by up to ~2x between two equally precise models."""
    case = exports[name]
    reference = case["student"]["logits"]
    student_err = case["student"]["bf16"] - reference
    export_err = case["stock"]["torch.bfloat16"] - reference
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(export_err) <= 1.1 * rms(student_err), (rms(export_err), rms(student_err))
    assert export_err.abs().max() <= 2 * student_err.abs().max()


def test_approximate_export_reports_the_error_stock_transformers_shows(exports):
    case = exports["approximate"]
    result = case["result"]
    assert not result.exact
    assert {(b.layer, b.reason.split(" ")[0]) for b in result.approximations} >= {(0, "q/k/v"), (0, "output-norm")}
    stock_error = (case["stock"]["torch.float32"] - case["student"]["logits"]).abs().max().item()
    assert result.max_logit_error > 1e-3  # dropped biases and a different eps are not rounding
    assert stock_error == pytest.approx(result.max_logit_error, abs=1e-5)
    card = (case["dir"] / "README.md").read_text()
    assert "**approximate**" in card and "gdn_use_qkv_bias: false" in card


def test_full_attention_interval_is_written_only_for_periodic_layouts():
    from hybrid_distill.export.qwen3_5 import full_attention_interval

    g, s = "linear_attention", "full_attention"
    assert full_attention_interval([g, g, g, s, g, g, g, s]) == 4
    assert full_attention_interval([s, s]) == 1
    assert full_attention_interval([g, s, g, g]) is None
    assert full_attention_interval([g, g, g, s, g, g]) == 4  # what an engine derives from 4 over 6 layers
    assert full_attention_interval([g, g, s, s]) is None
    assert full_attention_interval([g, g, g]) is None


# --------------------------------------------------------------------------------------------
# Linearized q/k norm (teachers without q/k norm)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tolerance", [HEAD_NORM_TOLERANCE, 1e-3])
def test_linearized_head_norm_error_is_within_its_proven_bound(tolerance):
    """Qwen3.5's own q/k norm, fed the scaled projection, returns the projection up to the relative error
    1 - (1 + m/c^2)^(-1/2) <= bound, for random inputs and for the inputs that maximize each head's norm."""
    g = torch.Generator().manual_seed(0)
    hidden, heads, head_dim, eps = 64, 4, 16, 1e-6
    weight = torch.randn(heads * head_dim, hidden, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(heads * head_dim, generator=g, dtype=torch.float64) * 0.05
    lin = linearize_head_norm(weight, bias, head_dim, eps, tolerance=tolerance)
    assert lin.bound <= tolerance
    # inputs are RMSNorm outputs (|x|^2 < hidden): random ones, and per head +-sqrt(hidden) x its top singular vector
    h = torch.randn(256, hidden, generator=g, dtype=torch.float64) * torch.rand(256, 1, generator=g, dtype=torch.float64) * 10
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    top = torch.linalg.svd(weight.reshape(heads, head_dim, hidden)).Vh[:, 0]  # [heads, hidden]
    x = torch.cat([x, top * hidden**0.5, -top * hidden**0.5])
    y = (x @ weight.T + bias).reshape(-1, heads, head_dim)
    scaled = lin.scale * y
    c = 1 + lin.norm_weight
    # the norm's formula in float64: y_hat = s y / sqrt(mean((s y)^2) + eps) * (1 + w)
    y_hat = scaled * torch.rsqrt(scaled.pow(2).mean(-1, keepdim=True) + eps) * c
    m = y.pow(2).mean(-1)
    relative = (y_hat - y).norm(dim=-1) / y.norm(dim=-1)
    torch.testing.assert_close(relative, 1 - (1 + m / c**2) ** -0.5, rtol=1e-6, atol=1e-15)  # the derivation
    cosine = (y_hat * y).sum(-1) / (y_hat.norm(dim=-1) * y.norm(dim=-1))
    assert (1 - cosine).abs().max() < 1e-12  # the direction is exact
    assert m.max() <= lin.max_mean_square and relative.max() <= lin.bound
    assert m.max() >= 0.5 * lin.max_mean_square  # the worst-case inputs come near the bound: it is not vacuous
    # transformers' own norm (it computes in fp32) is that formula up to fp32 rounding
    norm = Qwen3_5RMSNorm(head_dim, eps=eps)
    norm.weight.data.fill_(lin.norm_weight)
    with torch.no_grad():
        stock = norm(scaled.float()).double()
    assert ((stock - y_hat).norm(dim=-1) / y.norm(dim=-1)).max() <= 4 * 2.0**-24
    assert ((stock - y).norm(dim=-1) / y.norm(dim=-1)).max() <= lin.bound + 4 * 2.0**-24


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

NOT_APPROXIMABLE, APPROXIMABLE = False, True
REFUSALS = {
    "gla": ("llama-gqa", {}, ["gla", "softmax", "gdn", "gdn"], QWEN3_5, NOT_APPROXIMABLE,
            ["layer 0 (gla): Qwen3.5 has no gated linear attention", "student.linear: gdn"]),
    "swa": ("llama-gqa", {}, ["swa", "softmax", "gdn", "gdn"], QWEN3_5, APPROXIMABLE,
            ["layer 0 (swa): sliding-window attention (64 tokens)", "no swa mixers", "at most 64 tokens"]),
    "teacher-window": ("mistral", {"sliding_window": 32}, ["gdn", "softmax", "gdn", "gdn"], QWEN3_5, APPROXIMABLE,
                       ["layer 1 (softmax): the teacher's sliding window (32 tokens)", "without sliding_window"]),
    "gdn-qkv-bias": ("qwen2-bias-tied", {}, ["gdn", "softmax", "gdn", "gdn"], {"norm_eps": "teacher"}, APPROXIMABLE,
                     ["layer 0 (gdn): q/k/v biases", "layer 3 (gdn): q/k/v biases", "gdn_use_qkv_bias: false"]),
    "gdn-qk-norm": ("qwen3-qknorm", {}, ["gdn", "softmax", "gdn", "gdn"], {"norm_eps": "teacher"}, APPROXIMABLE,
                    ["layer 2 (gdn): per-head q/k RMSNorms", "gdn_use_qk_norm: false"]),
    "norm-eps": ("llama-gqa", {}, ["gdn", "softmax", "gdn", "gdn"], None, APPROXIMABLE,
                 ["output-norm eps 1e-05 differs from rms_norm_eps 1e-06", "norm_eps: teacher"]),
    "no-output-gate": ("llama-gqa", {}, ["gdn", "softmax", "gdn", "gdn"],
                       {"norm_eps": "teacher", "gdn_use_output_gate": False}, NOT_APPROXIMABLE,
                       ["no output gate", "gdn_use_output_gate: true"]),
    "qkv-identity": ("llama-gqa", {}, ["gdn", "softmax", "gdn", "gdn"],
                     {"norm_eps": "teacher", "gdn_qkv_activation": "identity"}, NOT_APPROXIMABLE,
                     ["q/k/v without SiLU", "gdn_qkv_activation: silu"]),
    "gdn-o-bias": ("llama-gqa", {"attention_bias": True}, ["gdn", "softmax", "gdn", "gdn"], QWEN3_5, APPROXIMABLE,
                   ["layer 0 (gdn): o_proj has a bias", "a teacher without attention_bias"]),
    "mlp-bias": ("llama-gqa", {"mlp_bias": True}, ["gdn", "softmax", "gdn", "gdn"], QWEN3_5, NOT_APPROXIMABLE,
                 ["model: the MLPs have biases"]),
    "hidden-act": ("llama-gqa", {"hidden_act": "gelu"}, ["gdn", "softmax", "gdn", "gdn"], QWEN3_5, NOT_APPROXIMABLE,
                   ["model: hidden_act is 'gelu'"]),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_export_refuses_what_it_cannot_compute_exactly(name, tmp_path):
    variant, overrides, mixers, options, approximable, expected = REFUSALS[name]
    student = build_student(tiny_teacher(variant, **overrides), mixers, options)
    with pytest.raises(ExportError) as err:
        export_model(student, tmp_path / "out")
    for text in expected:
        assert text in str(err.value)
    assert not (tmp_path / "out").exists()
    if approximable:
        result = export_model(student, tmp_path / "out", approximate=True)
        assert not result.exact and result.max_logit_error is not None
        assert (tmp_path / "out" / "model.safetensors").is_file()
    else:
        with pytest.raises(ExportError, match="not even approximately"):
            export_model(student, tmp_path / "out", approximate=True)
        assert not (tmp_path / "out").exists()


def test_export_refuses_a_rotary_embedding_it_cannot_reproduce(tmp_path):
    student = build_student(tiny_teacher("llama-gqa"), ["softmax", "gdn", "gdn", "gdn"], QWEN3_5)
    student.model.rotary_emb.inv_freq.mul_(1.001)
    with pytest.raises(ExportError, match="rotary embedding differs"):
        export_model(student, tmp_path / "out")


def test_rotary_check_allows_fp32_rounding_of_the_frequencies():
    # inverse frequencies computed on another device can differ by an ulp; positions near the end multiply that
    student = build_student(tiny_teacher("llama-gqa"), ["softmax", "gdn", "gdn", "gdn"], QWEN3_5)
    model, _, _ = qwen3_5.build_qwen3_5(student)
    assert qwen3_5.rotary_mismatch(student, model) <= 1e-6
    inv = student.model.rotary_emb.inv_freq
    inv.copy_(torch.nextafter(inv, torch.full_like(inv, 2.0)))
    assert 0 < qwen3_5.rotary_mismatch(student, model) <= 1.0
    inv.mul_(1.0001)  # a different rotary: far beyond rounding at the last positions
    assert qwen3_5.rotary_mismatch(student, model) > 1.0


def test_export_refuses_bad_output_folders_formats_and_dtypes(tmp_path):
    student = build_student(tiny_teacher("llama-gqa"), ["softmax", "gdn", "gdn", "gdn"], QWEN3_5)
    save_student(student, tmp_path / "student")
    with pytest.raises(ExportError, match="holds the student"):
        export_student(tmp_path / "student", tmp_path / "student")
    with pytest.raises(ExportError, match="holds the student"):
        export_student(tmp_path / "student", tmp_path)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ExportError, match="is a file"):
        export_student(tmp_path / "student", tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not an earlier export"):
        export_student(tmp_path / "student", tmp_path / "busy")
    with pytest.raises(ExportError, match="unknown export format 'gguf'"):
        export_student(tmp_path / "student", tmp_path / "out", format="gguf")
    with pytest.raises(ExportError, match="float16 exports are not supported"):
        export_student(tmp_path / "student", tmp_path / "out", dtype="float16")
    # an earlier export is replaced as a whole, in the requested dtype (A_log / dt_bias stay fp32)
    export_student(tmp_path / "student", tmp_path / "out")
    result = export_student(tmp_path / "student", tmp_path / "out", dtype="bfloat16", verify=False)
    assert result.dtype == "bfloat16" and result.max_logit_error is None
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.linear_attn.A_log").dtype == torch.float32
        assert f.get_tensor("model.layers.1.linear_attn.in_proj_qkv.weight").dtype == torch.bfloat16


def test_cli_export_writes_the_export_or_names_what_blocks_it(tmp_path, capsys):
    exportable = build_student(tiny_teacher("llama-gqa"), ["gdn", "softmax", "gdn", "gdn"], QWEN3_5)
    save_student(exportable, tmp_path / "ok")
    assert main(["export", str(tmp_path / "ok"), str(tmp_path / "ok-export"), "--format", "qwen3_5"]) == 0
    assert "exact by construction" in capsys.readouterr().out
    assert json.loads((tmp_path / "ok-export" / "config.json").read_text())["model_type"] == "qwen3_5_text"
    blocked = build_student(tiny_teacher("qwen2-bias-tied"), ["gdn", "softmax", "gdn", "gdn"])
    save_student(blocked, tmp_path / "blocked")
    assert main(["export", str(tmp_path / "blocked"), str(tmp_path / "blocked-export")]) == 2
    err = capsys.readouterr().err
    assert "layer 0 (gdn): q/k/v biases" in err and "gdn_use_qkv_bias: false" in err and "--approximate" in err
    assert main(["export", str(tmp_path / "blocked"), str(tmp_path / "blocked-export"), "--approximate"]) == 0
    assert "APPROXIMATE" in capsys.readouterr().out
