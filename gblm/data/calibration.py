"""Seeded calibration windows: N windows of T token ids, exactly as the published loaders draw them.

``documents`` sampling (C4): ``random.seed(seed)``; for each sample draw a document with
``random.randint(0, len(docs) - 1)``, tokenize it alone and redraw until it is longer than T tokens;
then ``i = random.randint(0, len - T - 1)`` and take ``ids[i:i+T]``.
``stream`` sampling (WikiText): the documents joined with ``"\n\n"`` are tokenized once and each
sample only draws ``i`` the same way. Labels are the ids themselves (next-token loss).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from gblm.data.sources import SAMPLINGS
from gblm.utils import cached_tensors, content_hash

log = logging.getLogger("gblm.data")


def sample_windows(
    tokenizer,
    documents: Sequence[str],
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    sampling: str = "documents",
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
        ids = tokenizer("\n\n".join(documents), return_tensors="pt").input_ids[0]
        if ids.numel() <= seqlen:
            raise ValueError(
                f"calibration.seqlen={seqlen} is not shorter than the whole calibration text "
                f"({ids.numel()} tokens): use a shorter seqlen or more text."
            )
        for n in range(nsamples):
            i = random.randint(0, ids.numel() - seqlen - 1)
            windows[n] = ids[i : i + seqlen]
        return windows
    lengths: dict[int, Tensor] = {}
    for n in range(nsamples):
        for _attempt in range(100_000):
            d = random.randint(0, len(documents) - 1)
            if d not in lengths:
                lengths[d] = tokenizer(documents[d], return_tensors="pt").input_ids[0]
            ids = lengths[d]
            if ids.numel() > seqlen:
                break
        else:
            longest = max(len(doc) for doc in documents)
            raise ValueError(
                f"calibration.seqlen={seqlen}: no calibration document is longer than that "
                f"(longest has {longest} characters); use calibration.sampling=stream or a shorter seqlen."
            )
        i = random.randint(0, ids.numel() - seqlen - 1)
        windows[n] = ids[i : i + seqlen]
    return windows


WINDOWS_CACHE_VERSION = 2  # 2: keyed by the documents' and the tokenizer's content, checksummed


def documents_digest(documents: Sequence[str]) -> str:
    """sha256 of the documents' text (each length-prefixed): the content the windows come from.

    An edited data file gives new documents, hence a new digest and new windows, whatever its
    path; the same text under another path shares the cache entry.
    """

    def chunks():
        for doc in documents:
            raw = doc.encode("utf-8")
            yield len(raw).to_bytes(8, "little")
            yield raw

    return content_hash({"documents": len(documents)}, data=chunks())


def source_fingerprint(
    source: str,
    split: str,
    paths: Sequence[str] | None,
    memo_dir: Path | None = None,
    key: str = "calibration.source",
) -> str:
    """A content fingerprint of the documents :func:`gblm.data.sources.load_documents` reads,
    cheap enough to take before anything loads (a run's identity).

    Local files: each one's sha256 (:func:`gblm.utils.file_digest`, remembered under
    ``memo_dir`` per size, mtime and inode) with its kind, in order; a file that cannot be read
    counts by its path (the inputs' check refuses it). An embedded corpus: its text's
    :func:`documents_digest`. A hub dataset without local files: its name and split (the
    datasets cache holds one fixed revision). ``key`` names the source in a refusal.
    """
    from gblm.data import corpus
    from gblm.data.sources import load_documents
    from gblm.utils import file_digest

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


def tokenizer_digest(tokenizer) -> str:
    """A hash of what the tokenizer does: a fast tokenizer's full definition, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return content_hash({"class": type(tokenizer).__name__, "tokenizer": spec}, length=32)


def windows_cache_key(
    *,
    tokenizer_id: str,
    documents_sha256: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    sampling: str,
    vocab_size: int,
) -> str:
    """16 hex digits of :func:`gblm.utils.content_hash` over everything the windows depend on.

    ``tokenizer_id`` is :func:`tokenizer_digest`, ``documents_sha256`` :func:`documents_digest`:
    the key follows the content, not the names of the files or of the model.
    """
    key = dict(
        version=WINDOWS_CACHE_VERSION,
        tokenizer=tokenizer_id,
        documents=documents_sha256,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        sampling=sampling,
        vocab=vocab_size,
    )
    return content_hash(key, length=16)


def cached_windows(cache_root: Path, key: str, make) -> Tensor:
    """The windows stored under ``key``, or made and stored (:func:`gblm.utils.cached_tensors`)."""
    path = cache_root / "calibration" / f"windows_{key}.safetensors"
    return cached_tensors(path, lambda: {"windows": make()}, "calibration windows")["windows"]
