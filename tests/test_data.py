"""Calibration sampling (the published protocol, re-derived in the test), corpora, local files."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch

from gblm.data.calibration import sample_windows
from gblm.data.corpus import austen_documents, kjv_documents
from gblm.data.sources import DataUnavailableError, load_documents


class CharTokenizer:
    """One token per character (+ a BOS of 0), so expected windows are easy to compute."""

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[0] + [ord(c) for c in text]])
        return type("Enc", (), {"input_ids": ids})()


def _expected_documents(docs, n, seqlen, seed):
    random.seed(seed)
    out = []
    for _ in range(n):
        while True:
            d = random.randint(0, len(docs) - 1)
            ids = [0] + [ord(c) for c in docs[d]]
            if len(ids) > seqlen:
                break
        i = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[i : i + seqlen])
    return torch.tensor(out)


def test_document_sampling_matches_the_published_draws():
    docs = ["short", "a" * 3 + "bcdefghijklmnopqrstuvwxyz" * 3, "tiny", "0123456789" * 5]
    got = sample_windows(CharTokenizer(), docs, nsamples=7, seqlen=12, seed=3, sampling="documents")
    assert torch.equal(got, _expected_documents(docs, 7, 12, 3))


def test_stream_sampling_draws_only_the_start():
    docs = ["alpha beta", "gamma delta epsilon", "zeta eta theta iota"]
    got = sample_windows(CharTokenizer(), docs, nsamples=5, seqlen=8, seed=0, sampling="stream")
    ids = [0] + [ord(c) for c in "\n\n".join(docs)]
    random.seed(0)
    starts = [random.randint(0, len(ids) - 8 - 1) for _ in range(5)]
    assert torch.equal(got, torch.tensor([ids[i : i + 8] for i in starts]))


def test_wikitext2_calibration_joins_its_rows_with_a_space_as_the_published_loaders(cache):
    """The published loaders calibrate on ``" ".join(train rows)`` and evaluate on
    ``"\n\n".join(test rows)``; the embedded corpora are joined with a blank line."""
    from omegaconf import OmegaConf

    from gblm.config import validate
    from gblm.pipeline import calibration_windows
    from gblm.utils import StageTimer
    from tests.conftest import compose_config

    class Tokenizer(CharTokenizer):  # what the windows' cache key reads of a tokenizer
        all_special_tokens: list[str] = []

        def get_vocab(self):
            return {chr(i): i for i in range(128)}

        def __len__(self):
            return 128

    rows = [" = Title = \n", "", " Some text here .\n", " More text follows .\n", ""]
    for source, separator in (("wikitext2", " "), ("austen", "\n\n")):
        cfg = compose_config(f"calibration={source}", "calibration.nsamples=6",
                             "calibration.seqlen=9", "calibration.seed=4")  # fmt: skip
        conf = validate(OmegaConf.to_container(cfg, resolve=True))
        got = calibration_windows(conf, Tokenizer(), rows, StageTimer())
        ids = [0] + [ord(ch) for ch in separator.join(rows)]
        random.seed(4)
        starts = [random.randint(0, len(ids) - 9 - 1) for _ in range(6)]
        assert torch.equal(got, torch.tensor([ids[i : i + 9] for i in starts])), source


def test_sampling_is_seeded():
    docs = [
        "".join(chr(65 + i % 50) for i in range(60)),
        "".join(chr(97 + i % 26) for i in range(90)),
    ]
    a = sample_windows(CharTokenizer(), docs, 4, 10, seed=1, sampling="documents")
    assert torch.equal(
        a, sample_windows(CharTokenizer(), docs, 4, 10, seed=1, sampling="documents")
    )
    assert not torch.equal(
        a, sample_windows(CharTokenizer(), docs, 4, 10, seed=2, sampling="documents")
    )


def test_no_document_long_enough_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="calibration.seqlen=100"):
        sample_windows(CharTokenizer(), ["abc", "defg"], 2, 100, sampling="documents")


def test_austen_split_is_by_whole_novel_and_disjoint():
    train, val, test = (austen_documents(s) for s in ("train", "validation", "test"))
    assert len(test) == 24 and test[0].startswith("Chapter 1") and "Sir Walter Elliot" in test[0]
    assert len(val) == 31 and len(train) > 200
    assert not set(test) & set(train)
    assert all("\n\n" in ch for ch in test)


def test_kjv_split_covers_every_chapter_once():
    parts = [kjv_documents(s) for s in ("train", "validation", "test")]
    assert sum(map(len, parts)) == 1189  # chapters of the King James Bible
    assert parts[0][0].startswith("Genesis 1\n\nIn the beginning God created")


def test_local_text_and_c4_style_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    with gzip.open(tmp_path / "c4-train.00000-of-01024.json.gz", "wt") as f:
        for t in ("doc one", "doc two"):
            f.write(json.dumps({"text": t, "timestamp": "2019", "url": "http://x"}) + "\n")
    docs = load_documents(
        "local", "train", [tmp_path / "a.txt", tmp_path / "c4-train.00000-of-01024.json.gz"]
    )
    assert docs == ["first document", "doc one", "doc two"]
    # c4 and wikitext2 read the same files when paths are given (offline use).
    assert load_documents("c4", "train", [tmp_path / "c4-train.00000-of-01024.json.gz"]) == [
        "doc one",
        "doc two",
    ]


def test_wikitext_parquet_layout(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["", " = Title = \n", " Some text . \n"]}).to_parquet(
        tmp_path / "test-00000-of-00001.parquet"
    )
    docs = load_documents("wikitext2", "test", [tmp_path / "test-00000-of-00001.parquet"])
    assert docs == ["", " = Title = \n", " Some text . \n"]


def test_wikitext_raw_text_file_reads_as_the_hub_rows(tmp_path):
    """The original wiki.test.raw (saved as .txt) is the hub's rows, a line each (blank lines
    empty), so the text joined with blank lines is the published one, not the file as it stands."""
    raw = tmp_path / "wiki.test.txt"
    raw.write_text(" \n = Title = \n \n Some text . \n More text . \n", encoding="utf-8")
    docs = load_documents("wikitext2", "test", [raw], key="eval.perplexity.dataset")
    assert docs == ["", " = Title = \n", "", " Some text . \n", " More text . \n"]
    # other sources keep a .txt file as one document
    assert load_documents("local", "test", [raw]) == [raw.read_text(encoding="utf-8")]


def test_missing_local_file_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(DataUnavailableError, match="does not exist"):
        load_documents("local", "train", [tmp_path / "nope.txt"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from gblm import paths

    paths.hub_reachable.cache_clear()
    with pytest.raises(DataUnavailableError, match="calibration.paths"):
        load_documents("c4", "train")
    paths.hub_reachable.cache_clear()


def test_content_hash_and_windows_cache_key():
    from gblm.data.calibration import windows_cache_key
    from gblm.utils import content_hash

    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert len(content_hash("x")) == 64 and len(content_hash("x", length=16)) == 16
    assert content_hash({"shape": [2]}, data=[b"ab"]) != content_hash({"shape": [2]}, data=[b"ba"])
    base = dict(
        tokenizer_id="tok",
        documents_sha256="docs",
        nsamples=4,
        seqlen=64,
        seed=0,
        sampling="documents",
        separator="\n\n",
        vocab_size=100,
    )
    key = windows_cache_key(**base)
    assert len(key) == 16 and key == windows_cache_key(**base)
    changes = dict(
        tokenizer_id="other",
        documents_sha256="edited",
        nsamples=8,
        seqlen=128,
        seed=1,
        sampling="stream",
        separator=" ",
        vocab_size=101,
    )
    for name, value in changes.items():  # every input is part of the key
        assert windows_cache_key(**{**base, name: value}) != key, name
