"""Seeded calibration windows: N windows of T token ids, exactly as the published loaders draw them.

``documents`` sampling (C4): ``random.seed(seed)``; for each sample draw a document with
``random.randint(0, len(docs) - 1)``, tokenize it alone and redraw until it is longer than T tokens;
then ``i = random.randint(0, len - T - 1)`` and take ``ids[i:i+T]``.
``stream`` sampling (WikiText): the documents joined with ``separator`` (WikiText-2's train rows
with a space, as published) are tokenized once and each sample only draws ``i`` the same way.
Labels are the ids themselves (next-token loss).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from gblm.data import corpus
from gblm.data.sources import SAMPLINGS, STREAM_SEPARATOR, join_and_tokenize, load_documents
from gblm.utils import cached_tensors, content_hash, file_digest


def sample_windows(
    tokenizer,
    documents: Sequence[str],
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    sampling: str = "documents",
    separator: str = STREAM_SEPARATOR,
) -> Tensor:
    """(nsamples, seqlen) int64 token ids drawn from ``documents``."""
    if sampling not in SAMPLINGS:
        raise ValueError(
            f"calibration.sampling={sampling!r}: allowed values are {', '.join(SAMPLINGS)}."
        )
    if not documents:
        raise ValueError("No calibration documents.")
    random.seed(seed)
    windows = torch.empty(nsamples, seqlen, dtype=torch.long)
    if sampling == "stream":
        ids = join_and_tokenize(tokenizer, documents, separator)[0]
        if ids.numel() <= seqlen:
            raise ValueError(
                f"calibration.seqlen={seqlen} is not shorter than the whole calibration text "
                f"({ids.numel()} tokens): use a shorter seqlen or more text."
            )
    tokenized: dict[int, Tensor] = {}
    for n in range(nsamples):
        if sampling == "documents":
            ids = _draw_document(tokenizer, documents, seqlen, tokenized)
        i = random.randint(0, ids.numel() - seqlen - 1)
        windows[n] = ids[i : i + seqlen]
    return windows


def _draw_document(
    tokenizer, documents: Sequence[str], seqlen: int, tokenized: dict[int, Tensor]
) -> Tensor:
    """The ids of a random document longer than ``seqlen`` tokens, redrawn until one is."""
    for _attempt in range(100_000):
        d = random.randint(0, len(documents) - 1)
        if d not in tokenized:
            tokenized[d] = tokenizer(documents[d], return_tensors="pt").input_ids[0]
        if tokenized[d].numel() > seqlen:
            return tokenized[d]
    longest = max(len(doc) for doc in documents)
    raise ValueError(
        f"calibration.seqlen={seqlen}: no calibration document is longer than that "
        f"(longest has {longest} characters); use calibration.sampling=stream or a shorter seqlen."
    )


# 2: keyed by the documents' and the tokenizer's content, checksummed; 3: the separator
WINDOWS_CACHE_VERSION = 3


def documents_digest(documents: Sequence[str]) -> str:
    """sha256 of the documents' text (each length-prefixed): the windows follow the content,
    not the path of the files."""

    def chunks():
        for doc in documents:
            raw = doc.encode("utf-8")
            yield len(raw).to_bytes(8, "little")
            yield raw

    return content_hash({"documents": len(documents)}, data=chunks())


def source_fingerprint(
    source: str, split: str, paths: Sequence[str] | None, memo_dir: Path, key: str
) -> str:
    """A content fingerprint of the documents :func:`gblm.data.sources.load_documents` reads,
    cheap enough to take before anything loads (a run's identity).

    Local files: each one's kind and sha256 (:func:`gblm.utils.file_digest`, memoized under
    ``memo_dir``), or its path if unreadable (the inputs' check refuses it). An embedded corpus:
    :func:`documents_digest`. A hub dataset: its name and split (the datasets cache holds one
    fixed revision). ``key`` names the source in a refusal.
    """
    if paths:
        files = []
        for raw in paths:
            path = Path(raw).expanduser()
            try:
                files.append([path.name.lower().partition(".")[2], file_digest(path, memo_dir)])
            except OSError:
                files.append([str(path), None])
        return "files:" + content_hash(files, length=32)
    if source in corpus.SOURCES:
        return "text:" + documents_digest(load_documents(source, split, key=key))[:32]
    return f"dataset:{source}/{split}"


_PROBE = " Chapter 12\n\nMr. Smith's café, naïve  text:\t3.14 — done."


def tokenizer_digest(tokenizer) -> str:
    """A hash of what the tokenizer does: a fast tokenizer's full definition, else its vocabulary;
    and its ids of a probe text holding its special tokens (added as the windows' calls add them;
    kept whole or split, ``split_special_tokens``, which no definition holds)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    probe = _PROBE + " ".join(tokenizer.all_special_tokens)
    ids = list(tokenizer(probe).input_ids)
    return content_hash({"class": type(tokenizer).__name__, "tokenizer": [spec, ids]}, length=32)


def windows_cache_key(
    *,
    tokenizer_id: str,
    documents_sha256: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    sampling: str,
    separator: str,
    vocab_size: int,
) -> str:
    """16 hex digits of :func:`gblm.utils.content_hash` over everything the windows depend on
    (``tokenizer_id``: :func:`tokenizer_digest`, ``documents_sha256``: :func:`documents_digest`)."""
    key = dict(
        version=WINDOWS_CACHE_VERSION,
        tokenizer=tokenizer_id,
        documents=documents_sha256,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        sampling=sampling,
        separator=separator,
        vocab=vocab_size,
    )
    return content_hash(key, length=16)


def cached_windows(cache_root: Path, key: str, make) -> Tensor:
    """The windows stored under ``key``, or made and stored (:func:`gblm.utils.cached_tensors`)."""
    path = cache_root / "calibration" / f"windows_{key}.safetensors"
    return cached_tensors(path, lambda: {"windows": make()}, "calibration windows")["windows"]
