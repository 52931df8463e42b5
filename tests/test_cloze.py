"""austen_cloze: the item builder, the lm-eval task, and zero-shot evaluation of a live model."""

from __future__ import annotations

import json
import random
import re
import textwrap

import pytest

from gblm.eval.cloze import (
    CONTEXT_WORDS,
    N_CHOICES,
    TASK_NAME,
    build_items,
    export_task,
    paragraph_sentences,
    prepare_austen_cloze,
)
from gblm.eval.zeroshot import TASKS_KEY, check_tasks, summarize_results, zeroshot_eval

WORDS = (
    "the a lady house letter walk garden morning evening sister friend visit could would".split()
)
NAMES = tuple(
    "Anne Elizabeth Mary Charles Frederick Henrietta Louisa Walter Russell Harville Benwick Croft "
    "Clay Smith Shepherd Musgrove Wentworth Elliot Hayter Dalrymple Carteret Rooke Atkinson".split()
)


def fake_documents(n_docs: int = 4, seed: int = 0) -> list[str]:
    """Chapters of random prose: a heading, paragraphs of 3 to 7 sentences, some dialogue."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        paragraphs = [f"Chapter {d + 1}"]
        for _ in range(12):
            sentences = []
            for _ in range(rng.randint(3, 7)):
                words = rng.choices(WORDS, k=rng.randint(5, 24))
                words.insert(rng.randrange(1, len(words)), rng.choice(NAMES))
                sentence = " ".join([rng.choice(NAMES), *words]) + rng.choice(".!?")
                if rng.random() < 0.2:
                    sentence = f'"{sentence}" said Mr. {rng.choice(NAMES)}.'
                sentences.append(sentence)
            # hard-wrapped lines, like the novels' text
            text = " ".join(sentences)
            paragraphs.append(textwrap.fill(text, 70))
        docs.append("\n\n".join(paragraphs))
    return docs


def split_sentences(doc: str) -> list[str]:
    return [s for paragraph in paragraph_sentences(doc) for s in paragraph]


def test_split_sentences_keeps_titles_and_quotes_together():
    doc = (
        "Chapter 3\n\nMr. Elliot came in. Anne looked up;\nshe was glad!  "
        '"Is it you?" said she. "I hoped so." Mrs. Smith smiled.\n\nA new _very_ short paragraph.'
    )
    assert split_sentences(doc) == [
        "Mr. Elliot came in.",
        "Anne looked up; she was glad!",
        '"Is it you?" said she.',
        '"I hoped so."',
        "Mrs. Smith smiled.",
        "A new very short paragraph.",
    ]


def test_builder_is_deterministic_and_well_formed():
    docs = fake_documents()
    items = build_items(docs, n_items=30, seed=0)
    assert items == build_items(docs, n_items=30, seed=0)
    assert items != build_items(docs, n_items=30, seed=1)

    assert len(items) == 30 and [it["id"] for it in items] == list(range(30))
    sentences = [split_sentences(doc) for doc in docs]
    labels = set()
    for item in items:
        assert set(item) == {"id", "context", "choices", "label", "doc", "sentence"}
        assert len(item["choices"]) == N_CHOICES and len(set(item["choices"])) == N_CHOICES
        answer = sentences[item["doc"]][item["sentence"]]
        assert item["choices"].count(answer) == 1 and item["choices"][item["label"]] == answer
        # the passage is the sentences right before the answer, in the same chapter
        assert item["context"].endswith(sentences[item["doc"]][item["sentence"] - 1])
        assert len(item["context"].split()) >= CONTEXT_WORDS
        # the answer names someone the passage names
        words = set(re.findall(r"\w+", answer)) & set(re.findall(r"\w+", item["context"]))
        assert words & set(NAMES)
        for k, choice in enumerate(item["choices"]):
            if k != item["label"]:
                assert choice not in sentences[item["doc"]]  # distractors come from other chapters
                named = set(re.findall(r"\w+", choice)) & set(NAMES)
                assert named and not named & set(re.findall(r"\w+", item["context"]))
            assert '"' not in choice
        labels.add(item["label"])
    assert labels == set(range(N_CHOICES))  # the shuffle puts the answer everywhere

    with pytest.raises(ValueError, match="two documents"):
        build_items(docs[:1], n_items=5)
    with pytest.raises(ValueError, match="usable sentences"):
        build_items(docs, n_items=10_000)


def test_prepare_caches_by_content(tmp_path):
    docs = fake_documents()
    first = prepare_austen_cloze(docs, tmp_path, n_items=10, seed=0)
    stamp = (first / f"{TASK_NAME}.jsonl").stat().st_mtime_ns
    assert prepare_austen_cloze(docs, tmp_path, n_items=10, seed=0) == first
    assert (first / f"{TASK_NAME}.jsonl").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert prepare_austen_cloze(docs, tmp_path, n_items=10, seed=1) != first


def test_task_loads_through_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    task_dir = prepare_austen_cloze(fake_documents(), tmp_path, n_items=12)
    jsonl = task_dir / f"{TASK_NAME}.jsonl"
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    assert TASK_NAME in manager.all_tasks
    task = manager.load([TASK_NAME])["tasks"][TASK_NAME]
    docs = list(task.test_docs())
    assert len(docs) == 12
    first = json.loads(jsonl.read_text().splitlines()[0])
    assert task.doc_to_text(docs[0]) == first["context"]
    assert task.doc_to_choice(docs[0]) == first["choices"]
    assert task.doc_to_target(docs[0]) == first["label"]

    check_tasks([TASK_NAME], manager)
    with pytest.raises(ValueError, match=TASKS_KEY) as err:
        check_tasks(["austen_clozee"], manager)
    assert "austen_cloze" in str(err.value)


def test_zeroshot_eval_runs_a_tiny_model(tmp_path, tokenizer):
    from gblm.models.tiny import build_tiny_model, tiny_config

    model = build_tiny_model(tiny_config("llama", vocab_size=len(tokenizer)), seed=0)
    task_dir = prepare_austen_cloze(fake_documents(), tmp_path / "cache", n_items=20)
    result = zeroshot_eval(
        model, tokenizer, [TASK_NAME], limit=5, include_path=task_dir,
        results_dir=tmp_path / "run", log_samples=True,
    )  # fmt: skip
    row = result[TASK_NAME]
    assert row["samples"] == 5
    assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
    assert row["acc_stderr"] > 0 and row["acc_norm_stderr"] > 0  # every metric and its stderr
    assert result["mean_acc"] == row["acc"] and result["mean_acc_norm"] == row["acc_norm"]
    assert not model.training
    # lm-eval's own output is kept: the results JSON and the per-item log
    kept = json.loads((tmp_path / "run" / "lm_eval_results.json").read_text())
    assert kept["results"][TASK_NAME]["acc,none"] == row["acc"]
    items = (tmp_path / "run" / f"lm_eval_samples_{TASK_NAME}.jsonl").read_text().splitlines()
    assert len(items) == 5
    # the exported task folder evaluates the same items, without the cache it came from
    exported = export_task(task_dir, tmp_path / "run" / "lm_eval_tasks")
    again = zeroshot_eval(model, tokenizer, [TASK_NAME], limit=5, include_path=exported)
    assert again[TASK_NAME] == row


def test_summarize_results_drops_groups_and_falls_back_to_acc():
    results = {
        "results": {
            "ai2_arc": {"acc,none": 0.5, "acc_norm,none": 0.5},
            "arc_easy": {"acc,none": 0.6, "acc_norm,none": 0.7, "acc_stderr,none": 0.01},
            "arc_challenge": {"acc,none": 0.4, "acc_norm,none": 0.3},
            "boolq": {"acc,none": 0.8, "acc_stderr,none": "N/A"},
        },
        "groups": {"ai2_arc": {}},
        "n-samples": {"boolq": {"original": 10, "effective": 10}},
    }
    summary = summarize_results(results)
    assert set(summary) == {"arc_easy", "arc_challenge", "boolq", "mean_acc", "mean_acc_norm"}
    assert summary["boolq"] == {"acc": 0.8, "acc_norm": 0.8, "acc_norm_is_acc": True, "samples": 10}
    assert summary["arc_easy"]["acc_stderr"] == 0.01
    assert summary["mean_acc"] == pytest.approx(0.6)
    assert summary["mean_acc_norm"] == pytest.approx(0.6)


def test_summarize_results_keeps_a_task_without_accuracy_out_of_the_means():
    """A task scored by perplexity keeps its metrics; the means are over the tasks with an acc."""
    results = {
        "results": {
            "boolq": {"acc,none": 0.8},
            "wikitext": {"word_perplexity,none": 40.5, "bits_per_byte,none": 0.9},
        },
        "n-samples": {"wikitext": {"original": 62, "effective": 62}},
    }
    summary = summarize_results(results)
    assert summary["wikitext"] == {"word_perplexity": 40.5, "bits_per_byte": 0.9, "samples": 62}
    assert summary["mean_acc"] == summary["mean_acc_norm"] == pytest.approx(0.8)
    only = summarize_results({"results": {"wikitext": {"word_perplexity,none": 40.5}}})
    assert only == {"wikitext": {"word_perplexity": 40.5}}


@pytest.mark.slow
def test_dense_smollm2_is_clearly_above_chance():
    """The embedded SmolLM2 on the 100 held-out items (chance 25%; measured acc 0.58, acc_norm
    0.62; the evaluation takes about 2 minutes on 2 idle CPU cores, 6.5 on busy ones)."""
    import torch

    from gblm.eval.cloze import ensure_austen_cloze_task
    from gblm.models.loading import ModelSpec, load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec())
    model = load_model(ModelSpec(), torch.device("cpu"), torch.float32, tokenizer)
    task_dir = ensure_austen_cloze_task()
    result = zeroshot_eval(model, tokenizer, [TASK_NAME], include_path=task_dir, batch_size=8)
    assert result[TASK_NAME]["samples"] == 100
    assert result[TASK_NAME]["acc"] >= 0.45 and result[TASK_NAME]["acc_norm"] >= 0.45, result


def test_validate_task_names_knows_the_generated_task():
    from gblm.eval.zeroshot import validate_task_names

    validate_task_names([TASK_NAME])  # generated on demand: no include path, no index built
    with pytest.raises(ValueError, match=f"{TASKS_KEY} is empty"):
        validate_task_names([])


def test_zeroshot_scores_without_a_bos_like_the_published_harness(tmp_path, tokenizer):
    """Wanda's eval_zero_shot (which GBLM-Pruner's numbers follow) tokenizes every request with
    add_special_tokens=False; lm-eval >= 0.4.10 instead leaves it to the tokenizer, and a LLaMA
    tokenizer prepends its BOS. Here SmolLM2's tokenizer is made to add one, as LLaMA's does."""
    import copy

    from gblm.models.tiny import build_tiny_model, tiny_config

    bos_tokenizer = copy.deepcopy(tokenizer)
    bos_tokenizer.add_bos_token = True
    assert bos_tokenizer("Anne")["input_ids"][0] == bos_tokenizer.bos_token_id
    model = build_tiny_model(tiny_config("llama", vocab_size=len(tokenizer)), seed=0)
    firsts: list[int] = []
    model.register_forward_pre_hook(lambda module, args: firsts.extend(args[0][:, 0].tolist()))
    task_dir = prepare_austen_cloze(fake_documents(), tmp_path / "cache", n_items=8)
    zeroshot_eval(model, bos_tokenizer, [TASK_NAME], limit=2, include_path=task_dir)
    assert firsts and bos_tokenizer.bos_token_id not in firsts
