"""`DataSpec`: where a run's tokens come from, as a small serialisable value.

Jobs that run in other processes (layer-scoring candidates, pipeline stages) receive a `DataSpec`
instead of a dataset object and load the same token cache with `DataSpec.load`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .sources import DataSourceError


def int_setting(value: Any, name: str) -> int | None:
    """``value`` as a Python int (None stays None), accepting what YAML and numpy hand over: numpy ints,
    integral floats (``1e6``) and numeric strings (PyYAML reads ``1e6`` as the string ``"1e6"``).

    Raises ``DataSourceError`` naming ``name`` for anything else (``"abc"``, ``1.5``, ``True``).
    """
    if value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        return None if value is None else int(value)
    number = _number(value)
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        number = int(number)
    if not isinstance(number, int):
        raise DataSourceError(f"{name} must be an integer, got {value!r}")
    return number


def float_setting(value: Any, name: str) -> float:
    """``value`` as a Python float, accepting numpy numbers and numeric strings (see `int_setting`)."""
    number = _number(value)
    if number is None or math.isnan(number):
        raise DataSourceError(f"{name} must be a number, got {value!r}")
    return float(number)


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        for parse in (int, float):  # int first: exact for large integers
            try:
                return parse(value.strip())
            except ValueError:
                pass
    return None


@dataclass(frozen=True)
class DataSpec:
    """Arguments of `build_token_dataset` that do not depend on the stage (the stage gives seq_len)."""

    source: str = "default"
    text_field: str = "text"
    split: str = "train"
    cache_dir: str | None = None
    max_tokens: int | None = None
    # share of the documents held out, by content hash: the same text at every seq_len, stage and seed
    heldout_fraction: float = 0.01
    config: str | None = None  # Hugging Face dataset config name
    revision: str | None = None
    # synthetic recall documents mixed in (`RecallMix`); 0 = the source alone (the paper's setting)
    recall_fraction: float = 0.0
    recall_tasks: Any = None  # None (the shipped teacher's pretraining mix), [names] or {name: weight}
    recall_seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise DataSourceError(f"data.source must be a non-empty string, got {self.source!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataSourceError(f"data.text_field must be a non-empty string, got {self.text_field!r}")
        # store Python numbers: YAML reads 1e6 as a string, and numpy ints do not serialise to JSON
        coerced = {
            "max_tokens": int_setting(self.max_tokens, "data.max_tokens"),
            "heldout_fraction": float_setting(self.heldout_fraction, "data.heldout_fraction"),
            "recall_fraction": float_setting(0.0 if self.recall_fraction is None else self.recall_fraction,
                                             "data.recall_fraction"),
            "recall_seed": int_setting(self.recall_seed, "data.recall_seed"),
        }
        for name, value in coerced.items():
            object.__setattr__(self, name, value)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DataSourceError(f"data.max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise DataSourceError(f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}")
        self.recall_mix()  # validates the recall fields

    def recall_mix(self):
        """The `RecallMix` these fields ask for, or None."""
        from .recall_mix import recall_mix_from_fields

        return recall_mix_from_fields(self.recall_fraction, self.recall_tasks, self.recall_seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str | None) -> DataSpec:
        """From a mapping of fields (unknown keys are an error naming them) or a bare source string."""
        if data is None:
            return cls()
        if isinstance(data, str):
            return cls(source=data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataSourceError(f"unknown data field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that decide which tokens come out (all but where the cache lives)."""
        return {k: v for k, v in self.to_dict().items() if k != "cache_dir"}

    def load(self, tokenizer, seq_len: int, seed: int = 0, require_sequences: int | None = None, **options):
        """The packed dataset (`PackedDataset`) of this source at ``seq_len`` (cached on disk).

        ``seed`` is recorded but does not change the held-out split (a property of the documents).
        ``options``: further `build_token_dataset` arguments (e.g. ``heldout_sequences``).
        """
        from .packing import build_token_dataset

        return build_token_dataset(
            self.source,
            tokenizer,
            seq_len,
            self.cache_dir,
            text_field=self.text_field,
            split=self.split,
            max_tokens=self.max_tokens,
            heldout_fraction=self.heldout_fraction,
            seed=seed,
            require_sequences=require_sequences,
            config=self.config,
            revision=self.revision,
            recall_mix=self.recall_mix(),
            **options,
        )


def add_data_arguments(parser, *, source_flags: tuple[str, ...] = ("--data",), cache_flags: tuple[str, ...] = ("--data-cache-dir",),
                       heldout_default: float = 0.01, title: str = "data") -> None:
    """Command-line options for every `DataSpec` field (read back with `data_spec_from_args`)."""
    g = parser.add_argument_group(title)
    g.add_argument(*source_flags, dest="data", default="default",
                   help="Hugging Face dataset name, local .txt/.jsonl/.parquet file or folder, or 'default' (the embedded corpus)")
    g.add_argument("--text-field", default="text", help="column/key holding the text in .jsonl/.parquet/hub data (default: text)")
    g.add_argument("--data-split", default="train", help="Hugging Face dataset split (default: train)")
    g.add_argument("--data-config", default=None, help="Hugging Face dataset config name")
    g.add_argument("--data-revision", default=None, help="Hugging Face dataset revision")
    g.add_argument(*cache_flags, dest="data_cache_dir", default=None, help="token cache directory")
    g.add_argument("--max-data-tokens", type=int, default=None, help="cap on tokens read from the data source")
    g.add_argument("--heldout-fraction", type=float, default=heldout_default,
                   help=f"share of the text held out by content hash (default {heldout_default:g}; 0: none)")
    g.add_argument("--recall-fraction", type=float, default=0.0,
                   help="share of synthetic recall documents mixed in (default 0: the source alone)")


def data_spec_from_args(ns) -> DataSpec:
    """The `DataSpec` of `add_data_arguments` options (an argparse.Namespace or a dict; missing ones: defaults)."""
    ns = ns if isinstance(ns, dict) else vars(ns)
    fields = {"source": "data", "text_field": "text_field", "split": "data_split", "config": "data_config",
              "revision": "data_revision", "cache_dir": "data_cache_dir", "max_tokens": "max_data_tokens",
              "heldout_fraction": "heldout_fraction", "recall_fraction": "recall_fraction"}
    return DataSpec(**{field: ns[key] for field, key in fields.items() if ns.get(key) is not None})
