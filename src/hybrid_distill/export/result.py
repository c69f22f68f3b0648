"""What an export found and wrote: refusal reasons, per-layer mapping notes, the result of a written export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import HybridDistillError


class ExportError(HybridDistillError, ValueError):
    """The student cannot be exported as asked (its layers, options, or the output folder)."""


@dataclass(frozen=True)
class Blocker:
    """A part of the student that the target format cannot compute exactly."""

    layer: int | None  # None: the whole model
    mixer: str | None  # the layer's mixer (softmax, gdn, ...); None for the whole model
    reason: str
    fix: str  # what makes the student exportable exactly
    approximation: str | None  # what an approximate export does instead; None: no export at all

    def describe(self) -> str:
        where = f"layer {self.layer} ({self.mixer})" if self.layer is not None else "model"
        lines = [f"- {where}: {self.reason}", f"    exportable with: {self.fix}"]
        if self.approximation is not None:
            lines.append(f"    --approximate: {self.approximation}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LayerExport:
    """How one student layer became a layer of the exported model."""

    index: int
    mixer: str  # the student's mixer
    layer_type: str  # the exported layer's type (Qwen3.5: full_attention / linear_attention)
    notes: tuple[str, ...]


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    format: str
    dtype: str  # dtype of the written weights (config.json's `dtype`)
    layers: tuple[LayerExport, ...]
    notes: tuple[str, ...]  # model-wide mapping notes (embeddings, final norm, rotary embedding)
    approximations: tuple[Blocker, ...]  # what an approximate export could not keep exact; () when exact
    max_logit_error: float | None  # max |student - export| of fp32 logits on the check input; None: not measured
    max_logit: float | None  # the student's max |logit| on that input (the scale of the error)
    check_input: str | None  # the input the error was measured on
    files: tuple[str, ...]  # written files, relative to out_dir

    @property
    def exact(self) -> bool:
        return not self.approximations

    def summary(self) -> str:
        kinds = "".join("S" if layer.layer_type == "full_attention" else "g" for layer in self.layers)
        lines = [f"exported {len(self.layers)} layers to {self.out_dir} ({self.format}, {self.dtype}): {kinds}"
                 "   (S full attention, g Gated DeltaNet)"]
        if self.max_logit_error is not None:
            lines.append(f"max |logit difference| vs the student (fp32, {self.check_input}): {self.max_logit_error:.3g} "
                         f"(largest |logit| {self.max_logit:.3g})")
        lines.append("exact by construction" if self.exact else "APPROXIMATE:\n" + "\n".join(b.describe() for b in self.approximations))
        lines += [f"wrote {name}" for name in self.files]
        return "\n".join(lines)
