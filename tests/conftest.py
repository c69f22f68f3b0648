import os
import subprocess
import sys
import textwrap

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """On a CUDA machine, print a failure's traceback as soon as the test fails: device commands run under
    a time limit, and a pytest session killed at it never reaches its failure summary (this lost the
    reason of a GPU failure once, benchmarks/RESULTS.md)."""
    if report.failed and torch.cuda.is_available():
        print(f"\n--- FAILED {report.nodeid} ({report.when}) ---\n{report.longreprtext[-4000:]}\n", flush=True)


@pytest.fixture
def lock_holder():
    """``lock_holder(folder)`` starts another process that holds ``folder``'s `FolderLock` until its stdin closes
    (or the test ends) and returns it."""
    procs = []

    def hold(folder) -> subprocess.Popen:
        code = textwrap.dedent(f"""
            import sys
            from hybrid_distill.artifacts import FolderLock
            lock = FolderLock({str(folder)!r}).acquire()
            print("held", flush=True)
            sys.stdin.read()
        """)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=60)
