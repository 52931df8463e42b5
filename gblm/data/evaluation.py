"""Evaluation token streams: the test text joined with ``"\n\n"`` and tokenized once."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def join_and_tokenize(tokenizer, documents: Sequence[str]) -> Tensor:
    """(1, numel) token ids of the documents joined with ``"\n\n"`` (the published protocol)."""
    return tokenizer("\n\n".join(documents), return_tensors="pt").input_ids
