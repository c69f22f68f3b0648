"""Expandable segments from the Python API: the environment and, where CUDA runs, the live allocator."""

import subprocess
import sys

import pytest

from hybrid_distill import cuda_allocator
from hybrid_distill.cuda_allocator import ALLOCATOR_ENV_VARS, EXPANDABLE_SEGMENTS, prefer_expandable_segments_in_process


@pytest.fixture
def setter_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(cuda_allocator.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_allocator.torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    return calls


def test_in_process_sets_the_environment_and_the_running_allocator(setter_calls):
    env = {}
    assert prefer_expandable_segments_in_process(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE_SEGMENTS}
    assert setter_calls == [EXPANDABLE_SEGMENTS]


@pytest.mark.parametrize("name", ALLOCATOR_ENV_VARS)
def test_in_process_leaves_a_configured_allocator_alone(setter_calls, name):
    env = {name: "expandable_segments:False"}
    assert not prefer_expandable_segments_in_process(env)
    assert env == {name: "expandable_segments:False"} and setter_calls == []


def test_in_process_without_cuda_only_sets_the_environment(monkeypatch):
    monkeypatch.setattr(cuda_allocator.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(
        cuda_allocator.torch._C, "_accelerator_setAllocatorSettings", lambda s: pytest.fail("no CUDA: nothing to set"),
        raising=False,
    )
    env = {}
    assert prefer_expandable_segments_in_process(env) and env == {"PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE_SEGMENTS}


_LIVE_ALLOCATOR = """
import os, torch
from hybrid_distill.cuda_allocator import prefer_expandable_segments_in_process
before = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # CUDA in use, fixed-size segments
assert prefer_expandable_segments_in_process()
after = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
segments = {s["address"]: s.get("is_expandable") for s in torch.cuda.memory._snapshot()["segments"]}
def owner(t):
    return next(a for a in sorted(segments, reverse=True) if a <= t.data_ptr())
print(segments[owner(before)], segments[owner(after)])
"""


@pytest.mark.gpu
def test_in_process_makes_later_segments_expandable_on_a_running_allocator():
    env = {k: v for k, v in __import__("os").environ.items() if k not in ALLOCATOR_ENV_VARS}
    out = subprocess.run([sys.executable, "-c", _LIVE_ALLOCATOR], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr
