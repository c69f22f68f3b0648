"""`DataConfig`: where a run's tokens come from, as a small serialisable config.

Jobs that run in other processes (layer-scoring candidates, pipeline stages) receive a `DataConfig` (or its
dict) instead of a dataset object and load the same token cache with `DataConfig.load`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import (
    Config,
    ConfigError,
    Invalid,
    add_flags,
    flag_values,
    integer,
    non_empty_str,
    optional,
    real,
    setting,
)
from .packing import build_token_dataset
from .recall_mix import RecallMix, recall_mix_from_fields
from .sources import DataSourceError


def _recall_tasks(value: Any) -> Any:
    if value is None or isinstance(value, (list, tuple, dict)):
        return value
    raise Invalid("must be a list of task names or a mapping name -> weight")


@dataclass(frozen=True)
class DataConfig(Config):
    """Arguments of `build_token_dataset` that do not depend on the stage (the stage gives seq_len)."""

    error_root = "data"

    source: str = setting("default", check=non_empty_str, flag="--data",
                          help="Hugging Face dataset name, local .txt/.jsonl/.parquet file or folder, or 'default' "
                          "(the embedded corpus)")
    text_field: str = setting("text", check=non_empty_str, help="column/key holding the text in .jsonl/.parquet/hub data")
    split: str = setting("train", check=non_empty_str, flag="--data-split", help="Hugging Face dataset split")
    cache_dir: str | None = setting(None, flag="--data-cache-dir", help="token cache folder")
    max_tokens: int | None = setting(None, check=optional(integer(1)), flag="--max-data-tokens",
                                     help="cap on tokens read from the source")
    # share of the documents held out, by content hash: the same text at every seq_len, stage and seed
    heldout_fraction: float = setting(0.01, check=real(0.0, below=1.0),
                                      help="share of the text held out by content hash (0: none)")
    config: str | None = setting(None, flag="--data-config", help="Hugging Face dataset config name")
    revision: str | None = setting(None, flag="--data-revision", help="Hugging Face dataset revision")
    # synthetic recall documents mixed in (`RecallMix`); 0 = the source alone (the paper's setting)
    recall_fraction: float = setting(0.0, check=lambda v: real(0.0, below=1.0)(0.0 if v is None else v),
                                     help="share of synthetic recall documents mixed in (0: the source alone)")
    recall_tasks: Any = setting(None, check=_recall_tasks, flag=False,
                                help="recall tasks mixed in: a list of names or {name: weight} (default: the shipped "
                                "teacher's pretraining mix)")
    recall_seed: int | None = setting(None, check=optional(integer(0)), flag=False,
                                      help="first generator seed of the recall documents")

    def validate(self) -> None:
        try:
            self.recall_mix()
        except DataSourceError as err:  # RecallMix names the field as data.<field>
            message = str(err)
            field = next((f for f in ("recall_tasks", "recall_fraction") if f"data.{f}" in message), "recall_fraction")
            where = [*self._root(), field]
            reason = message.split(f"data.{field} ", 1)[1] if message.startswith(f"data.{field} ") else message
            raise ConfigError(f"{'.'.join(where)} {reason}", where, reason) from None

    def recall_mix(self) -> RecallMix | None:
        """The `RecallMix` these fields ask for, or None."""
        return recall_mix_from_fields(self.recall_fraction, self.recall_tasks, self.recall_seed)

    @classmethod
    def from_value(cls, value: DataConfig | dict[str, Any] | str | None) -> DataConfig:
        """From a `DataConfig`, a mapping of fields, a bare source string, or None (the defaults)."""
        if isinstance(value, DataConfig):
            return value
        if isinstance(value, str):
            return cls(source=value)
        return cls.from_dict(value)

    def identity(self) -> dict[str, Any]:
        """The fields that decide which tokens come out (all but where the cache lives)."""
        return {k: v for k, v in self.to_dict().items() if k != "cache_dir"}

    def load(self, tokenizer, seq_len: int, seed: int = 0, require_sequences: int | None = None, **options):
        """The packed dataset (`PackedDataset`) of this source at ``seq_len`` (cached on disk).

        ``seed`` is recorded but does not change the held-out split (a property of the documents).
        ``options``: further `build_token_dataset` arguments (e.g. ``heldout_sequences``).
        """
        return build_token_dataset(
            self.source, tokenizer, seq_len, self.cache_dir, text_field=self.text_field, split=self.split,
            max_tokens=self.max_tokens, heldout_fraction=self.heldout_fraction, seed=seed,
            require_sequences=require_sequences, config=self.config, revision=self.revision,
            recall_mix=self.recall_mix(), **options,
        )


DATA_FLAG_PREFIX = "data_"


def add_data_flags(parser, *, title: str = "data", aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """Command-line options for the `DataConfig` fields (read back with `data_config_from_flags`)."""
    add_flags(parser, DataConfig, prefix=DATA_FLAG_PREFIX, title=title, aliases=aliases)


def data_config_from_flags(ns) -> DataConfig:
    """The `DataConfig` of `add_data_flags` options (an argparse.Namespace or a dict; missing ones: defaults)."""
    return DataConfig.from_dict(flag_values(ns, DataConfig, prefix=DATA_FLAG_PREFIX))


__all__ = ["DATA_FLAG_PREFIX", "DataConfig", "add_data_flags", "data_config_from_flags"]
