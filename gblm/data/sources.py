"""Text sources for calibration and evaluation, by name.

| source      | where from                                                    | sampled as |
|-------------|---------------------------------------------------------------|------------|
| austen, kjv | the embedded corpora (:mod:`gblm.data.corpus`)                  | stream     |
| wikitext2   | ``datasets``: ``wikitext`` / ``wikitext-2-raw-v1``, or local parquet/json/txt (``wiki.*.raw``: a row per line) | stream |
| c4          | ``datasets``: ``allenai/c4``, shard ``en/c4-train.00000-of-01024.json.gz``, or a local copy | documents |
| local       | your files: ``.txt`` (one document each), ``.json``/``.jsonl``(``.gz``) with a ``text`` field, ``.parquet`` | stream or documents |

``stream`` sources are joined with ``"\n\n"`` and tokenized once (the published WikiText protocol),
except WikiText-2 for calibration, whose rows the published loaders join with a space
(:data:`CALIBRATION_SEPARATORS`); ``documents`` sources are sampled one document at a time (the
published C4 protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gblm.data import corpus
from gblm.errors import ConfigError, UserError
from gblm.paths import configure_offline

if TYPE_CHECKING:
    from torch import Tensor

SOURCES = ("austen", "kjv", "wikitext2", "c4", "local")
SAMPLINGS = ("stream", "documents")
STREAM_SEPARATOR = "\n\n"  # what a ``stream`` source's documents are joined with
#: The calibration sources joined otherwise.
CALIBRATION_SEPARATORS = {"wikitext2": " "}
C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_SPLITS = {  # the splits of a source, where known without loading it
    **dict.fromkeys(corpus.SOURCES, corpus.SPLITS),
    "c4": tuple(C4_SHARDS),
    "wikitext2": ("train", "validation", "test"),
}


class DataUnavailableError(UserError, RuntimeError):
    """A dataset cannot be had (offline, missing files); the message says how to supply it."""


def _offline_help(source: str, key: str) -> str:
    return (
        f"{key}={source!r} needs the Hugging Face hub, which cannot be reached from here, and no "
        f"local copy is cached. Either run once with network access (datasets caches it), or "
        f"supply local files of the same format with {key.rsplit('.', 1)[0]}.paths=[...] "
        f"(wikitext2: the wikitext-2-raw-v1 parquet files or .txt; c4: the .json.gz shard), or use "
        f"the embedded corpus ({key}=austen)."
    )


def _load_files(
    paths: Sequence[str | Path], split: str, key: str, lines: bool = False
) -> list[str]:
    """Documents from local files; a ``.txt`` file is one document, or with ``lines`` one per
    line, a blank line empty (the rows the hub's ``wikitext`` builder made of ``wiki.*.raw``).
    ``key`` names the paths."""
    import datasets

    docs: list[str] = []
    tabular: dict[str, list[str]] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise DataUnavailableError(f"{key}: local data file {str(path)!r} {what}.")
        name = path.name.lower()
        if name.endswith(".txt"):
            try:
                with path.open(encoding="utf-8") as handle:
                    docs.extend(
                        [r if r.strip() else "" for r in handle] if lines else [handle.read()]
                    )
            except (OSError, UnicodeDecodeError) as err:
                raise DataUnavailableError(
                    f"{key}: local data file {str(path)!r} cannot be read as UTF-8 text "
                    f"({type(err).__name__}: {err})."
                ) from None
        elif name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
            tabular.setdefault("json", []).append(str(path))
        elif name.endswith(".parquet"):
            tabular.setdefault("parquet", []).append(str(path))
        else:
            raise DataUnavailableError(
                f"{key}: local data file {str(path)!r}: allowed kinds are .txt, .json, "
                ".jsonl(.gz), .parquet."
            )
    for builder, files in tabular.items():
        try:
            ds = datasets.load_dataset(builder, data_files={split: files}, split=split)
        except Exception as err:  # datasets' parse errors have many types
            reason = " ".join(str(err).split())[:300]
            raise DataUnavailableError(
                f"{key}: files {files} cannot be read as {builder} ({type(err).__name__}: {reason})."
            ) from None
        if "text" not in ds.column_names:
            raise DataUnavailableError(
                f"{key}: files {files} have no 'text' column (columns: {ds.column_names})."
            )
        docs.extend(ds["text"])
    return docs


def load_documents(
    source: str,
    split: str,
    paths: Sequence[str | Path] | None = None,
    key: str = "calibration.source",
) -> list[str]:
    """The documents of ``source`` / ``split``; ``paths`` replaces the hub for wikitext2, c4, local."""
    if source not in SOURCES:
        raise ValueError(f"{key}={source!r}: allowed values are {', '.join(SOURCES)}.")
    group = key.rsplit(".", 1)[0]
    allowed = _SPLITS.get(source)
    if allowed is not None and split not in allowed and (source in corpus.SOURCES or not paths):
        raise ConfigError(
            f"{group}.split={split!r} is not a split of {key}={source}: allowed values are "
            f"{', '.join(allowed)}."
        )
    if source == "austen":
        return corpus.austen_documents(split)
    if source == "kjv":
        return corpus.kjv_documents(split)
    if paths:
        return _load_files(paths, split, key=f"{group}.paths", lines=source == "wikitext2")
    if source == "local":
        raise DataUnavailableError(
            f"{key}=local needs files: set {group}.paths=[a.txt, b.jsonl, ...]."
        )
    configure_offline()
    import datasets

    try:
        if source == "wikitext2":
            # The published loaders: load_dataset('wikitext', 'wikitext-2-raw-v1', split=...).
            return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
        # No config name: the old 'allenai--c4' name fails on current datasets.
        ds = datasets.load_dataset("allenai/c4", data_files={split: C4_SHARDS[split]}, split=split)
        return list(ds["text"])
    except Exception as err:  # datasets raises several of its own types offline
        offline = any(word in str(err).lower() for word in ("offline", "hub", "connect"))
        if isinstance(err, ConnectionError | OSError) or offline:
            raise DataUnavailableError(_offline_help(source, key)) from err
        raise


def calibration_separator(source: str) -> str:
    """What the calibration documents of ``source`` are joined with (a ``stream`` source)."""
    return CALIBRATION_SEPARATORS.get(source, STREAM_SEPARATOR)


def join_and_tokenize(
    tokenizer, documents: Sequence[str], separator: str = STREAM_SEPARATOR
) -> Tensor:
    """(1, numel) token ids of the documents joined with ``separator`` (a ``stream`` source; the
    published evaluation protocol joins with ``"\n\n"``)."""
    return tokenizer(separator.join(documents), return_tensors="pt").input_ids
