"""A run's metrics: ``metrics.jsonl`` (one JSON object a line, ``"kind"``: ``"train"`` or ``"eval"``), mirrored to
TensorBoard / W&B when installed and asked for, and read back with `read_metrics`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text, jsonable
from ..layout import TrainLayout
from .config import DistillConfig

logger = logging.getLogger(__name__)


def parse_line(line: str) -> dict | None:
    """One ``metrics.jsonl`` record, or None for a line a killed writer left half-written."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` (when ``enabled``: rank 0), plus TensorBoard / W&B.

    Opening drops the lines after ``resume_step``: a killed run logged steps past its last checkpoint, and the
    resumed run logs them again.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int, report_to: Iterable[str],
                 config: DistillConfig):
        layout = TrainLayout(run_dir)
        self.path = layout.metrics
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if (parse_line(ln) or {}).get("step", 1 << 62) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        self._file = open(self.path, "a", buffering=1)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(layout.tensorboard))
            except ImportError:
                logger.warning("report_to includes 'tensorboard' but tensorboard is not installed; skipping it")
        if "wandb" in report_to:
            try:
                import wandb

                self._wandb = wandb.init(name=config.run_name or layout.root.name, config=config.to_dict(),
                                         resume="allow", dir=str(layout.root))
            except ImportError:
                logger.warning("report_to includes 'wandb' but wandb is not installed; skipping it")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record``; a NaN or infinite value is written as null (JSON has no such numbers)."""
        if not self.enabled:
            return
        self._file.write(json.dumps(jsonable(record)) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        prefix = record.get("kind", "train")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path, kind: str = "train") -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` of one kind ("train" or "eval"), in order."""
    path = TrainLayout(run_dir).metrics
    if not path.exists():
        return []
    rows = [parse_line(ln) for ln in path.read_text().splitlines()]
    return [r for r in rows if r is not None and r.get("kind") == kind]


__all__ = ["MetricsWriter", "parse_line", "read_metrics"]
