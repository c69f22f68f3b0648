"""save -> load round trips (fresh processes, with and without our package) and corrupt checkpoints."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from hybrid_distill.checkpoint import CheckpointError, load_student, save_student, verify_checkpoint
from hybrid_distill.surgery import build_student
from hybrid_distill.tiny_teachers import tiny_teacher

MIXERS = ["gdn", "softmax", "gla", "swa"]
OPTIONS = {"swa_window": 8, "gdn_use_short_conv": True}

# Hides hybrid_distill from a fresh interpreter, as on a machine that has only torch + transformers.
_BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "hybrid_distill" or name.startswith("hybrid_distill."):
                raise ImportError("hybrid_distill is hidden in this test")
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    student = build_student(tiny_teacher("qwen2-bias-tied"), MIXERS, OPTIONS)
    with torch.no_grad():  # make the new parameters distinguishable from a fresh init
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "student"
    save_student(student, path)
    ids = torch.randint(3, 500, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = student(ids).logits
    torch.save({"ids": ids, "logits": logits}, path.parent / "ref.pt")
    return path


def test_checkpoint_layout(saved):
    files = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_hybrid.py", "configuration_hybrid.py", "hybrid_ops.py"} <= files
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "hybrid_qwen2"
    assert config["mixers"] == MIXERS
    assert config["mixer_options"]["gdn_use_short_conv"] is True
    assert config["teacher"]["model_type"] == "qwen2"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hybrid.HybridQwen2ForCausalLM"


def test_load_in_process_is_identical(saved):
    ref = torch.load(saved.parent / "ref.pt")
    model = load_student(saved)
    with torch.no_grad():
        assert torch.equal(model(ref["ids"]).logits, ref["logits"])
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _fresh_process_code(saved, prelude: str, kwargs: str) -> str:
    return prelude + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(saved.parent / 'ref.pt')!r})
        model = AutoModelForCausalLM.from_pretrained({str(saved)!r}, {kwargs}).eval()
        with torch.no_grad():
            out = model(ref["ids"]).logits
        print(type(model).__module__, torch.equal(out, ref["logits"]))
        """
    )


def test_fresh_process_remote_code_without_package(saved):
    out = _run(_fresh_process_code(saved, _BLOCK_PACKAGE, "trust_remote_code=True"))
    module, equal = out.split()
    assert "hybrid_distill" not in module and equal == "True"


def test_fresh_process_with_package_without_remote_code(saved):
    out = _run(_fresh_process_code(saved, "import hybrid_distill.modeling\n", "trust_remote_code=False"))
    module, equal = out.split()
    assert module.startswith("hybrid_distill") and equal == "True"


def test_truncated_shard_fails_clearly(saved, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_student(bad)


def test_garbage_shard_and_missing_files_fail_clearly(saved, tmp_path):
    import shutil

    bad = tmp_path / "garbage"
    shutil.copytree(saved, bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="Corrupt weight file"):
        verify_checkpoint(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        verify_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_student(tmp_path / "nowhere")


def test_missing_shard_of_sharded_checkpoint(tmp_path):
    student = build_student(tiny_teacher("llama-gqa"), ["gdn", "softmax", "gdn", "gdn"])
    path = tmp_path / "sharded"
    student.save_pretrained(path, max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    ref = load_student(path)
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, student(ids).logits, rtol=0, atol=0)
    (path / shards[1]).unlink()
    with pytest.raises(CheckpointError, match="missing weight shard"):
        load_student(path)


def test_failed_save_leaves_previous_checkpoint_intact(saved, tmp_path, monkeypatch):
    import shutil

    target = tmp_path / "keep"
    shutil.copytree(saved, target)
    student = build_student(tiny_teacher("llama-gqa"), ["gdn"] * 4)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(student), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_student(student, target)
    assert verify_checkpoint(target)["model_type"] == "hybrid_qwen2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keep.tmp")]


def test_student_loads_directly_from_teacher_checkpoint(tmp_path):
    from hybrid_distill.modeling import HYBRID_CAUSAL_LM_CLASSES
    from hybrid_distill.surgery import student_config

    teacher = tiny_teacher("llama3-rope-tied")
    teacher.save_pretrained(tmp_path / "teacher")
    config = student_config(teacher.config, ["softmax"] * 4)
    student = HYBRID_CAUSAL_LM_CLASSES["llama"].from_pretrained(tmp_path / "teacher", config=config).eval()
    ids = torch.randint(3, 500, (2, 17))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
    linear_cfg = student_config(teacher.config, ["gdn"] * 4)
    linear = HYBRID_CAUSAL_LM_CLASSES["llama"].from_pretrained(tmp_path / "teacher", config=linear_cfg)
    mixer = linear.model.layers[0].self_attn
    assert torch.equal(mixer.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight)
    assert 0 < mixer.A_log.exp().min() and mixer.A_log.exp().max() <= 16  # fresh init, not zeros / garbage
    assert torch.equal(mixer.o_norm_weight, torch.ones_like(mixer.o_norm_weight))


def test_bf16_load_keeps_decay_parameters_fp32(saved):
    model = load_student(saved, dtype=torch.bfloat16)
    mixer = model.model.layers[0].self_attn
    assert mixer.q_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == torch.float32 and mixer.dt_bias.dtype == torch.float32


def test_checkpoint_folders_get_the_usual_permissions(saved, tmp_path):
    """mkdtemp makes 0700 folders; a saved checkpoint must be as readable as anything else the user writes."""
    import os
    import stat

    from hybrid_distill.fileio import DEFAULT_DIR_MODE

    student = build_student(tiny_teacher("llama-gqa"), ["gdn"] * 4)
    path = save_student(student, tmp_path / "shared")
    assert stat.S_IMODE(os.stat(path).st_mode) == DEFAULT_DIR_MODE


def test_interrupted_replace_is_restored_and_named(saved, tmp_path, monkeypatch):
    """A crash between the two renames of a replace leaves only `.NAME.old-PID`: the error says where it is and
    the next write puts it back first, so a failing write then still leaves the previous checkpoint."""
    import os
    import shutil

    target = tmp_path / "ckpt"
    shutil.copytree(saved, target)
    student = build_student(tiny_teacher("llama-gqa"), ["gdn"] * 4)
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between setting the old one aside and moving the new one in
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_student(student, target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists()
    with pytest.raises(CheckpointError, match=r"interrupted; the previous checkpoint is at .*\.ckpt\.old-"):
        verify_checkpoint(target)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(student), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_student(student, target)
    assert verify_checkpoint(target)["model_type"] == "hybrid_qwen2"  # restored before the failed write


def test_malformed_header_and_index_fail_as_checkpoint_errors(saved, tmp_path):
    import shutil
    import struct

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode()  # no data_offsets
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="malformed header"):
        verify_checkpoint(bad)
    config = (bad / "config.json").read_text()
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a model config object"):
        load_student(bad)
    (bad / "config.json").write_text(config)
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid weight index"):
        verify_checkpoint(bad)


def test_weights_that_do_not_fit_the_config_are_refused(saved, tmp_path):
    """A checkpoint whose files are whole but lack tensors, or whose mixers list was changed, must not load with
    freshly initialised weights in their place."""
    import shutil

    from safetensors.torch import load_file, save_file

    missing = tmp_path / "missing"
    shutil.copytree(saved, missing)
    state = load_file(missing / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, missing / "model.safetensors",
              metadata={"format": "pt"})
    verify_checkpoint(missing)  # structurally fine
    with pytest.raises(CheckpointError, match=r"do not fit .*missing \['model\.layers\.1\."):
        load_student(missing)
    relaid = tmp_path / "relaid"
    shutil.copytree(saved, relaid)
    config = json.loads((relaid / "config.json").read_text())
    config["mixers"] = ["softmax", "gdn", "gla", "swa"]  # layer 0 was gdn, layer 1 softmax
    (relaid / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_student(relaid)


def test_saved_files_are_readable_like_any_other_file(tmp_path):
    """safetensors writes its files 0600; a saved checkpoint's files get the user's usual file mode."""
    import os
    import stat

    from hybrid_distill.fileio import DEFAULT_FILE_MODE

    path = save_student(build_student(tiny_teacher("llama-gqa"), ["gdn"] * 4), tmp_path / "shared")
    modes = {f.name: stat.S_IMODE(os.stat(f).st_mode) for f in path.iterdir()}
    assert modes["model.safetensors"] == DEFAULT_FILE_MODE and set(modes.values()) == {DEFAULT_FILE_MODE}, modes


def test_saving_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    student = build_student(tiny_teacher("llama-gqa"), ["gdn"] * 4)
    (tmp_path / "disk").mkdir()
    target, link = tmp_path / "disk" / "final", tmp_path / "final"
    save_student(student, target)
    link.symlink_to(target)
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)
    save_student(student, link)
    save_student(student, link)  # and again in the same process
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert torch.equal(load_student(target).lm_head.weight, student.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "final"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["final"]


def test_a_copy_left_by_a_crashed_writer_neither_blocks_nor_lingers(tmp_path):
    """A writer that died after both renames but before deleting its set-aside copy leaves `.NAME.old-PID` beside
    a good NAME; a later writer (with the same PID, as in containers) still saves, and removes the leftover."""
    import os
    import shutil

    student = build_student(tiny_teacher("llama-gqa"), ["gdn"] * 4)
    for name in ("final", "ckpt[v2]"):  # glob characters in the name too
        path = save_student(student, tmp_path / name)
        leftover = tmp_path / f".{name}.old-{os.getpid()}"
        shutil.copytree(path, leftover)
        save_student(student, path)
        assert sorted(p.name for p in tmp_path.iterdir() if name in p.name) == [name]


def test_interrupted_replace_of_a_name_with_glob_characters_is_restored(tmp_path):
    import os

    from hybrid_distill.fileio import restore_interrupted_replace

    path = save_student(build_student(tiny_teacher("llama-gqa"), ["gdn"] * 4), tmp_path / "ckpt[v2]")
    os.replace(path, tmp_path / ".ckpt[v2].old-123")
    assert restore_interrupted_replace(path) == path and verify_checkpoint(path)


def test_weights_fingerprint_sees_a_change_of_any_one_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from hybrid_distill.checkpoint import weights_fingerprint

    path = save_student(build_student(tiny_teacher("llama-gqa"), ["gdn", "softmax", "gdn", "softmax"]), tmp_path / "s")
    state = load_file(path / "model.safetensors")
    # two 64-byte file slices: as sparse, relative to this tiny file, as 16 x 64 KiB slices of a multi-GB shard
    fingerprint = lambda: weights_fingerprint(path, samples=2, sample_bytes=64)  # noqa: E731
    base = fingerprint()
    unchanged = []
    for key in state:
        changed = dict(state)
        changed[key] = state[key] + 1e-3
        save_file(changed, path / "model.safetensors", metadata={"format": "pt"})
        if fingerprint() == base:
            unchanged.append(key)
    assert not unchanged
