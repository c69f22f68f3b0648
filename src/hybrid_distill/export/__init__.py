"""Export of hybrid students to stock Hugging Face architectures that serving engines run without remote code.

`export_student(STUDENT_DIR, OUT_DIR, format="qwen3_5")` (CLI: `hybrid-distill export`) writes a GDN
hybrid as Qwen3.5 text (`qwen3_5_text`): exact by construction, or refused with the reasons and the
student options that make it exportable (`approximate=True` exports anyway and reports the logit error).
"""

from .exporter import EXPORT_DTYPES, EXPORT_FORMATS, export_model, export_student, exportable
from .result import Blocker, ExportError, ExportResult, LayerExport

__all__ = [
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "Blocker",
    "ExportError",
    "ExportResult",
    "LayerExport",
    "export_model",
    "export_student",
    "exportable",
]
