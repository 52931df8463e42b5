"""Evaluation token streams: the test text joined with ``"\n\n"`` and tokenized once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from gblm.data.sources import load_documents


def join_and_tokenize(tokenizer, documents: Sequence[str]) -> Tensor:
    """(1, numel) token ids of the documents joined with ``"\n\n"`` (the published protocol)."""
    return tokenizer("\n\n".join(documents), return_tensors="pt").input_ids


def evaluation_tokens(
    tokenizer, dataset: str, split: str = "test", paths: Sequence[str | Path] | None = None
) -> Tensor:
    """(1, numel) token ids of ``dataset``/``split`` (the published WikiText-2 protocol)."""
    docs = load_documents(dataset, split, paths, key="eval.perplexity.dataset")
    return join_and_tokenize(tokenizer, docs)
