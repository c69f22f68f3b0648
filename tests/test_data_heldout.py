"""The held-out split of packed token caches is a property of the documents.

The same text is held out at every seq_len, max_tokens and seed, so a model trained on one
packing of a corpus (Stage 1 at a short seq_len) is never evaluated on its own training text in
another packing (Stage 2 at a long seq_len, the quality evaluation, another seed).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from hybrid_distill.data import DataSourceError, PackedDataset, build_token_dataset, packing
from hybrid_distill.tokenization import tiny_tokenizer

WORDS = "the sky is blue and the grass is green here we go again what a special magic number".split()
DOC_ID = re.compile(r"\bd(\d+)x\b")
RECALL_ID = re.compile(r"\br(\d+)x\b")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    # every document carries its id at both ends (a piece of it in any sequence is attributable)
    return [f"d{i}x " + " ".join(rng.choice(WORDS, size=rng.integers(5, 30))) + f" d{i}x" for i in range(n)]


def write_jsonl(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def doc_ids(tok, ds, indices, pattern=DOC_ID) -> set[int]:
    """Ids of the documents in sequences ``indices`` (each run of consecutive sequences decoded as one text)."""
    indices = np.asarray(indices)
    runs = np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1) if len(indices) else []
    return {int(m) for run in runs for m in pattern.findall(tok.decode(ds.get_batch(run).flatten().tolist()))}


def ngrams(ds, indices, n: int = 24) -> set[tuple[int, ...]]:
    out = set()
    for row in ds.get_batch(indices).tolist():
        out.update(tuple(row[i : i + n]) for i in range(len(row) - n + 1))
    return out


def test_heldout_documents_never_train_at_another_seq_len_or_seed(tmp_path, tok):
    """The audit's case: Stage 1 (short seq_len) must not train on Stage 2's (long seq_len) held-out text."""
    src = write_jsonl(tmp_path / "c.jsonl", make_docs(600))
    runs = {
        (seq, seed): build_token_dataset(src, tok, seq, tmp_path / "cache", heldout_fraction=0.1, seed=seed)
        for seq, seed in ((16, 0), (128, 0), (16, 5), (128, 7))
    }
    train = {k: doc_ids(tok, ds, ds.train_indices) for k, ds in runs.items()}
    held = {k: doc_ids(tok, ds, ds.heldout_indices) for k, ds in runs.items()}
    assert all(20 < len(h) < 120 for h in held.values()), {k: len(h) for k, h in held.items()}
    for a in runs:
        for b in runs:
            assert not held[a] & train[b], (a, b, sorted(held[a] & train[b])[:10])
    # the same documents at every seq_len and seed (up to the dropped tail of the held-out stream)
    assert held[(16, 0)] == held[(16, 5)] and held[(128, 0)] == held[(128, 7)]
    assert held[(128, 0)] <= held[(16, 0)] and len(held[(16, 0)] - held[(128, 0)]) <= 4
    # also token by token: no 24-gram of a held-out sequence occurs in another packing's training sequences
    short, long_ = runs[(16, 5)], runs[(128, 0)]
    assert not ngrams(long_, long_.heldout_indices) & ngrams(short, short.train_indices)


def test_heldout_documents_are_those_below_the_fraction_by_content_hash(tmp_path, tok):
    docs = make_docs(300, seed=1)
    docs.append(docs[0])  # an exact duplicate lands on the same side as its original
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    ds = build_token_dataset(src, tok, 8, tmp_path / "cache", heldout_fraction=0.2)
    expected = {i for i, d in enumerate(docs[:300]) if packing.heldout_hash(d) < 0.2 * 2**64}
    got, train = doc_ids(tok, ds, ds.heldout_indices), doc_ids(tok, ds, ds.train_indices)
    assert got <= expected and len(expected - got) <= 1  # the last one may be in the dropped tail
    assert not got & train and len(got) > 30
    held = ds.meta["heldout"]
    assert held["rule"] == packing.HELDOUT_RULE and held["units"] == len(expected) + (0 in expected)
    # layout: training sequences first, then held-out ones; nothing in both; "all" is both
    n_train = ds.meta["num_train"]
    assert ds.train_indices.tolist() == list(range(n_train))
    assert ds.heldout_indices.tolist() == list(range(n_train, len(ds)))
    assert len(ds.indices("all")) == len(ds) and ds.meta["heldout"]["fallback_units"] == 0
    # a larger fraction holds out a superset of the documents
    more = build_token_dataset(src, tok, 8, tmp_path / "cache", heldout_fraction=0.4)
    assert got <= doc_ids(tok, more, more.heldout_indices)
    assert not got & doc_ids(tok, more, more.train_indices)


def test_max_tokens_and_full_corpus_agree(tmp_path, tok):
    src = write_jsonl(tmp_path / "c.jsonl", make_docs(500, seed=2))
    part = build_token_dataset(src, tok, 32, tmp_path / "cache", heldout_fraction=0.1, max_tokens=4000)
    full = build_token_dataset(src, tok, 64, tmp_path / "cache", heldout_fraction=0.1)
    assert part.num_tokens <= 4000 < full.num_tokens
    part_train, part_held = doc_ids(tok, part, part.train_indices), doc_ids(tok, part, part.heldout_indices)
    full_train, full_held = doc_ids(tok, full, full.train_indices), doc_ids(tok, full, full.heldout_indices)
    assert part_held and not part_held & full_train and not full_held & part_train


def test_long_documents_are_split_into_units(tmp_path, tok, monkeypatch):
    """A corpus of one .txt file (one document) still gets a held-out split, cut into units at newlines."""
    monkeypatch.setattr(packing, "HELDOUT_UNIT_CHARS", 400)
    lines = [f"d{i}x " + " ".join(WORDS[(i * 7) % 11 : (i * 7) % 11 + 5]) for i in range(1500)]
    text = "\n".join(lines) + "\n"
    (tmp_path / "book.txt").write_text(text)
    units = packing.heldout_units(text, 400)
    assert "".join(units) == text and all(len(u) <= 400 and u.endswith("\n") for u in units) and len(units) > 100
    runs = [build_token_dataset(tmp_path / "book.txt", tok, seq, tmp_path / "c", heldout_fraction=0.1) for seq in (16, 64)]
    assert runs[0].meta["num_documents"] == 1 and runs[0].meta["heldout"]["unit_chars"] == 400
    held = [doc_ids(tok, ds, ds.heldout_indices) for ds in runs]
    train = [doc_ids(tok, ds, ds.train_indices) for ds in runs]
    assert 50 < len(held[0]) < 400 and not held[0] & train[1] and not held[1] & train[0]
    # each run of same-side units is one document in its stream: BOS ... EOS around it, no EOS inside
    expected_held_units = [u for u in units if packing.heldout_hash(u) < 0.1 * 2**64]
    assert runs[0].meta["heldout"]["units"] == len(expected_held_units)
    seqs = runs[0].get_batch(runs[0].heldout_indices).flatten().tolist()
    assert seqs.count(tok.eos_token_id) <= len(expected_held_units)
    assert tok.decode(seqs[:200]).replace("<s>", "").replace("</s>", "") in "".join(expected_held_units)
    # max_tokens cuts the document: the fallback only picks among the units actually read
    few = build_token_dataset(tmp_path / "book.txt", tok, 16, tmp_path / "c", heldout_fraction=0.001, max_tokens=700)
    n_read = few.meta["heldout"]["units_read"]
    assert few.meta["heldout"]["fallback_units"] >= 1 and 1 < n_read < 10
    read_ids = {int(m) for u in units[:n_read] for m in DOC_ID.findall(u)}
    assert doc_ids(tok, few, few.heldout_indices) <= read_ids and len(few.heldout_indices) >= 1
    # a different unit size is a different cache (the split rule changed)
    monkeypatch.setattr(packing, "HELDOUT_UNIT_CHARS", 800)
    assert build_token_dataset(tmp_path / "book.txt", tok, 16, tmp_path / "c", heldout_fraction=0.1).path != runs[0].path


def test_tiny_corpus_falls_back_to_the_lowest_hash_documents(tmp_path, tok, caplog):
    docs = make_docs(40, seed=15)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    hashes = [packing.heldout_hash(d) for d in docs]
    assert min(hashes) >= 0.05 * 2**64  # no document is below the fraction: the fallback is needed
    # the fallback: the lowest-hash documents making up the fraction of the characters (at least one)
    order = np.argsort(hashes)
    need = np.searchsorted(np.cumsum([len(docs[i]) for i in order]), 0.05 * sum(map(len, docs))) + 1
    expected = set(order[:need].tolist())
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.data.packing"):
        a = build_token_dataset(src, tok, 4, tmp_path / "cache", heldout_fraction=0.05)
    assert "lowest content hash" in caplog.text
    b = build_token_dataset(src, tok, 8, tmp_path / "cache", heldout_fraction=0.05, seed=9)
    for ds in (a, b):
        assert doc_ids(tok, ds, ds.heldout_indices) == expected and not expected & doc_ids(tok, ds, ds.train_indices)
        assert ds.meta["heldout"]["fallback_units"] == ds.meta["heldout"]["units"] == len(expected) >= 1
    # at a seq_len longer than those documents the held-out part is empty: a clear error, not a silent leak
    too_long = 2 ** int(np.ceil(np.log2(len(a.heldout_indices) * 4 + 8)))
    with pytest.raises(DataSourceError, match=rf"held-out text .* fills no sequence of {too_long} tokens.*larger heldout_fraction"):
        build_token_dataset(src, tok, too_long, tmp_path / "cache", heldout_fraction=0.05)
    # no held-out split when none is asked for
    none = build_token_dataset(src, tok, 64, tmp_path / "cache", heldout_fraction=0.0)
    assert len(none.heldout_indices) == 0 and len(none.train_indices) == len(none)


def test_heldout_sequences_cap_and_load_options(tmp_path, tok, caplog):
    src = write_jsonl(tmp_path / "c.jsonl", make_docs(300, seed=4))
    ds = build_token_dataset(src, tok, 16, tmp_path / "cache", heldout_fraction=0.2)
    avail = len(ds.heldout_indices)
    capped = build_token_dataset(src, tok, 16, tmp_path / "cache", heldout_fraction=0.2, heldout_sequences=5, seed=3)
    assert capped.path == ds.path  # heldout_sequences and seed do not change what is packed
    assert capped.heldout_indices.tolist() == ds.heldout_indices[:5].tolist()
    assert np.array_equal(capped.train_indices, ds.train_indices)  # the rest of the held-out part is not trained on
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.data.packing"):
        more = build_token_dataset(src, tok, 16, tmp_path / "cache", heldout_fraction=0.2, heldout_sequences=avail + 50)
    assert len(more.heldout_indices) == avail and "fills only" in caplog.text
    assert len(PackedDataset(ds.path, heldout_sequences=2).heldout_indices) == 2
    assert np.array_equal(PackedDataset(ds.path, seed=123).heldout_indices, ds.heldout_indices)
    with pytest.raises(ValueError, match="split is fixed when the cache is built"):
        PackedDataset(ds.path, heldout_fraction=0.05)
    with pytest.raises(ValueError, match="needs heldout_fraction > 0"):
        build_token_dataset(src, tok, 16, tmp_path / "cache", heldout_fraction=0.0, heldout_sequences=4)


def test_split_rule_is_part_of_the_cache_key(tmp_path, tok, monkeypatch):
    src = write_jsonl(tmp_path / "c.jsonl", make_docs(100, seed=5))
    base = build_token_dataset(src, tok, 16, tmp_path / "cache", heldout_fraction=0.1)
    assert build_token_dataset(src, tok, 16, tmp_path / "cache", heldout_fraction=0.2).path != base.path
    assert build_token_dataset(src, tok, 16, tmp_path / "cache", heldout_fraction=0.1, seed=4).path == base.path
    monkeypatch.setattr(packing, "HELDOUT_RULE", "some-other-rule")
    assert build_token_dataset(src, tok, 16, tmp_path / "cache", heldout_fraction=0.1).path != base.path
    # a cache written by the old (sequence-permutation) format is refused on load, never reused
    meta = json.loads((base.path / "meta.json").read_text())
    meta["version"] = 1
    (base.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 1"):
        PackedDataset(base.path)
    monkeypatch.setattr(packing, "HELDOUT_RULE", base.meta["heldout"]["rule"])
    rebuilt = build_token_dataset(src, tok, 16, tmp_path / "cache", heldout_fraction=0.1)
    assert rebuilt.meta["version"] == packing.FORMAT_VERSION and rebuilt.meta["created"]


def test_recall_documents_are_held_out_by_generator_seed(tmp_path, tok):
    """Synthetic recall documents differ by seq_len; the same generator seeds are held out at every seq_len."""
    from hybrid_distill.data.recall_mix import RecallMix

    class CheapRecall(RecallMix):
        def seeded_documents(self, tokenizer, seq_len):
            seed = self.seed
            while True:
                yield seed, f"r{seed}x " + "key value " * (seq_len // 8) + f"r{seed}x"
                seed += 1

    src = write_jsonl(tmp_path / "c.jsonl", make_docs(200, seed=6))
    mix = CheapRecall(0.3)
    held_seeds, train_seeds = [], []
    for seq in (16, 64):
        ds = build_token_dataset(src, tok, seq, tmp_path / "cache", heldout_fraction=0.2, recall_mix=mix)
        held_seeds.append(doc_ids(tok, ds, ds.heldout_indices, RECALL_ID))
        train_seeds.append(doc_ids(tok, ds, ds.train_indices, RECALL_ID))
    assert held_seeds[0] and held_seeds[1]
    assert not held_seeds[0] & train_seeds[1] and not held_seeds[1] & train_seeds[0]
    expected = {s for s in held_seeds[0] | train_seeds[0] if packing.heldout_hash(s) < 0.2 * 2**64}
    assert held_seeds[0] <= expected and len(expected - held_seeds[0]) <= 1
