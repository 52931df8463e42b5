"""``austen_cloze``: an offline multiple-choice task built from held-out Austen chapters.

Each item is a passage of consecutive sentences of one chapter and four candidate next sentences,
the true one and three distractors, scored like any lm-eval multiple-choice task (chance 25%).
The answer is a short narrative sentence (no quotation marks) that continues a paragraph and names
someone the passage names, so the item takes the passage: what a damaged model loses first. Each
distractor is a narrative sentence of another chapter that names someone, but no one the passage
names, within 10% of the answer's length in characters, so neither ``acc`` nor ``acc_norm`` can
win on length alone. The task folder (the JSONL and the YAML of
``gblm/eval/tasks/austen_cloze/austen_cloze.yaml``) is generated, never committed, and handed to
lm-eval as ``include_path``.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from gblm.data.corpus import austen_documents
from gblm.paths import cache_dir
from gblm.utils import atomic_write_text, content_hash

TASK_NAME = "austen_cloze"
TEMPLATE = Path(__file__).parent / "tasks" / TASK_NAME / f"{TASK_NAME}.yaml"
N_CHOICES = 4
BUILDER_VERSION = 2  # bump when the builder's code changes what it produces: caches rebuild
MIN_WORDS, MAX_WORDS = 6, 20  # an answer's (and a distractor's) words
CONTEXT_WORDS, MAX_CONTEXT_SENTENCES = 40, 6  # the passage grows backwards to this many words
LENGTH_RATIO = 1.1  # distractors have 1/ratio to ratio times the answer's characters

# Capitalised words that are not names: titles, and words that start many sentences.
_NOT_NAMES = frozenset(
    "I Mr Mrs Miss Sir Lady Captain Admiral Colonel Dr Lord Esq St Madam Ma'am God Heaven Oh "
    "Christmas Sunday Monday Tuesday Wednesday Thursday Friday Saturday January February March "
    "April May June July August September October November December".split()
)
_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
# Abbreviations whose full stop does not end a sentence.
_ABBREV = re.compile(r"\b(Mr|Mrs|Dr|St|Esq|Col|Capt|Adm|Gen|Lt|Rev|viz)\.")
# A sentence ends at . ! or ? (plus closing quotes or brackets) before whitespace and a capital,
# an opening quote or a bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"'\u201d\u2019)]*)\s+(?=[\"'\u201c\u2018(]?[A-Z])")
_QUOTES = re.compile('["\u201c\u201d]')
_HEADING = re.compile(r"^(chapter|volume|book)\b", re.IGNORECASE)


def paragraph_sentences(document: str) -> list[list[str]]:
    """A chapter as paragraphs of sentences (headings dropped, whitespace and _italics_ undone)."""
    paragraphs: list[list[str]] = []
    for paragraph in re.split(r"\n\s*\n", document):
        text = " ".join(paragraph.split()).replace("_", "")
        if not text or (_HEADING.match(text) and len(text.split()) <= 4):
            continue
        text = _ABBREV.sub(lambda match: match.group(1) + "\0", text)
        marked = _SENTENCE_END.sub(lambda match: match.group(1) + "\n", text)
        sentences = [s.replace("\0", ".").strip() for s in marked.split("\n")]
        paragraphs.append([s for s in sentences if s])
    return paragraphs


def corpus_names(sentences: Sequence[str]) -> frozenset[str]:
    """Proper names of a text: words seen capitalised inside sentences and never in lower case."""
    capitalised, lower = set(), set()
    for sentence in sentences:
        for k, word in enumerate(_WORD.findall(sentence)):
            word = word.removesuffix("'s")
            if word[0].islower():
                lower.add(word.lower())
            elif k > 0:
                capitalised.add(word)
    return frozenset(w for w in capitalised if w.lower() not in lower and w not in _NOT_NAMES)


def _words(sentences: Sequence[str]) -> int:
    return sum(len(s.split()) for s in sentences)


def _is_choice(sentence: str) -> bool:
    """A narrative sentence (no quotation marks) of an answer's length."""
    return MIN_WORDS <= _words([sentence]) <= MAX_WORDS and not _QUOTES.search(sentence)


def build_items(documents: Sequence[str], n_items: int = 100, seed: int = 0) -> list[dict]:
    """The cloze items, deterministic in ``(documents, n_items, seed)``.

    Candidate answers are visited in a seeded random order and kept while they have at least three
    distractors. Each item is ``{"id", "context", "choices", "label", "doc", "sentence"}`` with
    ``choices[label]`` the true next sentence, sentence ``sentence`` of document ``doc``.
    """
    if len(documents) < 2:
        raise ValueError(
            "austen_cloze needs at least two documents (distractors come from others)."
        )
    rng = random.Random(seed)
    chapters = [paragraph_sentences(doc) for doc in documents]
    sentences = [[s for paragraph in chapter for s in paragraph] for chapter in chapters]
    names = corpus_names([s for doc in sentences for s in doc])

    def named(text: str) -> set[str]:
        return {w.removesuffix("'s") for w in _WORD.findall(text)} & names

    candidates = []  # (chapter, sentence index, passage start) of every possible answer
    for c, chapter in enumerate(chapters):
        index = 0
        for paragraph in chapter:
            for k, sentence in enumerate(paragraph):
                start = index  # the passage grows backwards to CONTEXT_WORDS words
                while start > 0 and index - start < MAX_CONTEXT_SENTENCES:
                    start -= 1
                    if _words(sentences[c][start:index]) >= CONTEXT_WORDS:
                        break
                passage = sentences[c][start:index]
                if k > 0 and _words(passage) >= CONTEXT_WORDS and _is_choice(sentence):
                    if named(sentence) & named(" ".join(passage)):
                        candidates.append((c, index, start))
                index += 1
    pool = sorted({(c, s) for c, doc in enumerate(sentences) for s in doc if _is_choice(s)})
    pool_names = {s: named(s) for _, s in pool}
    picked = []
    for c, i, start in rng.sample(candidates, len(candidates)):
        answer, in_passage = sentences[c][i], named(" ".join(sentences[c][start:i]))
        similar = sorted(
            s
            for s in {s for e, s in pool if e != c and s != answer}
            if len(answer) / LENGTH_RATIO <= len(s) <= len(answer) * LENGTH_RATIO
            and pool_names[s]
            and not pool_names[s] & in_passage
        )
        if len(similar) >= N_CHOICES - 1:
            picked.append((c, i, start, similar))
            if len(picked) == n_items:
                break
    if len(picked) < n_items:
        raise ValueError(
            f"Only {len(picked)} usable sentences for {n_items} austen_cloze items; "
            "use fewer items or more documents."
        )
    items = []  # in document order, the distractors drawn and shuffled with the seed
    for item_id, (c, i, start, similar) in enumerate(sorted(picked, key=lambda p: p[:2])):
        answer = sentences[c][i]
        choices = [answer, *rng.sample(similar, N_CHOICES - 1)]
        rng.shuffle(choices)
        context = " ".join(sentences[c][start:i])
        items.append({"id": item_id, "context": context, "choices": choices,
                      "label": choices.index(answer), "doc": c, "sentence": i})  # fmt: skip
    return items


def _write_task(folder: Path, jsonl: str) -> Path:
    """The items (JSONL text) and the task YAML pointing at them by absolute path, in ``folder``."""
    config = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    data = atomic_write_text(folder / f"{TASK_NAME}.jsonl", jsonl)
    config["dataset_kwargs"] = {"data_files": {"test": str(data.resolve())}}
    atomic_write_text(folder / f"{TASK_NAME}.yaml", yaml.safe_dump(config, sort_keys=False))
    return folder


def prepare_austen_cloze(
    documents: Sequence[str], cache_root: str | os.PathLike, n_items: int = 100, seed: int = 0
) -> Path:
    """The task folder under ``cache_root``, built once per content (the documents, ``n_items``,
    ``seed``, the design, the YAML template and :data:`BUILDER_VERSION` name it)."""
    key = {
        "builder_version": BUILDER_VERSION,
        "design": [MIN_WORDS, MAX_WORDS, CONTEXT_WORDS, MAX_CONTEXT_SENTENCES, LENGTH_RATIO],
        "n_items": n_items,
        "seed": seed,
        "template": TEMPLATE.read_text("utf-8"),
        "documents": list(documents),
    }
    task_dir = Path(cache_root) / f"{TASK_NAME}-{content_hash(key, length=12)}"
    if not (task_dir / f"{TASK_NAME}.yaml").exists():
        items = build_items(documents, n_items=n_items, seed=seed)
        _write_task(task_dir, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    return task_dir


def export_task(task_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A copy of a built task in ``out_dir`` (``<run dir>/lm_eval_tasks``), so that ``lm_eval
    --include_path <run dir>/lm_eval_tasks --tasks austen_cloze`` scores the same items later,
    without gblm or its cache."""
    return _write_task(Path(out_dir), Path(task_dir, f"{TASK_NAME}.jsonl").read_text("utf-8"))


def ensure_austen_cloze_task(n_items: int = 100) -> Path:
    """The task folder of the corpus's held-out Austen chapters, in ``<cache>/tasks``."""
    return prepare_austen_cloze(austen_documents("test"), cache_dir() / "tasks", n_items=n_items)
