"""Tests for the distillation data pipeline: sources, packing + cache, loader order."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid_distill.artifacts import LOCK_FILE, STEP_FILE, Step, StepRecord
from hybrid_distill.data import (
    DataSourceError,
    PackedDataset,
    TokenBatchSampler,
    build_token_dataset,
    iter_texts,
    split_indices,
)
from hybrid_distill.data import packing, sources
from hybrid_distill.tokenization import tiny_tokenizer

WORDS = "the sky is blue and the grass is green here we go again what a special magic number".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 40))) + f" {i}." for i in range(n)]


def write_jsonl(path: Path, docs, field: str = "text", extra: bool = True) -> Path:
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            rec = {field: d, "id": i} if extra else {field: d}
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def docs():
    return make_docs(60)


@pytest.fixture
def corpus(tmp_path, docs):
    return write_jsonl(tmp_path / "corpus.jsonl", docs)


def expected_stream(tok, docs) -> list[int]:
    out = []
    for d in docs:
        out += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def all_tokens(ds: PackedDataset) -> list[int]:
    return ds.get_batch(range(len(ds))).flatten().tolist()


# ----------------------------------------------------------------------------- sources


def test_sources_formats(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first para\nline two\n\n  \nsecond para\n")
    write_jsonl(d / "b.jsonl", docs[:3])
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": docs[3]}) + "\n")
    (d / "d.json").write_text(json.dumps([{"text": docs[4]}, {"text": None}, {"text": "   "}]))
    pq.write_table(pa.table({"text": docs[5:7], "n": [1, 2]}), d / "sub" / "e.parquet")
    (d / "notes.md").write_text("ignored")
    (d / ".hidden.txt").write_text("ignored")

    got = list(iter_texts(d))
    assert got == ["first para\nline two\n\n  \nsecond para\n", *docs[:5], *docs[5:7]]
    assert list(iter_texts(d / "a.txt", txt_mode="paragraph")) == ["first para\nline two", "second para\n"]
    (tmp_path / "lines.json").write_text('{"text": "x"}\n{"text": "y"}\n')
    assert list(iter_texts(tmp_path / "lines.json")) == ["x", "y"]
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"body": "z"}], "version": 1}))
    assert list(iter_texts(tmp_path / "wrapped.json", text_field="body")) == ["z"]


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        list(iter_texts(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="not found"):
        list(iter_texts("./no/such/dir"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'mydata/' not found"):  # a folder, not a Hub dataset name
        list(iter_texts("mydata/"))

    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "x.csv").write_text("a,b\n")
    with pytest.raises(DataSourceError, match=r"no supported data files.*x\.csv"):
        list(iter_texts(tmp_path / "empty_dir"))

    f = write_jsonl(tmp_path / "f.jsonl", ["hello"], field="content")
    with pytest.raises(DataSourceError, match=r"no field 'text'.*available fields: \['content', 'id'\]"):
        list(iter_texts(f))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"], "lang": ["en"]}), tmp_path / "p.parquet")
    with pytest.raises(DataSourceError, match=r"available fields: \['body', 'lang'\]"):
        list(iter_texts(tmp_path / "p.parquet"))

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataSourceError, match="no non-empty documents"):
        list(iter_texts(tmp_path / "empty.jsonl"))
    write_jsonl(tmp_path / "blank.jsonl", ["", "  \n"])
    with pytest.raises(DataSourceError, match="no non-empty documents"):
        list(iter_texts(tmp_path / "blank.jsonl"))

    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"latin1\.txt.*not valid UTF-8"):
        list(iter_texts(tmp_path / "latin1.txt"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataSourceError, match=r"bad\.jsonl line 2.*not valid UTF-8"):
        list(iter_texts(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataSourceError, match=r"broken\.jsonl line 2: invalid JSON"):
        list(iter_texts(tmp_path / "broken.jsonl"))


def test_hub_offline_error(monkeypatch):
    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    with pytest.raises(DataSourceError, match=r"(?s)seems offline.*source='default'"):
        list(iter_texts("someone/some-dataset"))

    import datasets

    def fail(*a, **k):
        raise ConnectionError("Couldn't reach 'x' on the Hub")

    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataSourceError, match=r"(?s)ConnectionError.*seems offline.*local"):
        list(iter_texts("hf:wikitext", config="wikitext-2-raw-v1"))


def test_hub_source_reads_field(monkeypatch):
    import datasets

    class FakeStream:
        features = {"text": None, "meta": None}

        def __iter__(self):
            return iter([{"text": "a doc", "meta": 1}, {"text": "another", "meta": 2}])

    calls = []
    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or FakeStream())
    assert list(iter_texts("owner/name", split="validation")) == ["a doc", "another"]
    assert calls[0][0] == ("owner/name", None) and calls[0][1]["split"] == "validation"
    with pytest.raises(DataSourceError, match=r"available fields: \['meta', 'text'\]"):
        list(iter_texts("owner/name", text_field="content"))


# ----------------------------------------------------------------------------- packing


def test_packing_stream(tmp_path, tok, docs, corpus):
    ds = build_token_dataset(corpus, tok, seq_len=16, cache_dir=tmp_path / "cache", heldout_fraction=0.0)
    stream = expected_stream(tok, docs)
    n = len(stream) // 16
    assert len(ds) == n and ds.meta["num_sequences"] == n
    assert all(ds[i].shape == (16,) and ds[i].dtype == torch.long for i in range(n))
    assert all_tokens(ds) == stream[: n * 16]
    m = ds.meta
    assert m["num_tokens_read"] == len(stream) and m["num_tokens"] == n * 16
    assert m["num_tokens_dropped"] == len(stream) - n * 16 < 16
    assert m["num_documents"] == len(docs) and m["dtype"] == "uint16"
    assert m["tokenizer"]["vocab_hash"] and m["seq_len"] == 16
    # decoding the packed stream gives the documents, each framed by BOS ... EOS
    text = tok.decode(all_tokens(ds))
    framed = "".join(f"<s>{d}</s>" for d in docs)
    assert framed.startswith(text) and len(framed) - len(text) < 200
    assert all_tokens(ds).count(tok.eos_token_id) == stream[: n * 16].count(tok.eos_token_id)


def test_packing_max_tokens_and_bos_off(tmp_path, tok, corpus, docs):
    ds = build_token_dataset(corpus, tok, 16, tmp_path / "c", max_tokens=100, heldout_fraction=0.0, add_bos=False)
    assert len(ds) == 6 and ds.num_tokens == 96
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert all_tokens(ds) == stream[:96]
    assert ds.meta["num_tokens_read"] - 96 == ds.meta["num_tokens_dropped"]
    assert tok.bos_token_id not in all_tokens(ds)


def test_special_token_text_and_long_documents(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(packing, "MAX_PIECE_CHARS", 50)
    pieces = []
    real = packing._encode_batch
    monkeypatch.setattr(packing, "_encode_batch", lambda t, texts: pieces.extend(texts) or real(t, texts))
    long_doc = "\n".join(make_docs(30, seed=3))
    docs = ["a literal </s> and <s> in text", long_doc, "short tail doc " * 20]
    f = write_jsonl(tmp_path / "x.jsonl", docs)
    ds = build_token_dataset(f, tok, 8, tmp_path / "c", heldout_fraction=0.0)
    assert len(pieces) > 10 and "".join(pieces) == "".join(docs)  # the long document was cut into pieces
    toks = all_tokens(ds)
    # only the inserted BOS/EOS are special tokens; the last EOS may fall into the dropped tail
    assert toks.count(tok.eos_token_id) == 2 + (ds.meta["num_tokens_dropped"] == 0)
    assert toks.count(tok.bos_token_id) == 3
    assert "".join(f"<s>{d}</s>" for d in docs).startswith(tok.decode(toks))
    assert ds.meta["num_documents"] == 3


def test_cache_hit_does_not_retokenize(tmp_path, tok, corpus, monkeypatch):
    calls = []
    real = packing._encode_batch
    monkeypatch.setattr(packing, "_encode_batch", lambda t, texts: calls.append(len(texts)) or real(t, texts))
    ds1 = build_token_dataset(corpus, tok, 16, tmp_path / "c")
    assert calls
    calls.clear()
    ds2 = build_token_dataset(corpus, tok, 16, tmp_path / "c")
    assert calls == []
    assert ds2.path == ds1.path and all_tokens(ds1) == all_tokens(ds2)
    assert np.array_equal(ds1.heldout_indices, ds2.heldout_indices)
    # another seed or held-out cap reuses the tokens: neither changes which documents are held out
    ds3 = build_token_dataset(corpus, tok, 16, tmp_path / "c", heldout_sequences=1, seed=5)
    assert calls == [] and ds3.path == ds1.path and ds3.heldout_indices.tolist() == ds1.heldout_indices[:1].tolist()
    # another held-out fraction packs other documents apart: a cache of its own
    ds4 = build_token_dataset(corpus, tok, 16, tmp_path / "c", heldout_fraction=0.2)
    assert calls and ds4.path != ds1.path
    calls.clear()
    build_token_dataset(corpus, tok, 16, tmp_path / "c", rebuild=True)
    assert calls


def test_cache_key_changes(tmp_path, tok, corpus, docs):
    cache = tmp_path / "c"
    base = build_token_dataset(corpus, tok, 16, cache).path
    assert build_token_dataset(corpus, tok, 32, cache).path != base
    assert build_token_dataset(corpus, tiny_tokenizer(300), 16, cache).path != base
    assert build_token_dataset(corpus, tok, 16, cache, max_tokens=64).path != base
    other = write_jsonl(tmp_path / "other.jsonl", docs, field="body")
    assert build_token_dataset(other, tok, 16, cache, text_field="body").path != base
    write_jsonl(corpus, docs[:-1])  # same path, new content
    changed = build_token_dataset(corpus, tok, 16, cache)
    assert changed.path != base and changed.meta["num_documents"] == len(docs) - 1
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 6


def _visible(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if not p.name.startswith(".")] if d.exists() else []


def test_crash_mid_write_leaves_no_cache(tmp_path, tok, corpus, monkeypatch):
    cache = tmp_path / "c"
    real_write = packing._ShardWriter._write

    def crash_on_second(self, flat):
        if self.shards:
            raise RuntimeError("simulated crash")
        real_write(self, flat)

    monkeypatch.setattr(packing._ShardWriter, "_write", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_token_dataset(corpus, tok, 16, cache, shard_tokens=32)
    assert _visible(cache) == [] and list(cache.iterdir()) == []  # temp dir cleaned up too
    monkeypatch.setattr(packing._ShardWriter, "_write", real_write)
    ds = build_token_dataset(corpus, tok, 16, cache, shard_tokens=32)
    assert len(ds.meta["shards"]) > 2 and all_tokens(ds) == all_tokens(build_token_dataset(corpus, tok, 16, cache))


def test_cache_is_a_step_recording_its_settings_and_build(tmp_path, tok, corpus):
    ds = build_token_dataset(corpus, tok, 16, tmp_path / "c", shard_tokens=64)
    rec = StepRecord.read(ds.path)
    assert rec is not None and rec.state == "done" and ds.path.name.endswith(f"-{rec.key}")
    assert Step(ds.path, rec.settings).key == rec.key and rec.settings["seq_len"] == 16
    assert rec.settings["version"] == ds.meta["version"] == packing.FORMAT_VERSION
    assert rec.result == {k: ds.meta[k] for k in ("seq_len", "dtype", "num_sequences", "num_train", "num_tokens_read")}
    assert "key" not in ds.meta and "complete" not in ds.meta  # step.json is the record of currency
    # the cache holds its record, its description and its shards, nothing of the build (no lock, no temp)
    assert sorted(p.name for p in ds.path.iterdir()) == sorted([STEP_FILE, "meta.json", *(s["file"] for s in ds.meta["shards"])])
    assert list((tmp_path / "c").iterdir()) == [ds.path]


def test_killed_build_is_removed_and_a_live_one_kept(tmp_path, tok, corpus, lock_holder):
    cache = tmp_path / "c"
    script = textwrap.dedent(f"""
        import os
        from hybrid_distill.data import packing, build_token_dataset
        from hybrid_distill.tokenization import tiny_tokenizer
        real = packing._ShardWriter._write
        def write_then_die(self, flat):
            real(self, flat)
            if len(self.shards) == 2:
                os._exit(9)  # like SIGKILL: no cleanup runs
        packing._ShardWriter._write = write_then_die
        build_token_dataset({str(corpus)!r}, tiny_tokenizer(), 16, {str(cache)!r}, shard_tokens=32)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 9, proc.stderr
    [dead] = list(cache.iterdir())
    assert _visible(cache) == [] and dead.name.startswith(".tmp-")
    assert (dead / LOCK_FILE).is_file() and not (dead / "meta.json").exists() and not (dead / STEP_FILE).exists()
    # a build folder of the same key whose lock a live process holds (a builder still at work)
    live = dead.with_name(dead.name[: -len("-xxxxxxxx")] + "-12345678")
    lock_holder(live)
    (live / "tokens-00000.npy").write_bytes(b"being written")
    ds = build_token_dataset(corpus, tok, 16, cache, shard_tokens=32)  # removes the dead build, keeps the live one
    assert sorted(cache.iterdir()) == sorted([ds.path, live]) and (live / "tokens-00000.npy").read_bytes() == b"being written"
    assert all_tokens(ds)[:16] == ds[0].tolist() and StepRecord.read(ds.path).state == "done"


def test_a_live_build_is_kept_until_its_builder_dies(tmp_path, tok, corpus, lock_holder):
    cache = tmp_path / "c"
    ds = build_token_dataset(corpus, tok, 16, cache)
    live = cache / f".tmp-{ds.path.name}-12345678"
    holder = lock_holder(live)
    build_token_dataset(corpus, tok, 16, cache, rebuild=True)
    assert live.is_dir()
    holder.stdin.close()
    holder.wait(timeout=60)  # the builder dies: the kernel releases its lock
    build_token_dataset(corpus, tok, 16, cache, rebuild=True)
    assert not live.exists() and list(cache.iterdir()) == [ds.path]


def _drop_step_record(path: Path) -> None:
    (path / STEP_FILE).unlink()


def _damage_step_record(path: Path) -> None:
    (path / STEP_FILE).write_text('{"key": ')


def _unfinished_step_record(path: Path) -> None:
    rec = json.loads((path / STEP_FILE).read_text())
    (path / STEP_FILE).write_text(json.dumps({**rec, "state": "started", "result": None}))


def _meta_disagrees_with_the_record(path: Path) -> None:
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "num_train": meta["num_train"] - 1}))


def _old_format(path: Path) -> None:  # a cache written by version 3 (its meta.json kept the key) under the key
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "version": 3, "key": path.name[-16:], "complete": True}))


def _missing_shard(path: Path) -> None:
    (path / json.loads((path / "meta.json").read_text())["shards"][1]["file"]).unlink()


def _damaged_meta(path: Path) -> None:
    (path / "meta.json").write_text("{")


@pytest.mark.parametrize("damage, reason", [
    (_drop_step_record, "it has no step.json"),
    (_damage_step_record, "its step.json is damaged"),
    (_unfinished_step_record, "its step.json records no finished build"),
    (_meta_disagrees_with_the_record, "meta.json disagrees with the build recorded in step.json"),
    (_old_format, f"meta.json is not of format version {packing.FORMAT_VERSION}"),
    (_missing_shard, "bad shard"),
    (_damaged_meta, "unreadable meta.json"),
])
def test_damaged_cache_is_rebuilt_naming_why(tmp_path, tok, corpus, monkeypatch, caplog, damage, reason):
    ds = build_token_dataset(corpus, tok, 16, tmp_path / "c", shard_tokens=64)
    expected, record = all_tokens(ds), StepRecord.read(ds.path)
    damage(ds.path)
    calls = []
    real = packing._encode_batch
    monkeypatch.setattr(packing, "_encode_batch", lambda t, texts: calls.append(len(texts)) or real(t, texts))
    with caplog.at_level("WARNING", logger="hybrid_distill.data.packing"):
        ds2 = build_token_dataset(corpus, tok, 16, tmp_path / "c", shard_tokens=64)
    assert f"discarding token cache {ds.path}: {reason}" in caplog.text and calls  # tokenized again
    assert ds2.path == ds.path and all_tokens(ds2) == expected
    rebuilt = StepRecord.read(ds.path)
    assert rebuilt.state == "done" and rebuilt.key == record.key and rebuilt.run_id != record.run_id


def test_cache_with_the_record_of_another_key_is_rebuilt_naming_the_change(tmp_path, tok, corpus, caplog):
    cache = tmp_path / "c"
    ds16, ds32 = build_token_dataset(corpus, tok, 16, cache), build_token_dataset(corpus, tok, 32, cache)
    expected = all_tokens(ds16)
    shutil.copy(ds32.path / STEP_FILE, ds16.path / STEP_FILE)  # the 16-token cache now claims the 32-token settings
    with caplog.at_level("WARNING", logger="hybrid_distill.data.packing"):
        again = build_token_dataset(corpus, tok, 16, cache)
    assert f"discarding token cache {ds16.path}: its step.json records other settings (seq_len: 32 -> 16)" in caplog.text
    assert again.path == ds16.path and all_tokens(again) == expected
    assert StepRecord.read(again.path).key == again.path.name[-16:] != StepRecord.read(ds32.path).key
    assert sorted(_visible(cache)) == sorted([ds16.path, ds32.path])  # the other key's cache is untouched
    assert all_tokens(build_token_dataset(corpus, tok, 32, cache)) == all_tokens(ds32)


def test_concurrent_builders_of_one_key_both_end_with_a_valid_cache(tmp_path, tok, corpus):
    """Two processes build one key at once: the second scans for dead builds while the first's build folder
    exists (and keeps it), and publishes after the first did (its ``os.replace`` fails on the published folder),
    so it discards its own build and loads the first's."""
    cache, sync = tmp_path / "c", tmp_path / "sync"
    sync.mkdir()
    script = textwrap.dedent(f"""
        import hashlib, sys, time
        from pathlib import Path
        from hybrid_distill.artifacts import Step
        from hybrid_distill.data import packing, build_token_dataset
        from hybrid_distill.tokenization import tiny_tokenizer
        role, sync, cache = sys.argv[1], Path({str(sync)!r}), Path({str(cache)!r})

        def wait_for(done):
            deadline = time.monotonic() + 120
            while not done():
                assert time.monotonic() < deadline, "the other builder never got there"
                time.sleep(0.02)

        real_scan, real_publish = packing._remove_dead_temps, Step.publish
        def scan(cache_dir, key):
            if role == "second":  # scan while the first builder's folder is there, finished and locked
                wait_for(lambda: (sync / "first").exists())
                assert len(list(cache_dir.glob(".tmp-*"))) == 1
            real_scan(cache_dir, key)
        def publish(self, result):
            rec = real_publish(self, result)
            (sync / role).touch()
            if role == "first":
                wait_for(lambda: (sync / "second").exists())
            else:  # publish only once the first has
                wait_for(lambda: any(not p.name.startswith(".") for p in cache.iterdir()))
            return rec
        packing._remove_dead_temps, Step.publish = scan, publish
        ds = build_token_dataset({str(corpus)!r}, tiny_tokenizer(), 16, cache, shard_tokens=64)
        print(ds.path, hashlib.sha256(ds.get_batch(range(len(ds))).numpy().tobytes()).hexdigest())
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = {role: subprocess.Popen([sys.executable, "-c", script, role], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env) for role in ("first", "second")}
    outs = {role: p.communicate(timeout=300) for role, p in procs.items()}
    for role, p in procs.items():
        assert p.returncode == 0, f"{role}: {outs[role][1]}"
    ds = build_token_dataset(corpus, tok, 16, cache, shard_tokens=64)
    digest = hashlib.sha256(ds.get_batch(range(len(ds))).numpy().tobytes()).hexdigest()
    assert outs["first"][0].split() == outs["second"][0].split() == [str(ds.path), digest]
    assert list(cache.iterdir()) == [ds.path]  # the second builder's folder is gone
    assert Step(ds.path, StepRecord.read(ds.path).settings).finished() is not None


def test_too_small_corpus_errors(tmp_path, tok):
    f = write_jsonl(tmp_path / "tiny.jsonl", ["just a few words"])
    with pytest.raises(DataSourceError, match="fewer than one sequence"):
        build_token_dataset(f, tok, 256, tmp_path / "c")
    assert _visible(tmp_path / "c") == []
    f = write_jsonl(tmp_path / "small.jsonl", make_docs(10))
    with pytest.raises(DataSourceError, match=r"packs into \d+ training sequences.*64 are needed") as err:
        build_token_dataset(f, tok, 16, tmp_path / "c", require_sequences=64, heldout_fraction=0.2)
    assert "heldout_fraction" not in str(err.value)  # holding out less cannot make 64 sequences of this corpus
    ds = build_token_dataset(f, tok, 16, tmp_path / "c", heldout_fraction=0.2)
    assert len(ds.heldout_indices) > 0
    with pytest.raises(DataSourceError, match=r"smaller heldout_fraction"):  # here it can
        build_token_dataset(f, tok, 16, tmp_path / "c", require_sequences=len(ds), heldout_fraction=0.2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ds.batches("train", batch_size=len(ds) + 1)


# ----------------------------------------------------------------------------- split + loader


def test_heldout_split_deterministic_and_disjoint(tmp_path, tok, corpus):
    train, held = split_indices(1000, 0.05, seed=3)
    assert len(held) == 50 and len(train) == 950
    assert not set(train) & set(held) and sorted([*train, *held]) == list(range(1000))
    t2, h2 = split_indices(1000, 0.05, seed=3)
    assert np.array_equal(held, h2) and np.array_equal(train, t2)
    assert not np.array_equal(held, split_indices(1000, 0.05, seed=4)[1])
    assert len(split_indices(1000, 0.05, seed=3, heldout_sequences=7)[1]) == 7
    assert len(split_indices(5, 0.01)[1]) == 1 and len(split_indices(1, 0.5)[1]) == 0

    # packed caches hold out whole documents (tests/test_data_heldout.py), packed after the training ones
    ds = build_token_dataset(corpus, tok, 16, tmp_path / "c", heldout_fraction=0.25, seed=1)
    held = ds.meta["heldout"]
    assert held["count"] == len(ds.heldout_indices) > 0 and held["first"] == ds.meta["num_train"]
    assert ds.heldout_indices.tolist() == list(range(held["first"], held["first"] + held["count"]))
    again = PackedDataset(ds.path)
    assert np.array_equal(again.train_indices, ds.train_indices)
    assert np.array_equal(again.heldout_indices, ds.heldout_indices)
    assert not set(ds.train_indices.tolist()) & set(ds.heldout_indices.tolist())
    assert len(ds.train_indices) + len(ds.heldout_indices) == len(ds)
    evals = torch.cat(list(ds.eval_batches("heldout", batch_size=3)))
    assert torch.equal(evals, ds.get_batch(ds.heldout_indices))


@pytest.fixture
def packed(tmp_path, tok):
    f = write_jsonl(tmp_path / "big.jsonl", make_docs(200, seed=1))
    return build_token_dataset(f, tok, 8, tmp_path / "c", heldout_fraction=0.1)


def test_loader_order_resume_and_epochs(packed):
    ds, bs = packed, 8
    spe = len(ds.train_indices) // bs
    total = 2 * spe + 5  # runs into a third epoch
    full = [b for _, b in zip(range(total), ds.batches("train", bs, seed=7))]
    assert all(b.shape == (bs, 8) for b in full)
    for k in (0, 1, spe - 1, spe, spe + 3, total - 1):
        tail = [b for _, b in zip(range(total - k), ds.batches("train", bs, seed=7, start_step=k))]
        assert all(torch.equal(a, b) for a, b in zip(full[k:], tail)) and len(tail) == total - k

    # each epoch is a permutation without repeats, and epochs differ
    s = TokenBatchSampler(ds.train_indices, bs, seed=7)
    it = iter(s)
    epoch0 = np.concatenate([next(it) for _ in range(spe)])
    epoch1 = np.concatenate([next(it) for _ in range(spe)])
    assert len(set(epoch0.tolist())) == spe * bs and set(epoch0.tolist()) <= set(ds.train_indices.tolist())
    assert not np.array_equal(epoch0, epoch1)
    assert s.position == (2, 0)
    assert not set(epoch0.tolist()) & set(ds.heldout_indices.tolist())
    # `epoch=e` starts where a run from epoch 0 reaches step e * steps_per_epoch
    e1 = [b for _, b in zip(range(3), ds.batches("train", bs, seed=7, epoch=1))]
    assert all(torch.equal(a, b) for a, b in zip(full[spe : spe + 3], e1))
    # a different seed gives a different order
    other = next(ds.batches("train", bs, seed=8))
    assert not torch.equal(other, full[0])


def test_loader_state_dict_resume(packed):
    it = packed.batches("train", 8, seed=2)
    first = [next(it) for _ in range(13)]
    state = it.state_dict()
    expected = [next(it) for _ in range(5)]
    resumed = packed.batches("train", 8, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    assert state["step"] == 13 and resumed.step == 13
    assert all(torch.equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(5)]))
    bad = packed.batches("train", 4)
    with pytest.raises(ValueError, match="batch_size"):
        bad.load_state_dict(state)
    assert len(first) == 13


def test_rank_sharding_matches_single_process(packed):
    ds, bs = packed, 8
    spe = len(ds.train_indices) // bs
    steps = spe + 4
    ref = [b for _, b in zip(range(steps), ds.batches("train", bs, seed=3, start_step=2))]
    for world in (2, 4, 8):
        per_rank = [
            [b for _, b in zip(range(steps), ds.batches("train", bs, seed=3, start_step=2, rank=r, world_size=world))]
            for r in range(world)
        ]
        for step in range(steps):
            assert all(per_rank[r][step].shape == (bs // world, 8) for r in range(world))
            assert torch.equal(torch.cat([per_rank[r][step] for r in range(world)]), ref[step])
    with pytest.raises(ValueError, match="not divisible by world_size 3"):
        ds.batches("train", bs, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        ds.batches("train", bs, rank=2, world_size=2)


def test_dataloader_and_pickle(packed):
    sampler = TokenBatchSampler(packed.train_indices, 4, seed=1, max_steps=6)
    dl = torch.utils.data.DataLoader(packed, batch_sampler=sampler)
    got = list(dl)
    ref = [b for _, b in zip(range(6), packed.batches("train", 4, seed=1))]
    assert len(got) == 6 and all(torch.equal(a, b) for a, b in zip(got, ref))
    _ = packed[0]  # open the memmaps, then make sure they are not pickled by value
    clone = pickle.loads(pickle.dumps(packed))
    assert len(pickle.dumps(packed)) < 50_000 + 20 * len(packed)
    assert torch.equal(clone[-1], packed[len(packed) - 1])
    with pytest.raises(IndexError):
        packed[len(packed)]


# ----------------------------------------------------------------------------- default corpus


def test_default_corpus_offline(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sources.socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    path = sources.default_corpus_path()
    assert path.is_file() and path.stat().st_size < 3_000_000
    prose, code = list(iter_texts("default:prose")), list(iter_texts("default:code"))
    assert len(prose) > 300 and len(code) > 50
    assert any("The \"if\" statement" in d for d in prose) and any(d.startswith('"""') or "def " in d for d in code)
    ds = build_token_dataset("default", tok, 1024, tmp_path / "c", require_sequences=64)
    assert ds.num_tokens > 2_000_000 and ds.meta["num_documents"] == len(prose) + len(code)
    assert (ds.path.name.startswith("default-")) and ds.meta["dtype"] == "uint16"
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["total"]["documents"] == len(prose) + len(code)
    assert manifest["sha256"] == ds.meta["source"]["fingerprint"]["sha256"]
    assert os.access(path.parent / "README.md", os.R_OK)
