"""Where distillation text comes from: local files, the Hugging Face Hub, or the embedded default corpus.

A *source* is one of

* ``"default"`` (or ``"default:prose"`` / ``"default:code"``): the corpus shipped in
  ``default_corpus/`` (CPython stdlib docs and code, PSF License); works offline. (A local
  folder named "default" must be passed as ``"./default"``.)
* a path to a file or folder of ``.txt``, ``.jsonl``, ``.json`` or ``.parquet`` files
  (``.txt``/``.jsonl``/``.json`` may also be gzipped: ``.jsonl.gz``). Folders are searched
  recursively, following symbolic links, hidden entries skipped (other unsupported files are
  skipped with a warning), files read in sorted path order.
* a Hugging Face dataset name (``"owner/name"``, optionally ``"hf:owner/name"`` to force it),
  used when no such local path exists and the string does not look like a path; loaded with ``datasets.load_dataset(..., streaming=True)``; needs network access.

``.txt`` files are one document per file by default (a text file is usually one coherent
work, and an EOS in the middle of it would teach a false document boundary); pass
``txt_mode="paragraph"`` to split each file at blank lines instead. Whitespace-only
documents are skipped everywhere; other documents are passed through verbatim, except that
lone UTF-16 surrogates from JSON escapes (``"\\ud83d"``) are replaced by U+FFFD.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import socket
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import HybridDistillError
from ..fileio import sha256_file
from ..tasks.haystack import NAMED_HAYSTACKS, TextHaystack

logger = logging.getLogger(__name__)

DEFAULT_CORPUS_DIR = Path(__file__).resolve().parent / "default_corpus"
DEFAULT_CORPUS_FILE = DEFAULT_CORPUS_DIR / "corpus.jsonl.gz"
DEFAULT_KINDS = ("prose", "code")

# suffix (without .gz) -> reader kind
_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
_GZ_OK = {"txt", "jsonl", "json"}
TXT_MODES = ("file", "paragraph")
_SURROGATES = re.compile("[\ud800-\udfff]")
# what a damaged or truncated .gz raises while reading (gzip.BadGzipFile is an OSError)
_READ_ERRORS = (OSError, EOFError, zlib.error)


class DataSourceError(HybridDistillError, ValueError):
    """A data source that cannot be read as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ResolvedSource:
    """A source string resolved to what will be read."""

    kind: str  # "default" | "files" | "hub"
    spec: str  # the source as given
    files: tuple[Path, ...] = ()
    hub_name: str | None = None
    hub_config: str | None = None
    hub_revision: str | None = None
    default_kinds: tuple[str, ...] = DEFAULT_KINDS
    formats: dict[Path, str] = field(default_factory=dict, compare=False, hash=False)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the content, for cache keys (paths + sizes + mtimes for files)."""
        if self.kind == "default":
            return {"kind": "default", "sha256": sha256_file(DEFAULT_CORPUS_FILE), "kinds": list(self.default_kinds)}
        if self.kind == "hub":
            return {"kind": "hub", "name": self.hub_name, "config": self.hub_config, "revision": self.hub_revision}
        entries = []
        for f in self.files:
            st = f.stat()
            entries.append([str(f), st.st_size, st.st_mtime_ns])
        return {"kind": "files", "files": entries}


def _file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None or (gz and fmt not in _GZ_OK):
        return None
    return fmt


def _looks_like_path(s: str) -> bool:
    """Whether a missing ``s`` was meant as a local path (else it is taken as a Hub dataset name)."""
    return (
        s.startswith(("/", "./", "../", "~", "."))
        or s.endswith("/")  # a folder
        or "\\" in s
        or _file_format(Path(s)) is not None
        or s.lower().endswith((".gz", ".csv", ".tsv", ".arrow", ".zst"))
        or s.count("/") > 1  # Hub names are "name" or "owner/name"
    )


def default_corpus_path() -> Path:
    """Path of the embedded default corpus (``corpus.jsonl.gz``)."""
    return DEFAULT_CORPUS_FILE


def resolve_source(
    source: str | os.PathLike, *, config: str | None = None, revision: str | None = None
) -> ResolvedSource:
    """Decide what ``source`` refers to; raises ``FileNotFoundError``/``DataSourceError`` early."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise DataSourceError(f"source must be a non-empty string or path, got {source!r}")
    spec = source
    if source == "default" or source.startswith("default:"):
        kinds = DEFAULT_KINDS if source == "default" else tuple(k for k in source[8:].split(",") if k)
        bad = [k for k in kinds if k not in DEFAULT_KINDS]
        if bad or not kinds:
            raise DataSourceError(
                f"unknown default-corpus kind(s) {bad or kinds!r} in {source!r}; use 'default', "
                f"'default:prose', 'default:code' or 'default:prose,code'"
            )
        if not DEFAULT_CORPUS_FILE.is_file():
            raise FileNotFoundError(
                f"the embedded default corpus is missing ({DEFAULT_CORPUS_FILE}); reinstall the package or "
                f"regenerate it with `python scripts/build_default_corpus.py`"
            )
        return ResolvedSource("default", spec, files=(DEFAULT_CORPUS_FILE,), default_kinds=kinds)
    if source.startswith("hf:"):
        return ResolvedSource("hub", spec, hub_name=source[3:], hub_config=config, hub_revision=revision)

    path = Path(source).expanduser()
    if path.exists():
        return _resolve_local(spec, path)
    if _looks_like_path(source):
        parent = path.parent
        hint = "" if parent.is_dir() else f" (its folder {parent} does not exist either)"
        raise FileNotFoundError(
            f"data source {source!r} not found: no such file or folder{hint}. Pass an existing "
            f".txt/.jsonl/.json/.parquet file or a folder of them, or source='default' for the embedded corpus."
        )
    return ResolvedSource("hub", spec, hub_name=source, hub_config=config, hub_revision=revision)


def _resolve_local(spec: str, path: Path) -> ResolvedSource:
    path = path.resolve()
    if path.is_file():
        fmt = _file_format(path)
        if fmt is None:
            raise DataSourceError(
                f"unsupported file type for {path}: expected one of {sorted(_FORMATS)} (or .txt/.jsonl/.json "
                f"gzipped as .gz)"
            )
        return ResolvedSource("files", spec, files=(path,), formats={path: fmt})
    files, formats, skipped, seen = [], {}, [], set()
    for root, dirs, names in os.walk(path, followlinks=True):  # shards are often linked in from other disks
        real = os.path.realpath(root)
        if real in seen:  # a link loop, or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            f = Path(root) / name
            fmt = _file_format(f)
            if fmt is None:
                skipped.append(f.relative_to(path).as_posix())
            else:
                files.append(f)
                formats[f] = fmt
    if not files:
        seen = f" It contains: {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}." if skipped else (
            " It is empty."
        )
        raise DataSourceError(
            f"folder {path} has no supported data files (.txt, .jsonl, .json, .parquet, optionally .gz).{seen}"
        )
    if skipped:
        logger.warning(
            "%s: skipping %d file(s) of unsupported type (supported: .txt, .jsonl, .json, .parquet, optionally .gz): "
            "%s%s", path, len(skipped), ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "",
        )
    files.sort()
    return ResolvedSource("files", spec, files=tuple(files), formats=formats)


def iter_texts(
    source: str | os.PathLike | ResolvedSource,
    text_field: str = "text",
    split: str = "train",
    *,
    config: str | None = None,
    revision: str | None = None,
    txt_mode: str = "file",
) -> Iterator[str]:
    """Yield the non-empty document strings of ``source`` (see the module docstring).

    ``text_field`` names the column/key holding the text (ignored for ``.txt``); ``split``,
    ``config`` and ``revision`` only apply to Hub datasets. Raises ``DataSourceError`` if the
    source yields no non-empty document at all.
    """
    if txt_mode not in TXT_MODES:
        raise DataSourceError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    res = source if isinstance(source, ResolvedSource) else resolve_source(source, config=config, revision=revision)
    if res.kind == "default":
        docs = _iter_default(res.default_kinds)
    elif res.kind == "hub":
        docs = _iter_hub(res, text_field, split)
    else:
        docs = _iter_files(res, text_field, txt_mode)
    n = 0
    for doc in docs:
        if doc.strip():
            n += 1
            yield doc
    if n == 0:
        raise DataSourceError(f"data source {res.spec!r} contains no non-empty documents (field {text_field!r})")


def _iter_default(kinds: tuple[str, ...]) -> Iterator[str]:
    for rec in _iter_jsonl(DEFAULT_CORPUS_FILE):
        if rec.get("kind") in kinds:
            yield rec["text"]


def _iter_files(res: ResolvedSource, text_field: str, txt_mode: str) -> Iterator[str]:
    for f in res.files:
        fmt = res.formats.get(f) or _file_format(f)
        if fmt == "txt":
            text = _read_text(f)
            if txt_mode == "file":
                yield text
            else:
                yield from re.split(r"\n(?:[ \t\r\f\v]*\n)+", text)
        elif fmt == "jsonl":
            records = ((f"line {lineno}", rec) for lineno, rec in enumerate(_iter_jsonl(f), 1))
            yield from _json_texts(records, text_field, f)
        elif fmt == "json":
            yield from _json_texts(((f"record {i}", rec) for i, rec in enumerate(_iter_json(f))), text_field, f)
        elif fmt == "parquet":
            yield from _iter_parquet(f, text_field)


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _decode(data: bytes, path: Path, where: str = "") -> str:
    try:
        return data.decode("utf-8-sig" if not where or where == "line 1" else "utf-8")
    except UnicodeDecodeError as e:
        raise DataSourceError(
            f"{path}{' ' + where if where else ''}: bytes at offset {e.start} are not valid UTF-8 ({e.reason}). "
            f"Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def _read_text(path: Path) -> str:
    try:
        with _open_bytes(path) as f:
            data = f.read()
    except _READ_ERRORS as e:
        raise _read_error(path, e) from None
    return _decode(data, path)


def _read_error(path: Path, e: BaseException) -> DataSourceError:
    damaged = isinstance(e, (zlib.error, EOFError, gzip.BadGzipFile))
    hint = " (the compressed data is damaged or truncated: re-create or re-download the file)" if damaged else ""
    return DataSourceError(f"cannot read {path}: {e}{hint}")


def _iter_jsonl(path: Path) -> Iterator[dict]:
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, f"line {lineno}").strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataSourceError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise DataSourceError(
                        f"{path} line {lineno}: expected a JSON object per line, got {type(rec).__name__}"
                    )
                yield rec
    except _READ_ERRORS as e:
        raise _read_error(path, e) from None


def _iter_json(path: Path) -> Iterator[dict]:
    text = _read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            yield from _iter_jsonl(path)
            return
        raise DataSourceError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            obj = lists[0]  # {"data": [{...}, ...]}
        else:
            obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataSourceError(f"{path}: expected a JSON list of objects (records), or JSON lines")
    yield from obj


def _json_texts(records: Iterator[tuple[str, dict]], text_field: str, path: Path) -> Iterator[str]:
    """The ``text_field`` strings of ``(where, record)`` pairs of one JSON file.

    JSON escapes can encode lone UTF-16 surrogates ("\\ud83d", half of a split emoji pair), which
    are no text a tokenizer accepts; they are replaced by U+FFFD, with one warning per file.
    """
    warned = False
    for where, rec in records:
        for text in _field(rec, text_field, path, where):
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    text = _SURROGATES.sub("\ufffd", text)
                    if not warned:
                        warned = True
                        logger.warning(
                            "%s %s: lone UTF-16 surrogate escapes (e.g. \\ud83d) replaced by U+FFFD (later ones in "
                            "this file are replaced without a warning)", path, where,
                        )
            yield text


def _field(rec: dict, text_field: str, path: Path, where: str) -> Iterator[str]:
    if text_field not in rec:
        raise DataSourceError(
            f"{path} {where}: no field {text_field!r}; available fields: {sorted(rec)}. "
            f"Pass one of these as the text field (--text-field, or data.text_field in a run config)."
        )
    value = rec[text_field]
    if value is None:
        return
    if not isinstance(value, str):
        raise DataSourceError(f"{path} {where}: field {text_field!r} is {type(value).__name__}, expected a string")
    yield value


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for non-parquet input
        raise DataSourceError(f"cannot read {path} as parquet: {e}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataSourceError(
            f"{path}: no column {text_field!r}; available fields: {sorted(names)}. Pass one of these as the text field (--text-field, or data.text_field in a run config)."
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataSourceError(f"{path}: column {text_field!r} holds {type(value).__name__}, expected strings")
            yield value


def _hub_reachable() -> bool:
    """Cheap DNS check so an offline machine fails in milliseconds rather than after HTTP retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes"):
        return True  # the user asked for the local HF cache; let datasets try it
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _offline_error(res: ResolvedSource, split: str, cause: BaseException | None) -> DataSourceError:
    what = f"{res.hub_name!r}" + (f" (config {res.hub_config!r})" if res.hub_config else "") + f", split {split!r}"
    because = f": {type(cause).__name__}: {cause}" if cause else ": the Hub cannot be reached"
    return DataSourceError(
        f"could not load Hugging Face dataset {what}{because}\n"
        f"It is not a local path either. This machine seems offline (or the dataset name is wrong). "
        f"Pass a local .txt/.jsonl/.json/.parquet file or folder, or source='default' for the embedded "
        f"offline corpus; if the dataset is in your local HF cache, set HF_HUB_OFFLINE=1."
    )


def _iter_hub(res: ResolvedSource, text_field: str, split: str) -> Iterator[str]:
    if not _hub_reachable():
        raise _offline_error(res, split, None)
    import datasets

    try:
        ds = datasets.load_dataset(
            res.hub_name, res.hub_config, split=split, streaming=True, revision=res.hub_revision
        )
    except Exception as e:
        raise _offline_error(res, split, e) from e
    features = getattr(ds, "features", None)
    if features is not None and text_field not in features:
        raise DataSourceError(
            f"dataset {res.hub_name!r}: no field {text_field!r}; available fields: {sorted(features)}. "
            f"Pass one of these as the text field (--text-field, or data.text_field in a run config)."
        )
    where = f"dataset {res.hub_name!r} split {split!r}"
    for i, rec in enumerate(ds):
        yield from _field(rec, text_field, where, f"record {i}")  # type: ignore[arg-type]


@lru_cache(maxsize=8)
def _corpus_haystack(spec: str) -> TextHaystack:
    if not (spec == "default" or spec.startswith("default:")) and not Path(spec).expanduser().exists():
        raise FileNotFoundError(f"haystack corpus {spec!r} not found (pass a local file/folder or 'default:prose')")
    return TextHaystack(iter_texts(spec), name=f"corpus:{spec}")


def read_haystack(spec: Any) -> Any:
    """A recall-task haystack spec with a corpus read: ``"default[:prose|code]"`` or a local file/folder
    (read by `iter_texts`) -> a `hybrid_distill.tasks.TextHaystack` of its sentences (cached per spec).
    Every other spec (``None``, a name of ``NAMED_HAYSTACKS`` such as ``"noise"`` or ``"prose"``, a list of
    strings, a `Haystack`) is returned as it is, for `hybrid_distill.tasks.resolve_haystack`."""
    if isinstance(spec, (str, os.PathLike)) and os.fspath(spec) not in NAMED_HAYSTACKS:
        return _corpus_haystack(os.fspath(spec))
    return spec
