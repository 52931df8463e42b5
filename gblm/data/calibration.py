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
from gblm.utils import atomic_write, content_hash, file_lock

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


def windows_cache_key(
    tokenizer_id: str,
    source: str,
    paths: Sequence[str] | None,
    nsamples: int,
    seqlen: int,
    seed: int,
    sampling: str,
    vocab_size: int,
) -> str:
    """16 hex digits of :func:`gblm.utils.content_hash` over everything the windows depend on."""
    key = dict(
        tokenizer=tokenizer_id,
        source=source,
        paths=[str(p) for p in (paths or [])],
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        sampling=sampling,
        vocab=vocab_size,
    )
    return content_hash(key, length=16)


def cached_windows(cache_root: Path, key: str, make) -> Tensor:
    """Load the windows stored under ``key`` or make and store them (atomic, locked)."""
    path = cache_root / "calibration" / f"windows_{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        if path.exists():
            log.info("calibration windows from cache %s", path.name)
            return torch.load(path)
        windows = make()
        atomic_write(path, lambda tmp: torch.save(windows, tmp))
        return windows
