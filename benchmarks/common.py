"""Shared by the benchmark scripts: the provenance line of a results entry and publishing it."""

from __future__ import annotations

import datetime

import torch


def provenance() -> str:
    """``date: ...; device: ...; torch ...`` for a results entry (device "cpu" without CUDA)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"date: {datetime.date.today().isoformat()}; device: {device}; torch {torch.__version__}"


def publish(text: str, markdown: str | None) -> None:
    """Print a Markdown results entry and append it to ``markdown`` when given."""
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write("\n" + text)
