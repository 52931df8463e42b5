"""Is there enough text? Checked once the tokenizer is loaded, before the model loads.

Tokens are counted one document at a time, stopping as soon as there are enough, so plentiful
text costs little. Every message names the config keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from gblm.errors import ConfigError


def _where(group: str, source: str, split: str, paths: Sequence[str] | None) -> str:
    if paths:
        return f"{group}.paths={list(paths)}"
    key = "dataset" if group == "eval.perplexity" else "source"
    return f"{group}.{key}={source} (split {split})"


def count_tokens(
    tokenizer, documents: Sequence[str], need: int, longer_than: int | None = None
) -> tuple[int, bool]:
    """(tokens counted, whether a document has more than ``longer_than`` tokens), counting
    until ``need`` tokens are seen (and, with ``longer_than``, such a document)."""
    total, long_found = 0, longer_than is None
    for doc in documents:
        if not doc:
            continue
        n = len(tokenizer(doc, add_special_tokens=False).input_ids)
        total += n
        long_found = long_found or n > longer_than
        if total >= need and long_found:
            break
    return total, long_found


def check_calibration_text(tokenizer, documents: Sequence[str], c) -> None:
    """Refuse calibration text too short for ``c.nsamples`` windows of ``c.seqlen`` tokens."""
    need = max(c.nsamples * c.seqlen, c.seqlen + 1)
    documents_sampling = c.sampling == "documents"
    total, long_found = count_tokens(
        tokenizer, documents, need, c.seqlen if documents_sampling else None
    )
    where = _where("calibration", c.source, c.split, c.paths)
    if total < need:
        raise ConfigError(
            f"calibration.nsamples={c.nsamples} x calibration.seqlen={c.seqlen} needs {need} "
            f"tokens of calibration text, but {where} holds {total}"
            f"{' (it is empty)' if total == 0 else ''}: give more text, or lower "
            "calibration.nsamples or calibration.seqlen."
        )
    if not long_found:
        raise ConfigError(
            f"calibration.sampling=documents: no document of {where} is longer than "
            f"calibration.seqlen={c.seqlen} tokens; use calibration.sampling=stream or a shorter "
            "calibration.seqlen."
        )


def check_eval_text(tokenizer, documents: Sequence[str], p) -> None:
    """Refuse evaluation text shorter than one window of ``p.seqlen`` tokens."""
    total, _ = count_tokens(tokenizer, documents, p.seqlen)
    if total < p.seqlen:
        where = _where("eval.perplexity", p.dataset, p.split, p.paths)
        raise ConfigError(
            f"eval.perplexity.seqlen={p.seqlen} needs at least that many tokens of evaluation "
            f"text, but {where} holds {total}{' (it is empty)' if total == 0 else ''}: give "
            "more text, or a shorter eval.perplexity.seqlen."
        )


def check_context(limit: int | None, seqlens: dict[str, int]) -> None:
    """Refuse sequence lengths past the model's ``max_position_embeddings`` (``limit``)."""
    if limit is None:
        return
    over = {key: value for key, value in seqlens.items() if value > limit}
    if over:
        listed = ", ".join(f"{key}={value}" for key, value in over.items())
        raise ConfigError(
            f"{listed}: longer than the model's context (max_position_embeddings={limit} in its "
            f"config); set {' and '.join(over)} to at most {limit}."
        )
