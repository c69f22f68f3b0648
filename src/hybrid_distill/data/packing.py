"""Tokenize a text source once, pack it into fixed-length sequences, and cache it on disk.

Stream layout: each document becomes ``[BOS] + ids + [EOS]``; documents are concatenated
into one stream and cut into sequences of exactly ``seq_len`` tokens, so a sequence may
start or end mid-document (standard packing; attention is not masked at document
boundaries, the EOS marks them). There are two such streams, packed separately: the
training stream and the held-out stream (below). The final partial sequence of each is
dropped and counted in ``meta.json`` as ``num_tokens_dropped``.

Held-out split (rule ``HELDOUT_RULE``): a property of the text, never of ``seq_len``,
``max_tokens``, the batch size or the seed, so that the same text is held out at every
sequence length, in every stage and in every run over the same source:

* each document is cut into *units*: the document itself, or, when it is longer than
  ``HELDOUT_UNIT_CHARS`` characters, consecutive pieces of at most that many characters, each
  ending after a newline where there is one (a fixed, character-based granularity, so a corpus
  of a few long documents, such as one ``.txt`` file per book, still splits);
* a unit is held out when ``blake2b(its UTF-8 bytes)`` read as a fraction of 2**64 is below
  ``heldout_fraction``; synthetic recall documents (`RecallMix`) are hashed by their generator
  seed instead (their text depends on ``seq_len``). So about ``heldout_fraction`` of the units
  are held out, identical documents always land on the same side, and a smaller fraction holds
  out a subset of what a larger one holds out;
* consecutive units of one document on the same side stay one document (no EOS between them);
  where the side changes, each run of units becomes its own document in its stream;
* fallback for tiny corpora: when ``heldout_fraction > 0`` but none of the source's units read
  is below it, the source units with the lowest hashes are held out instead, as few as make up
  ``heldout_fraction`` of the source's characters read (at least one; recall documents are never
  chosen this way), and the build logs a warning, which names the share held out when it is more
  than ``FALLBACK_MAX_FACTOR`` times ``heldout_fraction``. When that would hold out every unit
  read, the build raises ``DataSourceError`` instead (nothing would be left to train on). This depends
  only on which text was read (the whole source, or its first ``max_tokens`` tokens), not on
  ``seq_len`` (but with a recall mix and ``max_tokens``, how much source text fits does depend on
  ``seq_len``: give such runs enough data that the fallback is not needed).

The held-out sequences follow the training ones (``train_indices`` = ``[0, num_train)``,
``heldout_indices`` a prefix of the held-out stream, of at most ``heldout_sequences`` when
given). ``max_tokens`` caps the tokens read from the (framed) document stream, both parts
together, so the text read does not depend on ``seq_len`` either.

BOS: with ``add_bos="auto"`` a BOS is put before each document exactly when the tokenizer
itself prepends one when encoding with special tokens (Llama/Mistral-style tokenizers do;
GPT-2/Qwen-style ones, with no BOS or BOS == EOS, do not). This keeps the teacher's inputs
in the distribution it was trained on. ``add_bos=True/False`` overrides it. Special-token
strings that occur in the text itself (a literal "</s>") are encoded as plain text, so the
only special tokens in the stream are the inserted BOS/EOS.

Cache: ``<cache_dir>/<name>-<key>/`` is a step (`hybrid_distill.artifacts.Step`) whose settings are
what decides the packed tokens, and ``key`` is its settings key: the format version, the source identity
(paths + sizes + mtimes, the default corpus' content hash, or the Hub name/config/revision), the
tokenizer's content (not its name), ``seq_len``, ``text_field``, ``split``, ``max_tokens``, the BOS/txt
settings and the held-out rule (``HELDOUT_RULE``, ``heldout_fraction``, ``HELDOUT_UNIT_CHARS``).
``heldout_sequences`` and ``seed`` are not part of it: they do not change what is packed (the cap is
applied on load; the seed does not enter the split). The folder holds ``step.json`` (the step record:
the settings and, once built, state ``done`` with a summary of what was packed; it says the cache is
current), ``meta.json`` (the dataset's description, which `PackedDataset` reads), ``tokens-NNNNN.npy``
(training) and ``heldout-NNNNN.npy`` (held-out) shards (2-D ``[sequences, seq_len]``, uint16 when the
vocabulary fits, else uint32, memory-mapped on load). A folder under the key with no finished
``step.json`` of that key, or whose ``meta.json`` or shards disagree with it, is discarded (the reason
is logged) and built again.
A cache is built in a temporary sibling folder (``.tmp-<name>-<key>-<random>``) that its builder holds
a `FolderLock` on, and published with one ``os.replace``, so a crash never leaves a folder that loads.
The kernel releases the lock of a process that dies, so a build folder whose lock can be taken was left
by a dead builder; the next build of the key removes it. Caches of several keys coexist in one
``cache_dir``. Concurrent builders of one key (e.g. every rank) each tokenize; the first to publish wins
and the others load its cache; prefer building on one rank and then loading.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import logging
import numbers
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import (
    STEP_FILE,
    FolderLock,
    FolderLockedError,
    StaleStepError,
    Step,
    describe_changes,
)
from ..config import Invalid, integer, optional, real
from ..fileio import atomic_write_json, fsync_directory
from .loader import FORMAT_VERSION, PackedDataset
from .recall_mix import RecallMix
from .sources import DataSourceError, ResolvedSource, iter_texts, resolve_source

logger = logging.getLogger(__name__)

CACHE_ENV = "HYBRID_DISTILL_CACHE"
# Documents longer than this are tokenized in newline-aligned pieces to bound memory; pieces of
# one document are joined without EOS (the token boundary at a cut may differ slightly from
# tokenizing the whole string at once; decoding is unaffected).
MAX_PIECE_CHARS = 1_000_000
# Characters sent to the tokenizer in one call (besides at most ``docs_per_batch`` pieces): bounds
# the memory of its output whatever the document lengths. With ``max_tokens``, a call also gets no
# more than about _CHARS_PER_TOKEN characters per token still missing (a generous guess; a shortfall
# only means another call).
MAX_BATCH_CHARS = 8_000_000
_CHARS_PER_TOKEN = 8
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens (256 MB as uint16) per shard file
# The held-out split rule (see the module docstring). Changing how units are made or hashed must
# change HELDOUT_RULE: it is part of the cache key, so caches split by another rule are not reused.
HELDOUT_RULE = "unit-blake2b-v1"
HELDOUT_UNIT_CHARS = 8_192  # documents longer than this are split into units of at most this many characters
# A fallback holding out more than this multiple of heldout_fraction of the characters read says so in its warning.
FALLBACK_MAX_FACTOR = 2.0
_HASH_PERSON = b"hd-heldout-v1"
_HASH_SCALE = float(1 << 64)


def default_cache_dir() -> Path:
    """``$HYBRID_DISTILL_CACHE`` or ``~/.cache/hybrid_distill/tokens``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hybrid_distill" / "tokens"


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Name (informational) and content hashes of a Hugging Face tokenizer."""
    vocab = tokenizer.get_vocab()
    vocab_hash = _sha256_json(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        full = json.loads(backend.to_str())
        full.pop("truncation", None)  # call-time settings the wrapper mutates
        full.pop("padding", None)
        content_hash = _sha256_json(full)
    else:
        content_hash = _sha256_json([type(tokenizer).__name__, vocab_hash, tokenizer.all_special_tokens])
    return {
        "name": getattr(tokenizer, "name_or_path", "") or "",
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_hash": vocab_hash,
        "content_hash": content_hash,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def resolve_bos(tokenizer, add_bos: bool | str = "auto") -> int | None:
    """The BOS id to put before each document, or None (see module docstring)."""
    bos = tokenizer.bos_token_id
    if add_bos == "auto":
        if bos is None or bos == tokenizer.eos_token_id:
            return None
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        return bos if ids and ids[0] == bos else None
    if add_bos not in (True, False):
        raise ValueError(f"add_bos must be 'auto', True or False, got {add_bos!r}")
    if add_bos and bos is None:
        raise DataSourceError("add_bos=True but the tokenizer has no bos_token")
    return bos if add_bos else None


def _plain_rust_backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` if calling the wrapper would do nothing else."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and cls.__call__ is PreTrainedTokenizerBase.__call__
        and cls._encode_plus is TokenizersBackend._encode_plus
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
    ):
        return backend
    return None


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added, special-token strings in the text kept literal.

    A document containing e.g. "</s>" as text must not inject a real EOS, hence
    ``split_special_tokens=True``.
    """
    backend = _plain_rust_backend(tokenizer)
    if backend is not None:  # same result as the wrapper, ~1.6x faster (no offsets/BatchEncoding)
        prev = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = prev
    return tokenizer(
        texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
        return_token_type_ids=False, verbose=False,
    )["input_ids"]


def _pieces(docs: Iterable[str], max_chars: int) -> Iterator[tuple[str, bool, bool]]:
    """(text, is_first_piece, is_last_piece) with long documents cut after a newline."""
    for doc in docs:
        start = 0
        while len(doc) - start > max_chars:
            cut = doc.rfind("\n", start, start + max_chars)
            cut = start + max_chars if cut <= start else cut + 1
            yield doc[start:cut], start == 0, False
            start = cut
        yield doc[start:], start == 0, True


def heldout_units(doc: str, unit_chars: int | None = None) -> list[str]:
    """The units ``doc`` is cut into for the held-out split (their concatenation is ``doc``).

    The document itself when it has at most ``unit_chars`` (default ``HELDOUT_UNIT_CHARS``)
    characters, else consecutive pieces of at most that many, each ending after the last newline
    in its window (a hard cut when the window has none).
    """
    unit_chars = HELDOUT_UNIT_CHARS if unit_chars is None else int(unit_chars)
    out, start = [], 0
    while len(doc) - start > unit_chars:
        cut = doc.rfind("\n", start, start + unit_chars)
        cut = start + unit_chars if cut <= start else cut + 1
        out.append(doc[start:cut])
        start = cut
    out.append(doc[start:])
    return out


def heldout_hash(unit: str | int) -> int:
    """The 64-bit hash a unit's side is decided by: of its UTF-8 text, or of a recall document's generator seed.

    A unit is held out when ``heldout_hash(unit) < heldout_fraction * 2**64``.
    """
    data = f"recall-seed:{int(unit)}".encode() if isinstance(unit, int) else unit.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=_HASH_PERSON).digest(), "big")


# (hash, from the source (not a recall document), held out, characters)
_UnitInfo = tuple[int, bool, bool, int]


def _doc_segments(
    doc: str, recall_seed: int | None, fraction: float, unit_chars: int, forced: frozenset[int]
) -> list[tuple[str, bool, list[_UnitInfo]]]:
    """``doc`` as runs of same-side units: ``(text, held_out, [unit info])``; held out: hash below the
    fraction, or in ``forced`` (the fallback)."""
    if fraction <= 0:
        return [(doc, False, [])]
    units = heldout_units(doc, unit_chars) if recall_seed is None else [doc]
    threshold = fraction * _HASH_SCALE
    segments: list[tuple[list[str], bool, list[_UnitInfo]]] = []
    for unit in units:
        h = heldout_hash(unit if recall_seed is None else recall_seed)
        held = h < threshold or h in forced
        info = (h, recall_seed is None, held, len(unit))
        if segments and segments[-1][1] == held:
            segments[-1][0].append(unit)
            segments[-1][2].append(info)
        else:
            segments.append(([unit], held, [info]))
    return [("".join(parts), held, infos) for parts, held, infos in segments]


def _split_pieces(
    docs: Iterable[tuple[str, int | None]], fraction: float, unit_chars: int, forced: frozenset[int], max_chars: int
) -> Iterator[tuple[str, bool, bool, bool, bool, list[tuple[int, _UnitInfo]]]]:
    """``(text, first piece of its segment, last piece, held out, first piece of its document, units starting here)``;
    the units as ``(character offset in the piece, unit info)``.

    Each document is split into same-side segments (`_doc_segments`), and each segment into
    newline-aligned pieces of at most ``max_chars`` for tokenization (`_pieces`).
    """
    for doc, recall_seed in docs:
        doc_first = True
        for text, held, units in _doc_segments(doc, recall_seed, fraction, unit_chars, forced):
            ui, unit_start, pos = 0, 0, 0
            for piece, first, last in _pieces((text,), max_chars):
                end = pos + len(piece)
                new: list[tuple[int, _UnitInfo]] = []
                while ui < len(units) and unit_start < end:
                    new.append((unit_start - pos, units[ui]))
                    unit_start += units[ui][3]
                    ui += 1
                yield piece, first, last, held, doc_first, new
                doc_first, pos = False, end


def _units_reached(tokenizer, text: str, units: list[tuple[int, _UnitInfo]], kept_ids: int) -> int:
    """How many of ``units`` (starting at their character offsets in ``text``) begin within its first
    ``kept_ids`` tokens (``text`` cut by ``max_tokens``); found by encoding prefixes (binary search)."""
    lo, hi = 0, len(units)  # units[:lo] are reached, units[hi:] are not
    while lo < hi:
        mid = (lo + hi) // 2
        offset = units[mid][0]
        if offset == 0 or len(_encode_batch(tokenizer, [text[:offset]])[0]) < kept_ids:
            lo = mid + 1
        else:
            hi = mid
    return lo


class _ShardWriter:
    """Accumulates token arrays and writes full ``[shard_sequences, seq_len]`` shards as .npy files."""

    def __init__(
        self, directory: Path, seq_len: int, dtype: np.dtype, shard_sequences: int, prefix: str = "tokens",
        split: str = "train",
    ):
        self.dir, self.seq_len, self.dtype, self.shard_sequences = directory, seq_len, dtype, shard_sequences
        self.prefix, self.split = prefix, split
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.shards: list[dict[str, Any]] = []
        self.num_sequences = 0

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_len += len(tokens)
        shard_tokens = self.shard_sequences * self.seq_len
        if self.pending_len >= shard_tokens:
            flat = np.concatenate(self.pending)
            n_full = len(flat) // shard_tokens
            for i in range(n_full):
                self._write(flat[i * shard_tokens : (i + 1) * shard_tokens])
            rest = flat[n_full * shard_tokens :]
            self.pending, self.pending_len = [rest], len(rest)

    def finish(self) -> int:
        """Write the remaining full sequences; return the number of dropped tail tokens."""
        flat = np.concatenate(self.pending) if self.pending else np.empty(0, self.dtype)
        n = len(flat) // self.seq_len * self.seq_len
        if n:
            self._write(flat[:n])
        self.pending, self.pending_len = [], 0
        return len(flat) - n

    def _write(self, flat: np.ndarray) -> None:
        arr = flat.reshape(-1, self.seq_len)
        name = f"{self.prefix}-{len(self.shards):05d}.npy"
        with open(self.dir / name, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        self.shards.append({"file": name, "num_sequences": int(arr.shape[0]), "split": self.split})
        self.num_sequences += int(arr.shape[0])

    def discard(self) -> None:
        """Delete the shards written so far (to pack again)."""
        for shard in self.shards:
            (self.dir / shard["file"]).unlink(missing_ok=True)
        self.pending, self.pending_len, self.shards, self.num_sequences = [], 0, [], 0


def _slug(res: ResolvedSource) -> str:
    if res.kind == "default":
        base = res.spec.replace(":", "-").replace(",", "-")
    elif res.kind == "hub":
        base = f"hf-{res.hub_name}" + (f"-{res.hub_config}" if res.hub_config else "")
    else:
        base = Path(res.spec).expanduser().name or "data"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:48] or "data"


# The fields of ``meta.json`` that ``step.json`` records as the build's result (a cache whose meta.json
# disagrees with them is not the one that was built).
_SUMMARY_FIELDS = ("seq_len", "dtype", "num_sequences", "num_train", "num_tokens_read")


def _cache_problem(step: Step) -> str | None:
    """Why ``step.folder`` is not a complete cache of ``step``'s settings (None when it is)."""
    try:
        rec = step.record()
    except StaleStepError:
        return f"its {STEP_FILE} is damaged"
    if rec is None:
        return f"it has no {STEP_FILE}"
    if rec.key != step.key:
        changes = describe_changes(rec.settings, step.settings)
        return f"its {STEP_FILE} records other settings ({'; '.join(changes) or f'key {rec.key}'})"
    if step.finished() is None:
        return f"its {STEP_FILE} records no finished build"
    try:
        meta = json.loads((step.folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable meta.json ({e})"
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        return f"meta.json is not of format version {FORMAT_VERSION}"
    if {k: meta.get(k) for k in _SUMMARY_FIELDS} != rec.result:
        return f"meta.json disagrees with the build recorded in {STEP_FILE}"
    try:
        for shard in meta["shards"]:
            arr = np.load(step.folder / shard["file"], mmap_mode="r")
            if arr.shape != (shard["num_sequences"], meta["seq_len"]) or arr.dtype != np.dtype(meta["dtype"]):
                return f"shard {shard['file']} has shape {arr.shape} / dtype {arr.dtype}, meta disagrees"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"bad shard ({e})"
    return None


def _remove_dead_temps(cache_dir: Path, key: str) -> None:
    """Delete the temporary build folders of ``key`` whose builder died: their lock is free (the kernel releases
    a dead process's lock); a live builder's is held, and its folder kept. A ``cache_dir`` shared by several hosts
    needs a file system whose locks hold across hosts (NFS's do)."""
    for tmp in cache_dir.glob(f".tmp-*-{key}-*"):
        if not tmp.is_dir():
            continue
        try:
            lock = FolderLock(tmp).acquire()
        except (FolderLockedError, OSError):  # a live build (or one that has just been published or removed)
            continue
        try:
            logger.info("removing %s, left by a token-cache build that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            lock.release()


def _locked_build_folder(final: Path) -> tuple[Path, FolderLock]:
    """A new temporary build folder beside ``final``, locked by this process until the build is published."""
    tries = 3
    while True:
        tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
        try:
            return tmp, FolderLock(tmp).acquire()
        except FolderLockedError:
            # another builder's `_remove_dead_temps` took the new folder's lock first (and removes the folder)
            tries -= 1
            if not tries:
                raise


def _setting(value, name: str, check):
    """``value`` as a Python number (YAML strings such as "1e6", numpy ints), or DataSourceError naming ``name``."""
    try:
        return check(value)
    except Invalid as err:
        raise DataSourceError(f"{name} {err}, got {value!r}") from None


def build_token_dataset(
    source: str | os.PathLike,
    tokenizer,
    seq_len: int,
    cache_dir: str | os.PathLike | None = None,
    *,
    text_field: str = "text",
    split: str = "train",
    max_tokens: int | None = None,
    heldout_fraction: float = 0.01,
    heldout_sequences: int | None = None,
    seed: int = 0,
    require_sequences: int | None = None,
    add_bos: bool | str = "auto",
    txt_mode: str = "file",
    config: str | None = None,
    revision: str | None = None,
    rebuild: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    docs_per_batch: int = 256,
    recall_mix: RecallMix | None = None,
) -> PackedDataset:
    """Tokenize ``source`` with ``tokenizer``, pack into ``seq_len``-token sequences, cache, and load.

    Returns the cached dataset without tokenizing when a complete cache with the same key
    exists (``rebuild=True`` forces a rebuild). ``max_tokens`` caps the tokens read (reading
    stops once reached). About ``heldout_fraction`` of the source's text is held out, chosen by
    content hash (see the module docstring): the same text at every ``seq_len`` and ``max_tokens``,
    whatever ``seed`` is (the seed does not enter the split; it is recorded in ``meta.json``).
    ``heldout_sequences=k`` uses only the first ``k`` held-out sequences (fewer, with a warning,
    when there are not that many; the rest are in neither split). Raises ``DataSourceError`` when
    ``heldout_fraction > 0`` but the held-out text fills no sequence or the text read is too small to
    hold out that fraction (see the module docstring), and, with
    ``require_sequences=N``, unless the training split has at least N sequences (e.g. one global
    batch). Source arguments are those of ``iter_texts``. ``recall_mix`` interleaves synthetic
    recall documents (`RecallMix`) into the source's documents.
    """
    if not isinstance(seq_len, numbers.Integral) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    seq_len = int(seq_len)
    # Python numbers from here on (YAML strings such as "1e6", numpy ints): they enter meta.json and the cache key
    max_tokens = _setting(max_tokens, "max_tokens", optional(integer()))
    heldout_fraction = _setting(heldout_fraction, "heldout_fraction", real())
    heldout_sequences = _setting(heldout_sequences, "heldout_sequences", optional(integer()))
    require_sequences = _setting(require_sequences, "require_sequences", optional(integer()))
    if max_tokens is not None and max_tokens < seq_len:
        raise DataSourceError(f"max_tokens={max_tokens} is less than one sequence of seq_len={seq_len}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if heldout_sequences is not None and heldout_sequences < 0:
        raise ValueError(f"heldout_sequences must be >= 0, got {heldout_sequences}")
    if heldout_sequences and heldout_fraction == 0:
        raise ValueError(
            f"heldout_sequences={heldout_sequences} needs heldout_fraction > 0: held-out sequences are packed from "
            f"the held-out documents, and heldout_fraction=0 holds out none"
        )
    if tokenizer.eos_token_id is None:
        raise DataSourceError("the tokenizer has no eos_token; set one (documents are separated by EOS)")
    res = resolve_source(source, config=config, revision=revision)
    bos = resolve_bos(tokenizer, add_bos)
    tok_fp = tokenizer_fingerprint(tokenizer)
    key_fields = {
        "version": FORMAT_VERSION,
        "source": res.fingerprint(),
        "tokenizer": {k: v for k, v in tok_fp.items() if k != "name"},
        "seq_len": seq_len,
        "text_field": text_field,
        "split": split if res.kind == "hub" else None,
        "max_tokens": max_tokens,
        "bos_token_id": bos,
        "txt_mode": txt_mode if res.kind == "files" else None,
        "heldout": {"rule": HELDOUT_RULE, "fraction": heldout_fraction, "unit_chars": HELDOUT_UNIT_CHARS},
    }
    if recall_mix is not None:  # only when set, so caches of plain sources keep their keys
        key_fields["recall_mix"] = recall_mix.fingerprint()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    step = Step(cache_dir / f"{_slug(res)}-{Step.key_of(key_fields)}", key_fields, what="token cache")
    final = step.folder

    problem = "rebuild requested" if rebuild else (_cache_problem(step) if final.exists() else "not cached")
    if problem is None:
        logger.info("loading cached token dataset %s", final)
    else:
        if final.exists():
            logger.warning("discarding token cache %s: %s", final, problem)
            stale = final.with_name(f".stale-{final.name}-{uuid.uuid4().hex[:8]}")
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        _build(res, tokenizer, seq_len, step, tok_fp, bos, text_field=text_field,
               split=split, txt_mode=txt_mode, max_tokens=max_tokens, shard_tokens=shard_tokens,
               docs_per_batch=docs_per_batch, recall_mix=recall_mix, heldout_fraction=heldout_fraction,
               heldout_sequences=heldout_sequences, seed=seed)
    ds = PackedDataset(final, heldout_fraction=heldout_fraction, heldout_sequences=heldout_sequences, seed=seed)
    held = ds.meta["heldout"]
    if heldout_fraction > 0 and heldout_sequences != 0 and len(ds.heldout_indices) == 0:
        raise DataSourceError(
            f"{res.spec!r}: the held-out text (heldout_fraction={heldout_fraction}: {held['units']} of "
            f"{held['units_read']} text units, chosen by content hash; {held['tokens']} tokens) fills no sequence of "
            f"{seq_len} tokens. Use a larger heldout_fraction, more data (max_tokens) or a shorter seq_len, or "
            f"heldout_fraction=0 for no held-out split."
        )
    if heldout_sequences is not None and len(ds.heldout_indices) < heldout_sequences:
        logger.warning(
            "%s: %d held-out sequences of %d tokens were asked for, but the held-out text (heldout_fraction=%g) "
            "fills only %d", res.spec, heldout_sequences, seq_len, heldout_fraction, len(ds.heldout_indices),
        )
    if require_sequences is not None and len(ds.train_indices) < require_sequences:
        # holding out less only helps when the training and held-out parts together would be enough
        smaller_split = ", or a smaller heldout_fraction (0: none)" if (
            held["stream_sequences"] and ds.num_sequences >= require_sequences) else ""
        raise DataSourceError(
            f"{res.spec!r} packs into {len(ds.train_indices)} training sequences of {seq_len} tokens "
            f"({ds.num_sequences} in all, {held['stream_sequences']} held out; {ds.meta['num_tokens_read']} tokens "
            f"read), but {require_sequences} are needed (one global batch). Use more data"
            f"{' (a larger max_tokens)' if max_tokens is not None else ''}, a shorter seq_len, a smaller batch"
            f"{smaller_split}."
        )
    return ds


def _build(
    res: ResolvedSource, tokenizer, seq_len: int, step: Step, tok_fp: dict, bos: int | None, *,
    text_field: str, split: str, txt_mode: str, max_tokens: int | None, shard_tokens: int, docs_per_batch: int,
    heldout_fraction: float, heldout_sequences: int | None, seed: int, recall_mix: RecallMix | None = None,
) -> None:
    """Pack into a temporary build folder, locked while it is written, and publish it as ``step.folder``."""
    final, cache_dir, settings = step.folder, step.folder.parent, step.settings
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(cache_dir, step.key)
    tmp, lock = _locked_build_folder(final)
    try:
        vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1)
        dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
        shard_sequences = max(1, shard_tokens // seq_len)

        def pack(forced: frozenset[int]):
            writers = {
                False: _ShardWriter(tmp, seq_len, dtype, shard_sequences, "tokens", "train"),
                True: _ShardWriter(tmp, seq_len, dtype, shard_sequences, "heldout", "heldout"),
            }
            stats = _tokenize_into(
                writers, res, tokenizer, bos, tokenizer.eos_token_id, max_tokens, dtype, text_field=text_field,
                split=split, txt_mode=txt_mode, docs_per_batch=docs_per_batch, recall_mix=recall_mix,
                heldout_fraction=heldout_fraction, forced=forced,
            )
            dropped = {side: w.finish() for side, w in writers.items()}
            return writers, stats, dropped

        writers, stats, dropped = pack(frozenset())
        fallback: list[int] = []
        if heldout_fraction > 0 and stats["num_heldout_source_units"] == 0 and stats["source_units"]:
            # no source unit read fell below the fraction (tiny corpora): hold out the lowest-hash ones
            units = sorted(stats["source_units"])
            total = sum(chars for _, chars in units)
            quota = heldout_fraction * total
            chars = 0
            for h, n_chars in units:
                fallback.append(h)
                chars += n_chars
                if chars >= quota:
                    break
            everything = len(fallback) == len(units)
            # (with less than one sequence read, the error below says what is wrong)
            if everything and stats["num_tokens_read"] >= seq_len:
                raise _fallback_error(res.spec, heldout_fraction, len(units), total, max_tokens)
            if chars > FALLBACK_MAX_FACTOR * quota:  # small corpora in quick runs: allowed, but said plainly
                logger.warning(
                    "%s: the held-out split holds %.0f%% of the text read, not heldout_fraction=%g: the text is too "
                    "small to hold out less (use more data for a split of the size asked for)", res.spec,
                    100 * chars / total, heldout_fraction,
                )
            for w in writers.values():
                w.discard()
            writers, stats, dropped = pack(frozenset(fallback))
            logger.warning(
                "%s: heldout_fraction=%g selects none of the source's %d text units read; holding out the %d with the "
                "lowest content hash instead (%d held-out tokens in all)", res.spec, heldout_fraction,
                stats["num_source_units"], len(fallback), stats["num_tokens_heldout"],
            )
        train_w, held_w = writers[False], writers[True]
        n_train, n_held = train_w.num_sequences, held_w.num_sequences
        n = n_train + n_held
        if n == 0:
            raise DataSourceError(
                f"{res.spec!r} has only {stats['num_tokens_read']} tokens ({stats['num_documents']} documents), "
                f"fewer than one sequence of seq_len={seq_len} in its training part ({stats['num_tokens_train']} "
                f"tokens) and in its held-out part ({stats['num_tokens_heldout']} tokens); use more data or a "
                f"shorter seq_len"
            )
        stored = n * seq_len
        held_count = n_held if heldout_sequences is None else min(int(heldout_sequences), n_held)
        meta = {
            "version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"spec": res.spec, "kind": res.kind, "fingerprint": settings["source"]},
            "text_field": text_field,
            "split": settings["split"],
            "txt_mode": settings["txt_mode"],
            "recall_mix": settings.get("recall_mix"),
            "tokenizer": tok_fp,
            "bos_token_id": bos,
            "eos_token_id": tokenizer.eos_token_id,
            "seq_len": seq_len,
            "dtype": dtype.name,
            "max_tokens": max_tokens,
            "num_documents": stats["num_documents"],
            "num_tokens_read": stats["num_tokens_read"],
            "num_sequences": n,
            "num_tokens": stored,
            "num_tokens_dropped": stats["num_tokens_read"] - stored,
            "num_tokens_dropped_tail": dropped[False] + dropped[True],
            "shard_sequences": shard_sequences,
            "shards": train_w.shards + held_w.shards,  # training shards first, then held-out ones
            "heldout": {
                "rule": HELDOUT_RULE,
                "fraction": heldout_fraction,
                "unit_chars": HELDOUT_UNIT_CHARS,
                "fallback_units": len(fallback),  # 0: the fraction alone chose the held-out units
                "units_read": stats["num_units"],
                "units": stats["num_heldout_units"],
                "tokens": stats["num_tokens_heldout"],
                "first": n_train,  # held-out sequences are [first, first + stream_sequences)
                "stream_sequences": n_held,
                "sequences": heldout_sequences,
                "seed": seed,
                "count": held_count,
            },
            "num_train": n_train,
            "num_heldout": held_count,
        }
        atomic_write_json(tmp / "meta.json", meta)
        Step(tmp, settings, what=step.what).publish({k: meta[k] for k in _SUMMARY_FIELDS})
        fsync_directory(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if final.exists() and _cache_problem(step) is None:  # another process published first
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
        (final / lock.path.name).unlink(missing_ok=True)  # the lock only guarded the build folder
        fsync_directory(cache_dir)
        logger.info(
            "packed %s: %d documents, %d tokens -> %d training + %d held-out sequences of %d (%d dropped) in %s",
            res.spec, stats["num_documents"], stats["num_tokens_read"], n_train, n_held, seq_len,
            meta["num_tokens_dropped"], final,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # while still locked, so no other builder takes it for dead
        raise
    finally:
        lock.release()


def _next_batch(pieces: Iterator, carry: list, max_pieces: int, max_chars: int) -> tuple[list, list]:
    """The next pieces to tokenize in one call: ``carry`` and then pieces from ``pieces``, at most ``max_pieces``
    of them and ``max_chars`` characters (but at least one piece); returns ``(batch, new carry)``."""
    batch, chars = [], 0
    for piece in itertools.chain(carry, pieces):
        if batch and (len(batch) >= max_pieces or chars + len(piece[0]) > max_chars):
            return batch, [piece]
        batch.append(piece)
        chars += len(piece[0])
        if len(batch) >= max_pieces or chars >= max_chars:
            break  # full: pull no further piece
    return batch, []


def _fallback_error(spec: str, fraction: float, n_units: int, total: int, max_tokens: int | None) -> DataSourceError:
    """The text read is too small for the fallback to hold out ``fraction`` of it and train on the rest."""
    read = f"the text read from {spec!r} (its first {max_tokens} tokens)" if max_tokens is not None else repr(spec)
    return DataSourceError(
        f"{read} is too small to hold out heldout_fraction={fraction:g} of it: none of its {n_units} text units "
        f"(of at most {HELDOUT_UNIT_CHARS} characters) falls below the fraction by content hash, and holding out "
        f"the lowest-hash one instead would hold out all {total} characters, leaving nothing to train on. Use more "
        f"data{' (a larger max_tokens)' if max_tokens is not None else ''}, or heldout_fraction: 0 for no held-out split."
    )


def _tokenize_into(
    writers: dict[bool, _ShardWriter], res: ResolvedSource, tokenizer, bos: int | None, eos: int,
    limit: int | None, dtype: np.dtype, *, text_field: str, split: str, txt_mode: str, docs_per_batch: int,
    recall_mix: RecallMix | None = None, heldout_fraction: float = 0.0, forced: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    """Tokenize the source into ``writers[False]`` (training) and ``writers[True]`` (held out).

    At most ``limit`` tokens are written (both parts together). Returns counts, and the lowest
    ``(hash, characters)`` of the source units read while none of them was held out
    (``source_units``; empty when the fraction is 0 or one was).
    """
    stats: dict[str, Any] = {
        "num_documents": 0, "num_tokens_read": 0, "num_tokens_train": 0, "num_tokens_heldout": 0,
        "num_units": 0, "num_heldout_units": 0, "num_source_units": 0, "num_heldout_source_units": 0,
        "source_units": [],
    }
    written = 0
    last_log = time.monotonic()
    max_id = np.iinfo(dtype).max
    texts = iter_texts(res, text_field, split, txt_mode=txt_mode)
    seq_len = writers[False].seq_len
    tagged = recall_mix.interleave_tagged(texts, tokenizer, seq_len) if recall_mix is not None else (
        (t, None) for t in texts
    )
    pieces = _split_pieces(tagged, heldout_fraction, HELDOUT_UNIT_CHARS, forced, MAX_PIECE_CHARS)
    carry: list = []  # a piece pulled that did not fit the previous batch
    while limit is None or written < limit:
        max_chars = MAX_BATCH_CHARS if limit is None else min(MAX_BATCH_CHARS, _CHARS_PER_TOKEN * (limit - written))
        batch, carry = _next_batch(pieces, carry, docs_per_batch, max_chars)
        if not batch:
            break
        ids_list = _encode_batch(tokenizer, [p[0] for p in batch])
        parts: dict[bool, list[list[int]]] = {False: [], True: []}
        for (text, first, last, held, doc_first, units), ids in zip(batch, ids_list):
            toks = ([bos] if first and bos is not None else [], ids, [eos] if last else [])
            n_toks = sum(map(len, toks))
            if limit is not None:
                if written >= limit:
                    break
                if written + n_toks > limit:
                    toks = (list(itertools.chain(*toks))[: limit - written],)
                    n_toks = limit - written
                    kept_ids = n_toks - (1 if first and bos is not None else 0)
                    units = units[: _units_reached(tokenizer, text, units, kept_ids)]  # the rest were not read
            written += n_toks
            stats["num_tokens_read"] += n_toks  # counted once kept: max_tokens may cut the batch short
            stats["num_documents"] += doc_first
            parts[held].extend(toks)
            for _, (h, from_source, unit_held, n_chars) in units:
                stats["num_units"] += 1
                stats["num_heldout_units"] += unit_held
                if from_source:
                    stats["num_source_units"] += 1
                    stats["num_heldout_source_units"] += unit_held
                    if stats["num_heldout_source_units"]:  # no fallback needed: forget the candidates
                        stats["source_units"].clear()
                    else:
                        stats["source_units"].append((h, n_chars))
        for held, lists in parts.items():
            arr = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64)
            if not len(arr):
                continue
            if arr.max() > max_id or arr.min() < 0:
                raise ValueError(f"token id {arr.max()} does not fit the cache dtype {dtype}")
            writers[held].add(arr.astype(dtype))
            stats["num_tokens_heldout" if held else "num_tokens_train"] += len(arr)
        if time.monotonic() - last_log > 30:
            last_log = time.monotonic()
            logger.info("tokenized %d documents, %d tokens", stats["num_documents"], stats["num_tokens_read"])
    return stats
