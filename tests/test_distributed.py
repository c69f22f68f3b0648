"""Data parallelism: a 2-process run (FSDP2 fully_shard; gloo on CPU, NCCL on 2 GPUs) equals a 1-process run
with the same global batch, for Stage 1 and Stage 2 (losses and final weights), and resumes under FSDP.
Doubles as the worker: ``python tests/test_distributed.py OUT_DIR [cpu|cuda]`` (plain) or under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_distill.artifacts import STEP_FILE, StepRecord
from hybrid_distill.distill import distributed as hd_dist
from hybrid_distill.fileio import atomic_write_json

SEQ, GLOBAL = 16, 4


def worker(out_dir: str, device: str = "cpu", fsdp: str = "auto") -> None:
    from hybrid_distill.distill import DistillConfig, TensorTokenDataset, distill
    from hybrid_distill.surgery import build_student
    from hybrid_distill.tiny_teachers import tiny_teacher
    from hybrid_distill.tokenization import tiny_tokenizer

    torch.set_num_threads(1)
    if device == "cuda":  # e.g. embedding backward adds atomically unless told not to
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    ctx = hd_dist.init_distributed(device)

    def fresh_pair():
        teacher = tiny_teacher("llama-gqa")
        torch.manual_seed(0)
        # PyTorch's mixer kernels on the GPU too: the test is about data parallelism, and fla's kernels
        # would first compile for these tiny shapes for minutes.
        return teacher, build_student(teacher, ["gdn", "softmax", "gla", "gdn"], {"kernel_backend": "torch"})

    out = Path(out_dir)
    tokens = torch.randint(3, 512, (36, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[::3, -5:] = 0  # uneven padding: the per-rank token counts differ
    data = TensorTokenDataset(tokens, mask, heldout_sequences=4)
    # Same global batch: 1 process x 2 micro-batches of 2, or 2 processes x 1 micro-batch of 2.
    summary = {"world_size": ctx.world_size}
    for stage in (1, 2):
        teacher, student = fresh_pair()
        cfg = DistillConfig(
            stage=stage,
            target_tokens=GLOBAL * SEQ * 5,
            global_batch_size=GLOBAL,
            micro_batch_size=2,
            lr_mixer=1e-3,
            lr_other=1e-4,
            progress=False,
            save_every_tokens=GLOBAL * SEQ * 3,
            eval_max_batches=2,
            activation_checkpointing=ctx.world_size > 1,
            device=str(ctx.device),
            precision="fp32",
            fsdp=fsdp,
        )
        # stage 2 saves a tokenizer with its final model (gathered from the shards under FSDP)
        tokenizer = tiny_tokenizer(teacher.config.vocab_size) if stage == 2 else None
        result = distill(student, teacher, data, cfg, out / f"stage{stage}", tokenizer=tokenizer)
        summary[f"stage{stage}"] = {
            "sharded": hd_dist.is_sharded(student),
            "class": type(student).__name__,
            "eval": result.eval_value,
        }
        if stage == 2 and summary["stage2"]["sharded"]:  # resume under FSDP from the step-3 checkpoint
            if ctx.is_main:
                shutil.copytree(out / "stage2", out / "stage2_resume")
                shutil.rmtree(out / "stage2_resume" / "final")
                record = StepRecord.read(out / "stage2_resume")  # back to "started": resumes from step 3
                record.state, record.result = "started", None
                atomic_write_json(out / "stage2_resume" / STEP_FILE, record.to_dict())
            hd_dist.barrier()
            teacher, student = fresh_pair()
            again = distill(student, teacher, data, cfg, out / "stage2_resume")
            summary["resumed_from"] = again.resumed_from_step
    if ctx.world_size > 1:  # fsdp="off": replicated models, gradients averaged by all-reduce
        teacher, student = fresh_pair()
        distill(student, teacher, data, cfg.replace(fsdp="off", save_every_tokens=None), out / "stage2_replicated")
        summary["replicated_sharded"] = hd_dist.is_sharded(student)
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary))


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "final" / "model.safetensors"))


def _env() -> dict[str, str]:
    """The workers' environment: one thread each, no torchrun world inherited."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


class OneProcess:
    """The worker run as one plain process per device, started at its first use and shared (read only) by the tests
    of this module: every multi-process run is compared with the same unsharded run."""

    def __init__(self, root: Path):
        self.root = root
        self.runs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.outputs: dict[str, str] = {}

    def start(self, device: str) -> None:
        if device not in self.runs:
            out = self.root / device
            proc = subprocess.Popen([sys.executable, __file__, str(out), device], env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            self.runs[device] = (proc, out)

    def result(self, device: str) -> Path:
        """The run's output folder, once it has ended well."""
        self.start(device)
        proc, out = self.runs[device]
        if device not in self.outputs:
            self.outputs[device] = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, self.outputs[device][-4000:]
        return out

    def close(self) -> None:
        for proc, _ in self.runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    runs = OneProcess(tmp_path_factory.mktemp("one"))
    yield runs
    runs.close()


def run_one_and_two_processes(tmp_path: Path, one_process: OneProcess, device: str, rel: float, nproc: int = 2,
                              fsdp: str = "auto") -> None:
    """Runs the worker as ``nproc`` processes (torchrun, FSDP) on ``device`` and compares them with the one plain
    process of ``one_process`` to ``rel``."""
    one_process.start(device)  # runs beside the multi-process run
    multi = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            __file__,
            str(tmp_path / "two"),
            device,
            fsdp,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert multi.returncode == 0, (multi.stdout + multi.stderr)[-4000:]
    one_dir = one_process.result(device)

    one = json.loads((one_dir / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == nproc
    for stage in ("stage1", "stage2"):
        assert not one[stage]["sharded"]
        assert two[stage]["sharded"] and two[stage]["class"].startswith("FSDP"), "FSDP2 was not used"
        a, b = (
            _metrics(one_dir / stage / "metrics.jsonl"),
            _metrics(tmp_path / "two" / stage / "metrics.jsonl"),
        )
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for ra, rb in zip(a, b):
            for key in ("loss", "grad_norm", "eval_kl", "eval_align_loss"):
                if key in ra:
                    assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-7), (stage, ra["step"], key)
        wa, wb = _weights(one_dir / stage), _weights(tmp_path / "two" / stage)
        for run in (one_dir, tmp_path / "two"):
            assert (run / stage / "final" / "tokenizer.json").is_file() == (stage == "stage2")
        assert sorted(wa) == sorted(wb)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=rel / 5, rtol=rel, msg=f"{stage} {k}")
    if nproc > 1:  # without FSDP (fsdp="off"), the replicas also match the single process
        assert two["replicated_sharded"] is False
        a, b = (
            _metrics(one_dir / "stage2" / "metrics.jsonl"),
            _metrics(tmp_path / "two" / "stage2_replicated" / "metrics.jsonl"),
        )
        train_losses = lambda rows: [r["loss"] for r in rows if r["kind"] == "train"]  # noqa: E731
        assert train_losses(b) == pytest.approx(train_losses(a), rel=rel)
    # Resumed FSDP run: same curve and weights as the uninterrupted one.
    assert two["resumed_from"] == 3
    ra, rb = (
        _metrics(tmp_path / "two" / "stage2" / "metrics.jsonl"),
        _metrics(tmp_path / "two" / "stage2_resume" / "metrics.jsonl"),
    )
    exact = device == "cpu"  # on GPUs: to 1e-6 in case a kernel without a deterministic variant runs
    losses_a, losses_b = [r.get("loss") for r in ra], [r.get("loss") for r in rb]
    assert losses_b == (losses_a if exact else pytest.approx(losses_a, rel=1e-6))
    wa, wb = _weights(tmp_path / "two" / "stage2"), _weights(tmp_path / "two" / "stage2_resume")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0 if exact else 1e-6, atol=0 if exact else 1e-7, msg=k)


def test_two_process_fsdp_equals_one_process(tmp_path, one_process):
    run_one_and_two_processes(tmp_path, one_process, "cpu", rel=1e-5)


def test_one_process_fsdp_equals_unsharded(tmp_path, one_process):
    """fsdp='on' under torchrun with one process shards (world size 1) and trains as the unsharded run."""
    run_one_and_two_processes(tmp_path, one_process, "cpu", rel=1e-5, nproc=1, fsdp="on")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_fsdp_equals_one_gpu(tmp_path, one_process):
    """The same on 2 GPUs with NCCL (fp32; reductions run in another order than on one GPU)."""
    run_one_and_two_processes(tmp_path, one_process, "cuda", rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_gpu_fsdp_equals_one_gpu(tmp_path, one_process):
    """FSDP2 on one GPU (fsdp='on'): the models stay on the host until fully_shard moves each unit to the GPU,
    and training matches the unsharded run."""
    run_one_and_two_processes(tmp_path, one_process, "cuda", rel=1e-4, nproc=1, fsdp="on")


def test_single_process_helpers():
    ctx = hd_dist.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    t = torch.tensor([3.0])
    assert hd_dist.all_reduce_sum(t) is t and t.item() == 3.0
    assert hd_dist.all_reduce_min_int(5, ctx.device) == 5
    assert hd_dist.broadcast_object({"a": 1}) == {"a": 1}
    hd_dist.barrier()


def test_forward_method_unsharded():
    from hybrid_distill.tiny_teachers import tiny_teacher

    model = tiny_teacher("llama-gqa")
    ids = torch.randint(0, 512, (2, 6))
    hd_dist.install_forward_method(model)
    hidden, weight = hd_dist.forward_hidden(model, ids, None, head_fn=lambda h, w: (h, w))
    assert weight is model.lm_head.weight
    with torch.no_grad():
        torch.testing.assert_close(hidden @ weight.T, model(ids).logits)


if __name__ == "__main__":
    worker(*sys.argv[1:])
