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
