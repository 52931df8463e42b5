"""``austen_cloze``: an offline multiple-choice task built from held-out Austen chapters.

Every item is a passage of consecutive sentences from one chapter followed by four candidate next
sentences, the true one and three distractors, scored like any lm-eval multiple-choice task:
the log-likelihood of each choice after the passage, ``acc`` taking the highest sum and
``acc_norm`` the highest sum per byte. Chance is 25%.

The design (:class:`ClozeDesign`), tuned so that the dense SmolLM2-135M is clearly above chance
while 100 items stay cheap on a CPU:

- the answer is a short narrative sentence (6 to 20 words, no quotation marks, so that a stray
  quote cannot give it away) that continues a paragraph, after a passage of at least 40 words;
- the answer names someone or somewhere the passage names (a proper name: a word seen
  capitalised inside sentences and never in lower case), so the item asks "who is this scene
  about", which takes the passage: exactly what a damaged model loses first;
- each distractor is a narrative sentence from another chapter of the same held-out text that
  names someone, but no one the passage names, and whose length is within 10% of the answer's in
  characters, so neither ``acc`` nor ``acc_norm`` can win on length alone.

The JSONL is generated, never committed: :func:`build_austen_cloze` writes it from documents
(:func:`gblm.data.corpus.austen_documents`), :func:`write_task_dir` writes the task YAML (the
template ``gblm/eval/tasks/austen_cloze/austen_cloze.yaml`` with the absolute JSONL path) into a
folder to hand to lm-eval as ``include_path``, :func:`prepare_austen_cloze` does both once per
content into a cache folder, and :func:`ensure_austen_cloze_task` does that for the embedded
corpus.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from gblm.utils import atomic_write_text, content_hash

TASK_NAME = "austen_cloze"
TEMPLATE = Path(__file__).parent / "tasks" / TASK_NAME / f"{TASK_NAME}.yaml"

N_CHOICES = 4
BUILDER_VERSION = 2  # bump when the builder's code changes what it produces: caches rebuild


@dataclass(frozen=True)
class ClozeDesign:
    """How items are drawn; the defaults are the tuned design (see the module docstring)."""

    min_answer_words: int = 6
    max_answer_words: int = 20
    context_words: int = 40  # the passage grows backwards, sentence by sentence, to this many words
    max_context_sentences: int = 6
    length_ratio: float = 1.1  # distractors have 1/ratio to ratio times the answer's characters
    shared_name: bool = True  # the answer names someone or somewhere named in the passage
    other_names: bool = True  # each distractor names someone, and no one the passage names


DEFAULT_DESIGN = ClozeDesign()

# Capitalised words that are not names: titles, and words that start many sentences.
_NOT_NAMES = frozenset(
    "I Mr Mrs Miss Sir Lady Captain Admiral Colonel Dr Lord Esq St Madam Ma'am God Heaven Oh "
    "Christmas Sunday Monday Tuesday Wednesday Thursday Friday Saturday January February March "
    "April May June July August September October November December".split()
)
_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")

# Abbreviations whose full stop does not end a sentence.
_ABBREVIATIONS = ("Mr", "Mrs", "Dr", "St", "Esq", "Col", "Capt", "Adm", "Gen", "Lt", "Rev", "viz")
_ABBREV = re.compile(r"\b(" + "|".join(_ABBREVIATIONS) + r")\.")
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


def split_sentences(document: str) -> list[str]:
    """A chapter as a flat list of sentences."""
    return [s for paragraph in paragraph_sentences(document) for s in paragraph]


def _words(sentence: str) -> int:
    return len(sentence.split())


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


def _names_in(sentence: str, names: frozenset[str]) -> set[str]:
    return {w.removesuffix("'s") for w in _WORD.findall(sentence)} & names


def _distractor_fits(
    sentence: str, answer: str, in_passage: set[str], names: frozenset[str], design: ClozeDesign
) -> bool:
    """Similar length in characters (so neither acc nor acc_norm favours it by length), and with
    ``other_names``, naming someone, but no one the passage names."""
    if sentence == answer:
        return False
    if not len(answer) / design.length_ratio <= len(sentence) <= len(answer) * design.length_ratio:
        return False
    named = _names_in(sentence, names)
    return not design.other_names or (bool(named) and not named & in_passage)


def build_items(
    documents: Sequence[str],
    n_items: int = 100,
    seed: int = 0,
    design: ClozeDesign = DEFAULT_DESIGN,
) -> list[dict]:
    """The cloze items, deterministic in ``(documents, n_items, seed, design)``.

    An answer is a narrative sentence (no quotation marks) of ``min_answer_words`` to
    ``max_answer_words`` words that continues a paragraph (is not its first sentence) and, with
    ``shared_name``, mentions a proper name that its passage mentions too. The passage is the
    sentences before it in the chapter, grown backwards to at least ``context_words`` words (at
    most ``max_context_sentences`` sentences). Candidates are visited in a seeded random order and
    kept while they have enough distractors: narrative sentences from *other* chapters, within a
    factor ``length_ratio`` of the answer's length in characters and, with ``other_names``,
    naming someone but no one the passage names. Each item is
    ``{"id", "context", "choices", "label", "doc", "sentence"}`` with ``choices[label]`` the true
    next sentence (``sentence`` indexes :func:`split_sentences` of document ``doc``).
    """
    if len(documents) < 2:
        raise ValueError(
            "austen_cloze needs at least two documents (distractors come from others)."
        )
    rng = random.Random(seed)
    chapters = [paragraph_sentences(doc) for doc in documents]
    sentences = [[s for paragraph in chapter for s in paragraph] for chapter in chapters]
    names = corpus_names([s for doc in sentences for s in doc])
    candidates = _candidates(chapters, sentences, names, design)
    pool = sorted({(c, s) for c, doc in enumerate(sentences) for s in doc if _is_choice(s, design)})
    picked = _pick(rng, candidates, pool, sentences, names, design, n_items)
    return _make_items(rng, picked, sentences)


def _is_choice(sentence: str, d: ClozeDesign) -> bool:
    """A narrative sentence (no quotation marks) of an answer's length."""
    words = _words(sentence)
    return d.min_answer_words <= words <= d.max_answer_words and not _QUOTES.search(sentence)


def _passage_start(doc: list[str], i: int, d: ClozeDesign) -> int:
    """The first sentence of the passage before sentence ``i``, grown backwards."""
    start = i
    while start > 0 and i - start < d.max_context_sentences:
        start -= 1
        if sum(_words(s) for s in doc[start:i]) >= d.context_words:
            break
    return start


def _candidates(
    chapters: list[list[list[str]]],
    sentences: list[list[str]],
    names: frozenset[str],
    d: ClozeDesign,
) -> list[tuple[int, int, int]]:
    """``(chapter, sentence index, passage start)`` of every sentence that can be an answer."""
    candidates = []
    for c, chapter in enumerate(chapters):
        index = 0
        for paragraph in chapter:
            for k, sentence in enumerate(paragraph):
                start = _passage_start(sentences[c], index, d)
                long_enough = sum(_words(s) for s in sentences[c][start:index]) >= d.context_words
                if k > 0 and long_enough and _is_choice(sentence, d):
                    passage = " ".join(sentences[c][start:index])
                    if not d.shared_name or _names_in(sentence, names) & _names_in(passage, names):
                        candidates.append((c, index, start))
                index += 1
    return candidates


def _pick(
    rng: random.Random,
    candidates: list[tuple[int, int, int]],
    pool: list[tuple[int, str]],
    sentences: list[list[str]],
    names: frozenset[str],
    d: ClozeDesign,
    n_items: int,
) -> list[tuple[int, int, int, list[str]]]:
    """Visit the candidates in a seeded random order; keep those with enough distractors."""
    picked: list[tuple[int, int, int, list[str]]] = []
    for c, i, start in rng.sample(candidates, len(candidates)):
        answer = sentences[c][i]
        in_passage = _names_in(" ".join(sentences[c][start:i]), names)
        similar = sorted(
            {s for e, s in pool if e != c and _distractor_fits(s, answer, in_passage, names, d)}
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
    return picked


def _make_items(
    rng: random.Random, picked: list[tuple[int, int, int, list[str]]], sentences: list[list[str]]
) -> list[dict]:
    """The items of the picked answers, in document order, with shuffled seeded distractors."""
    items = []
    for item_id, (c, i, start, similar) in enumerate(sorted(picked, key=lambda p: p[:2])):
        answer = sentences[c][i]
        choices = [answer, *rng.sample(similar, N_CHOICES - 1)]
        rng.shuffle(choices)
        items.append(
            {
                "id": item_id,
                "context": " ".join(sentences[c][start:i]),
                "choices": choices,
                "label": choices.index(answer),
                "doc": c,
                "sentence": i,
            }
        )
    return items


def build_austen_cloze(
    documents: Sequence[str],
    out_path: str | os.PathLike,
    n_items: int = 100,
    seed: int = 0,
    design: ClozeDesign = DEFAULT_DESIGN,
) -> Path:
    """Write :func:`build_items` as JSONL (one item a line) to ``out_path``, atomically."""
    items = build_items(documents, n_items=n_items, seed=seed, design=design)
    path = Path(out_path)
    atomic_write_text(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return path


def write_task_dir(out_dir: str | os.PathLike, jsonl_path: str | os.PathLike) -> Path:
    """Write the task YAML, pointing at ``jsonl_path`` by absolute path, into ``out_dir``.

    Returns ``out_dir``: pass it to lm-eval as ``include_path`` (``eval.zeroshot.include_path``).
    """
    config = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    config["dataset_kwargs"] = {"data_files": {"test": str(Path(jsonl_path).resolve())}}
    out = Path(out_dir)
    atomic_write_text(out / f"{TASK_NAME}.yaml", yaml.safe_dump(config, sort_keys=False))
    return out


def export_task(task_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a built task (its JSONL) into ``out_dir`` with a YAML pointing at the copy.

    The run keeps its task beside its results (``<run dir>/lm_eval_tasks``), so that
    ``lm_eval --include_path <run dir>/lm_eval_tasks --tasks austen_cloze`` evaluates the same
    items later, without gblm or its cache. Returns ``out_dir``.
    """
    out = Path(out_dir)
    source = Path(task_dir) / f"{TASK_NAME}.jsonl"
    jsonl = out / f"{TASK_NAME}.jsonl"
    atomic_write_text(jsonl, source.read_text(encoding="utf-8"))
    return write_task_dir(out, jsonl)


def prepare_austen_cloze(
    documents: Sequence[str],
    cache_root: str | os.PathLike,
    n_items: int = 100,
    seed: int = 0,
    design: ClozeDesign = DEFAULT_DESIGN,
) -> Path:
    """Build the JSONL and task YAML once per content under ``cache_root``; return the task folder.

    The folder name hashes the documents, ``n_items``, ``seed``, the design, the YAML template and
    :data:`BUILDER_VERSION`, so a changed corpus or design builds a new folder and an unchanged
    one is reused.
    """
    key = {
        "builder_version": BUILDER_VERSION,
        "design": asdict(design),
        "n_items": n_items,
        "seed": seed,
        "template": TEMPLATE.read_text("utf-8"),
        "documents": list(documents),
    }
    task_dir = Path(cache_root) / f"{TASK_NAME}-{content_hash(key, length=12)}"
    yaml_path = task_dir / f"{TASK_NAME}.yaml"
    if not yaml_path.exists():
        jsonl = task_dir / f"{TASK_NAME}.jsonl"
        build_austen_cloze(documents, jsonl, n_items, seed, design)
        write_task_dir(task_dir, jsonl)
    return task_dir


def ensure_austen_cloze_task(
    cache_root: str | os.PathLike | None = None,
    n_items: int = 100,
    seed: int = 0,
    split: str = "test",
) -> Path:
    """The task folder for the embedded corpus's held-out Austen chapters, built on first use.

    ``cache_root`` defaults to ``<cache>/tasks`` (:func:`gblm.paths.cache_dir`); ``split`` is the
    corpus split the passages and distractors come from (the held-out novel by default).
    """
    from gblm.data.corpus import austen_documents
    from gblm.paths import cache_dir

    root = Path(cache_root) if cache_root is not None else cache_dir() / "tasks"
    return prepare_austen_cloze(austen_documents(split), root, n_items=n_items, seed=seed)
