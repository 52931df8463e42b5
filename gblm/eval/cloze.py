"""``austen_cloze``: an offline multiple-choice task built from held-out Austen chapters.

Every item is a passage of consecutive sentences from one chapter, followed by four candidate
next sentences: the true one and three distractors, i.e. sentences of similar length drawn from
*other* chapters of the same held-out text. The model is scored like any lm-eval multiple-choice
task (log-likelihood of each choice after the passage; ``acc`` sums it, ``acc_norm`` divides by
the choice's length in bytes), so chance is 25%. Telling the true continuation apart needs the
passage (who is speaking, of what, in which tone), which is what pruning damages first.

The JSONL is generated, never committed: :func:`build_austen_cloze` writes it from documents
(:func:`gblm.data.corpus.austen_documents`), :func:`write_task_dir` writes the task YAML (the
template ``gblm/eval/tasks/austen_cloze/austen_cloze.yaml`` with the absolute JSONL path) into a
folder to hand to lm-eval as ``include_path``, and :func:`prepare_austen_cloze` does both once per
content into a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

TASK_NAME = "austen_cloze"
TEMPLATE = Path(__file__).parent / "tasks" / TASK_NAME / f"{TASK_NAME}.yaml"
FORMAT_VERSION = 1  # bump when the item design changes, so cached task folders are rebuilt

N_CHOICES = 4
MIN_ANSWER_WORDS = 8
MAX_ANSWER_WORDS = 40
CONTEXT_WORDS = 80  # the passage grows backwards, sentence by sentence, to at least this many words
MAX_CONTEXT_SENTENCES = 8
LENGTH_RATIO = 1.35  # distractors have between 1/1.35 and 1.35 times the answer's word count

# Abbreviations whose full stop does not end a sentence.
_ABBREVIATIONS = ("Mr", "Mrs", "Dr", "St", "Esq", "Col", "Capt", "Adm", "Gen", "Lt", "Rev", "viz")
_ABBREV = re.compile(r"\b(" + "|".join(_ABBREVIATIONS) + r")\.")
# A sentence ends at . ! or ? (plus closing quotes or brackets) before whitespace and a capital,
# an opening quote or a bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"'\u201d\u2019)]*)\s+(?=[\"'\u201c\u2018(]?[A-Z])")
_HEADING = re.compile(r"^(chapter|volume|book)\b", re.IGNORECASE)


def split_sentences(document: str) -> list[str]:
    """A chapter as a flat list of sentences (headings dropped, whitespace and _italics_ undone)."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", document):
        text = " ".join(paragraph.split()).replace("_", "")
        if not text or (_HEADING.match(text) and len(text.split()) <= 4):
            continue
        text = _ABBREV.sub(lambda match: match.group(1) + "\0", text)
        for sentence in _SENTENCE_END.sub(lambda match: match.group(1) + "\n", text).split("\n"):
            sentence = sentence.replace("\0", ".").strip()
            if sentence:
                sentences.append(sentence)
    return sentences


def _words(sentence: str) -> int:
    return len(sentence.split())


def build_items(documents: Sequence[str], n_items: int = 100, seed: int = 0) -> list[dict]:
    """The cloze items, deterministic in ``(documents, n_items, seed)``.

    Answers are sentences of :data:`MIN_ANSWER_WORDS` to :data:`MAX_ANSWER_WORDS` words with at
    least :data:`CONTEXT_WORDS` words before them in their chapter; items are drawn uniformly over
    all such positions without replacement. Each item is
    ``{"id", "context", "choices", "label", "doc", "sentence"}`` with ``choices[label]`` the true
    next sentence.
    """
    if len(documents) < 2:
        raise ValueError("austen_cloze needs at least two documents (distractors come from others).")
    rng = random.Random(seed)
    sentences = [split_sentences(doc) for doc in documents]
    pool = [(d, s) for d, doc in enumerate(sentences) for s in doc]  # every sentence, by document
    candidates = []
    for d, doc in enumerate(sentences):
        before = 0
        for i, sentence in enumerate(doc):
            if before >= CONTEXT_WORDS and MIN_ANSWER_WORDS <= _words(sentence) <= MAX_ANSWER_WORDS:
                candidates.append((d, i))
            before += _words(sentence)
    if len(candidates) < n_items:
        raise ValueError(f"Only {len(candidates)} usable sentences for {n_items} austen_cloze items.")

    items = []
    for item_id, (d, i) in enumerate(sorted(rng.sample(candidates, n_items))):
        doc = sentences[d]
        start = i
        while start > 0 and i - start < MAX_CONTEXT_SENTENCES:
            start -= 1
            if sum(_words(s) for s in doc[start:i]) >= CONTEXT_WORDS:
                break
        answer = doc[i]
        length = _words(answer)
        similar = [
            s
            for e, s in pool
            if e != d and length / LENGTH_RATIO <= _words(s) <= length * LENGTH_RATIO and s != answer
        ]
        distractors = rng.sample(sorted(set(similar)), N_CHOICES - 1)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append(
            {
                "id": item_id,
                "context": " ".join(doc[start:i]),
                "choices": choices,
                "label": choices.index(answer),
                "doc": d,
                "sentence": i,
            }
        )
    return items


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_austen_cloze(
    documents: Sequence[str], out_path: str | os.PathLike, n_items: int = 100, seed: int = 0
) -> Path:
    """Write :func:`build_items` as JSONL (one item a line) to ``out_path``, atomically."""
    items = build_items(documents, n_items=n_items, seed=seed)
    path = Path(out_path)
    _atomic_write_text(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return path


def write_task_dir(out_dir: str | os.PathLike, jsonl_path: str | os.PathLike) -> Path:
    """Write the task YAML, pointing at ``jsonl_path`` by absolute path, into ``out_dir``.

    Returns ``out_dir``: pass it to lm-eval as ``include_path`` (``eval.zeroshot.include_path``).
    """
    config = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    config["dataset_kwargs"] = {"data_files": {"test": str(Path(jsonl_path).resolve())}}
    out = Path(out_dir)
    _atomic_write_text(out / f"{TASK_NAME}.yaml", yaml.safe_dump(config, sort_keys=False))
    return out


def prepare_austen_cloze(
    documents: Sequence[str], cache_root: str | os.PathLike, n_items: int = 100, seed: int = 0
) -> Path:
    """Build the JSONL and task YAML once per content under ``cache_root``; return the task folder.

    The folder name hashes the documents, ``n_items``, ``seed`` and :data:`FORMAT_VERSION`, so a
    changed corpus or design builds a new folder and an unchanged one is reused.
    """
    digest = hashlib.sha256()
    for part in (str(FORMAT_VERSION), str(n_items), str(seed), TEMPLATE.read_text("utf-8"), *documents):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    task_dir = Path(cache_root) / f"{TASK_NAME}-{digest.hexdigest()[:12]}"
    yaml_path = task_dir / f"{TASK_NAME}.yaml"
    if not yaml_path.exists():
        jsonl = build_austen_cloze(documents, task_dir / f"{TASK_NAME}.jsonl", n_items, seed)
        write_task_dir(task_dir, jsonl)
    return task_dir
