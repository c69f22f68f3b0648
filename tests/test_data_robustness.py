"""Data pipeline robustness: tokenizer batch sizes, held-out fallback limits, odd inputs (surrogates, YAML
numbers, symlinked folders, damaged gzip) and meta.json counts under max_tokens."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from hybrid_distill.config import ConfigError
from hybrid_distill.data import DataSourceError, DataConfig, build_token_dataset, iter_texts, packing, resolve_source
from hybrid_distill.tokenization import tiny_tokenizer

WORDS = "the sky is blue and the grass is green here we go again what a special magic number".split()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_docs(n: int, seed: int = 0, words: tuple[int, int] = (5, 30)) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(*words))) + f" {i}." for i in range(n)]


def write_jsonl(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def spy_encode(monkeypatch) -> list[list[str]]:
    """Record the texts of every tokenizer call of the packer."""
    calls: list[list[str]] = []
    real = packing._encode_batch
    monkeypatch.setattr(packing, "_encode_batch", lambda t, texts: calls.append(list(texts)) or real(t, texts))
    return calls


# ----------------------------------------------------------------------------- tokenizer batches


def test_tokenizer_batches_are_capped_by_characters(tmp_path, tok, monkeypatch):
    """Long documents: a tokenizer call gets at most MAX_BATCH_CHARS characters, not docs_per_batch whole pieces."""
    monkeypatch.setattr(packing, "MAX_PIECE_CHARS", 300)
    monkeypatch.setattr(packing, "MAX_BATCH_CHARS", 1000)
    docs = ["\n".join(make_docs(40, seed=i)) for i in range(6)]  # ~4-5k characters each
    src = write_jsonl(tmp_path / "long.jsonl", docs)
    calls = spy_encode(monkeypatch)
    ds = build_token_dataset(src, tok, 16, tmp_path / "c", heldout_fraction=0.0)
    sizes = [sum(map(len, texts)) for texts in calls]
    assert max(sizes) <= 1000 and len(calls) > 20 and "".join(t for texts in calls for t in texts) == "".join(docs)
    # the same tokens as tokenizing each piece on its own
    calls.clear()
    one = build_token_dataset(src, tok, 16, tmp_path / "c1", heldout_fraction=0.0, docs_per_batch=1)
    assert np.array_equal(ds.get_batch(range(len(ds))), one.get_batch(range(len(one))))
    assert ds.meta["num_documents"] == one.meta["num_documents"] == 6


def test_max_tokens_stops_pulling_pieces(tmp_path, tok, monkeypatch):
    """With max_tokens, the packer tokenizes about what it needs, not a whole batch of long documents."""
    monkeypatch.setattr(packing, "MAX_PIECE_CHARS", 300)
    docs = ["\n".join(make_docs(40, seed=i)) for i in range(20)]
    src = write_jsonl(tmp_path / "long.jsonl", docs)
    calls = spy_encode(monkeypatch)
    ds = build_token_dataset(src, tok, 16, tmp_path / "c", heldout_fraction=0.0, max_tokens=64)
    tokenized = sum(len(t) for texts in calls for t in texts)
    assert tokenized <= packing._CHARS_PER_TOKEN * 64 + 300  # the budget, plus at most one piece beyond it
    assert len(ds) == 4 and ds.meta["num_tokens"] == 64


# ----------------------------------------------------------------------------- meta counts


def test_meta_counts_only_what_max_tokens_kept(tmp_path, tok):
    docs = make_docs(100, seed=3)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    stream = []
    for d in docs:
        stream += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for dpb in (1, 256):
        ds = build_token_dataset(src, tok, 16, tmp_path / f"c{dpb}", heldout_fraction=0.0, max_tokens=200,
                                 docs_per_batch=dpb)
        m = ds.meta
        assert m["num_tokens_read"] == 200 and m["num_tokens"] == 192 and m["num_tokens_dropped"] == 8
        assert m["num_documents"] == stream[:200].count(tok.bos_token_id) < 20


# ----------------------------------------------------------------------------- held-out fallback


def test_fallback_never_holds_out_everything(tmp_path, tok, caplog):
    """One short document: holding out "at least one unit" would hold out the whole corpus."""
    src = tmp_path / "notes.txt"
    src.write_text(" ".join(f"the sky is blue {i}" for i in range(400)))
    with pytest.raises(DataSourceError, match=r"too small to hold out heldout_fraction=0\.01.*nothing to train on.*"
                                              r"heldout_fraction: 0"):
        build_token_dataset(src, tok, 32, tmp_path / "c", heldout_fraction=0.01)
    ds = build_token_dataset(src, tok, 32, tmp_path / "c", heldout_fraction=0.0, require_sequences=4)
    assert len(ds.train_indices) == len(ds) > 4


def test_fallback_names_a_held_out_share_far_above_the_fraction(tmp_path, tok, monkeypatch, caplog):
    """A book cut by max_tokens into few units: the fallback's share is far above the fraction asked for; the build
    goes on (quick runs on small data) but says how much it held out."""
    monkeypatch.setattr(packing, "HELDOUT_UNIT_CHARS", 400)
    lines = [f"line {i}: the sky is blue and the grass is green here we go again" for i in range(3000)]
    (tmp_path / "book.txt").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.data.packing"):
        ds = build_token_dataset(tmp_path / "book.txt", tok, 64, tmp_path / "c", max_tokens=3000, heldout_fraction=0.01)
    share = float(re.search(r"holds (\d+)% of the text read, not heldout_fraction=0\.01", caplog.text).group(1)) / 100
    held = ds.meta["heldout"]
    assert held["fallback_units"] >= 1 and share > 2 * 0.01 and len(ds.train_indices) > 0
    assert held["tokens"] == pytest.approx(share * ds.meta["num_tokens_read"], rel=0.2)  # tokens ~ characters here


# ----------------------------------------------------------------------------- sources


def test_lone_surrogate_escapes_are_replaced_with_one_warning(tmp_path, tok, caplog):
    lines = [json.dumps({"text": f"the sky is blue number {i} " * 5}) for i in range(100)]
    lines[10] = '{"text": "broken emoji \\ud83d here"}'  # half of a surrogate pair, as JSON escapes it
    lines[50] = '{"text": "another \\ude00 one"}'
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n")
    (tmp_path / "c.json").write_text('[{"text": "a \\ud800 b"}]')
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.data.sources"):
        texts = list(iter_texts(src))
    assert texts[10] == "broken emoji \ufffd here" and texts[50] == "another \ufffd one" and len(texts) == 100
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "c.jsonl line 11" in warnings[0] and "surrogate" in warnings[0]
    assert list(iter_texts(tmp_path / "c.json")) == ["a \ufffd b"]
    ds = build_token_dataset(src, tok, 32, tmp_path / "cache", heldout_fraction=0.0)
    assert ds.meta["num_documents"] == 100


def test_corrupt_gzip_names_the_file(tmp_path):
    data = "".join(json.dumps({"text": f"document number {i} " * 5}) + "\n" for i in range(300)).encode()
    for name in ("c.jsonl.gz", "c.txt.gz", "c.json.gz"):
        gz = bytearray(gzip.compress(data, mtime=0))
        gz[100:108] = b"\xff" * 8  # a damaged deflate stream: zlib.error, not gzip's own errors
        path = tmp_path / name
        path.write_bytes(bytes(gz))
        with pytest.raises(DataSourceError, match=rf"cannot read .*{re.escape(name)}: .*damaged or truncated"):
            list(iter_texts(path))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(data, mtime=0)[:-40])  # truncated: EOFError
    with pytest.raises(DataSourceError, match=r"cut\.jsonl\.gz.*damaged or truncated"):
        list(iter_texts(tmp_path / "cut.jsonl.gz"))


def test_symlinked_folders_are_followed_and_skipped_files_logged(tmp_path, caplog):
    data, shards = tmp_path / "data", tmp_path / "elsewhere" / "shards"
    data.mkdir()
    shards.mkdir(parents=True)
    write_jsonl(data / "a.jsonl", ["a"])
    for i in range(3):
        write_jsonl(shards / f"b{i}.jsonl", [f"b{i}"])
    os.symlink(shards, data / "shards")
    os.symlink(data, shards / "loop")  # a link back up: must not recurse forever
    for i in range(7):
        (data / f"train-{i}.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    (data / ".hidden.csv").write_text("x")
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.data.sources"):
        res = resolve_source(data)
    assert [f.relative_to(data).as_posix() for f in res.files] == ["a.jsonl", *(f"shards/b{i}.jsonl" for i in range(3))]
    assert list(iter_texts(res)) == ["a", "b0", "b1", "b2"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipping 7 file(s)" in warnings[0] and "train-0.jsonl.zst" in warnings[0]
    assert "..." in warnings[0] and "hidden" not in warnings[0]


# ----------------------------------------------------------------------------- numeric settings


def test_numeric_settings_from_yaml_and_numpy(tmp_path, tok):
    cfg = yaml.safe_load("source: default\nheldout_fraction: 1e-2\nmax_tokens: 1e6\nrecall_fraction: 0\n")
    assert cfg["heldout_fraction"] == "1e-2" and cfg["max_tokens"] == "1e6"  # YAML 1.1: strings
    spec = DataConfig.from_value(cfg)
    assert spec.heldout_fraction == 0.01 and type(spec.heldout_fraction) is float
    assert spec.max_tokens == 1_000_000 and type(spec.max_tokens) is int
    for value in (20000.0, np.int64(20000), "20000", "2e4"):
        assert type(DataConfig(max_tokens=value).max_tokens) is int
    json.dumps(DataConfig(max_tokens=np.int64(5), heldout_fraction=np.float32(0.5)).to_dict())
    for field, value in (("max_tokens", "lots"), ("max_tokens", 1500.5), ("max_tokens", "1.5e3x"),
                         ("heldout_fraction", "some"), ("recall_fraction", "x")):
        with pytest.raises(ConfigError, match=rf"data\.{field} must be"):
            DataConfig(**{field: value})

    src = write_jsonl(tmp_path / "c.jsonl", make_docs(300, seed=5))
    ds = build_token_dataset(src, tok, 16, tmp_path / "c", max_tokens=np.int64(3000), heldout_fraction="0.2",
                             heldout_sequences=np.int64(2), require_sequences=np.int64(4))
    assert ds.meta["max_tokens"] == 3000 and ds.meta["heldout"]["fraction"] == 0.2 and len(ds.heldout_indices) == 2
    same = DataConfig(source=str(src), max_tokens=3000.0, heldout_fraction="2e-1", cache_dir=str(tmp_path / "c")).load(tok, 16)
    assert same.path == ds.path
    with pytest.raises(DataSourceError, match="max_tokens must be an integer"):
        build_token_dataset(src, tok, 16, tmp_path / "c", max_tokens=3000.5)
