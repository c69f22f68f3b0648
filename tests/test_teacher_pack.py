"""scripts/teacher_pack.py: int8 row-wise packs of a Llama teacher, and the dequantized checkpoint that is the teacher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from hybrid_distill.fileio import sha256_file
from hybrid_distill.tokenization import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import teacher_pack as tp  # noqa: E402

sys.path.pop(0)


def _teacher(path: Path, tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1 and a zero row, so both are really stored
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
        model.model.layers[0].mlp.down_proj.weight[3].zero_()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_pack_unpack_gives_the_dequantized_teacher(tmp_path, tie):
    original = _teacher(tmp_path / "teacher", tie)
    manifest = tp.pack(tmp_path / "teacher", tmp_path / "pack")
    assert manifest["parameters"] == sum(p.numel() for p in original.parameters())
    tensors = load_file(str(tmp_path / "pack" / tp.WEIGHTS))
    assert ("lm_head.weight.qweight" in tensors) == (not tie)
    assert all(t.dtype == torch.int8 for k, t in tensors.items() if k.endswith(".qweight"))
    assert all(t.dtype == torch.float32 and t.ndim == 1 for k, t in tensors.items() if not k.endswith(".qweight"))

    tp.unpack(tmp_path / "pack", tmp_path / "out")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # plain loading, nothing else
    state = teacher.state_dict()
    for name, p in original.state_dict().items():
        source = "model.embed_tokens.weight" if tie and name == "lm_head.weight" else name
        if p.ndim == 2:
            q, scale = tensors[f"{source}.qweight"], tensors[f"{source}.scale"]
            assert torch.equal(state[name], q.float() * scale[:, None]), name
            assert q.abs().max() == 127 or not p.abs().max()
            # the error of rounding to the row's grid: at most half a step
            assert (state[name] - p).abs().le(scale[:, None] / 2 + 1e-7).all(), name
        else:
            assert torch.equal(state[name], p), name
    assert torch.equal(state["model.layers.0.mlp.down_proj.weight"][3], torch.zeros(128))
    assert teacher.config.tie_word_embeddings == tie and teacher.dtype == torch.float32

    ids = torch.randint(4, original.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = original(ids).logits, teacher(ids).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel  # int8 per-row rounding of random weights


def test_unpack_is_deterministic_and_checked(tmp_path):
    _teacher(tmp_path / "teacher", True)
    manifest = tp.pack(tmp_path / "teacher", tmp_path / "pack")
    tp.unpack(tmp_path / "pack", tmp_path / "a")
    tp.unpack(tmp_path / "pack", tmp_path / "b")
    assert sha256_file(tmp_path / "a" / tp.MODEL_FILE) == sha256_file(tmp_path / "b" / tp.MODEL_FILE)
    assert tp.weights_sha256(load_file(str(tmp_path / "a" / tp.MODEL_FILE))) == manifest["dequantized_weights_sha256"]
    listed = set(manifest["files"])
    assert {tp.WEIGHTS, "config.json", "generation_config.json", "tokenizer.json"} <= listed
    assert json.loads((tmp_path / "pack" / tp.MANIFEST).read_text()) == manifest
    assert manifest["dequantized_weights_sha256"] in (tmp_path / "pack" / tp.README).read_text()

    cfg = tmp_path / "pack" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    with pytest.raises(tp.PackError, match="config.json: SHA-256"):
        tp.unpack(tmp_path / "pack", tmp_path / "c")
    assert not (tmp_path / "c").exists()
    (tmp_path / "pack" / tp.MANIFEST).unlink()
    with pytest.raises(tp.PackError, match="not a teacher pack"):
        tp.verify(tmp_path / "pack")


def test_pack_cli_prints_the_size(tmp_path, capsys):
    _teacher(tmp_path / "teacher", True)
    script = str(ROOT / "scripts" / "teacher_pack.py")
    out = subprocess.run([sys.executable, script, "pack", str(tmp_path / "teacher"), str(tmp_path / "pack")],
                         check=True, capture_output=True, text=True).stdout
    assert "MiB" in out and "sha256" in out
    # the script's exit status is main's return value (the run above): a bad pack is refused by main itself
    assert tp.main(["unpack", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "not a teacher pack" in capsys.readouterr().err


def test_unpack_takes_the_tar_that_collect_brings_back(tmp_path):
    import tarfile

    _teacher(tmp_path / "teacher", True)
    manifest = tp.pack(tmp_path / "teacher", tmp_path / "pack")
    with tarfile.open(tmp_path / "teacher_pack.tar", "w") as tar:
        tar.add(tmp_path / "pack", arcname="pack")
    assert tp.unpack(tmp_path / "teacher_pack.tar", tmp_path / "out") == manifest
    assert load_file(str(tmp_path / "out" / "model.safetensors")).keys() == load_file(
        str(tmp_path / "teacher" / "model.safetensors")).keys() - {"lm_head.weight"}
    with tarfile.open(tmp_path / "other.tar", "w") as tar:
        tar.add(tmp_path / "teacher", arcname="teacher")
    with pytest.raises(tp.PackError, match="no pack/ folder"):
        tp.unpack(tmp_path / "other.tar", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
