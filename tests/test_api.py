"""The Python API: gblm.prune and gblm.evaluate give what the stages they wrap give."""

from __future__ import annotations

import copy

import pytest
import torch

import gblm
from gblm.calibration.sequential import prune_model
from gblm.data.calibration import sample_windows
from gblm.eval.perplexity import perplexity
from gblm.methods.base import RunContext
from gblm.methods.registry import build_method
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def same_masks(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gblm"])
def test_prune_gives_the_walks_masks(tiny_llama, method):
    reference = copy.deepcopy(tiny_llama)
    pruner = build_method(method)
    pruner.prepare(reference, WINDOWS, RunContext(torch.device("cpu"), torch.float32))
    expected = prune_model(reference, pruner, Sparsity(0.5), WINDOWS, device="cpu")
    calibration = None if method == "magnitude" else WINDOWS
    result = gblm.prune(tiny_llama, method=method, sparsity=0.5, calibration=calibration,
                        progress=False)  # fmt: skip
    assert same_masks(result.masks, expected)
    assert all(torch.equal(a, b) for a, b in zip(tiny_llama.parameters(), reference.parameters()))
    assert result.overall["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len(result.per_linear) == len(expected) and "prune" in result.seconds
    if method == "gblm":
        assert "gradients" in result.seconds


@pytest.mark.parametrize("sampling", [None, "stream", "documents"])
def test_calibration_texts_are_drawn_as_the_run_draws_them(tokenizer, sampling):
    """By default as a run with the schema's calibration.sampling (stream), else as asked."""
    from gblm.config import CalibrationSettings

    texts = [" ".join(f"word{i} of line {j}." for i in range(40)) for j in range(30)]
    drawn = sampling or CalibrationSettings.sampling
    windows = sample_windows(tokenizer, texts, 4, 32, seed=3, sampling=drawn)
    model = build_tiny_model(tiny_config("llama", vocab_size=len(tokenizer)), seed=0)
    reference = copy.deepcopy(model)
    expected = prune_model(reference, build_method("wanda"), Sparsity(0.5), windows, device="cpu")
    given = {"sampling": sampling} if sampling else {}
    result = gblm.prune(model, tokenizer, method="wanda", calibration=texts, nsamples=4,
                        seqlen=32, seed=3, progress=False, **given)  # fmt: skip
    assert same_masks(result.masks, expected)


def test_wikitext2_rows_can_be_drawn_as_calibration_wikitext2_draws_them(tokenizer):
    """A run's calibration=wikitext2 joins the rows with a space (the published loaders), not
    the blank line of the other stream sources: separator=" " gives the run's windows and masks."""
    from gblm.data.sources import calibration_separator

    rows = [" ".join(f"word{i} of row {j}." for i in range(12)) for j in range(40)]
    run_windows = sample_windows(tokenizer, rows, 4, 32, seed=0, sampling="stream",
                                 separator=calibration_separator("wikitext2"))  # fmt: skip
    assert not torch.equal(run_windows, sample_windows(tokenizer, rows, 4, 32, sampling="stream"))
    model = build_tiny_model(tiny_config("llama", vocab_size=len(tokenizer)), seed=0)
    reference = copy.deepcopy(model)
    expected = prune_model(
        reference, build_method("wanda"), Sparsity(0.5), run_windows, device="cpu"
    )
    result = gblm.prune(model, tokenizer, method="wanda", calibration=rows, nsamples=4, seqlen=32,
                        separator=" ", progress=False)  # fmt: skip
    assert same_masks(result.masks, expected)


def test_nm_pattern_per_block_ratios_and_options(tiny_llama):
    nm = gblm.prune(copy.deepcopy(tiny_llama), method="wanda", sparsity="2:4",
                    calibration=WINDOWS, progress=False)  # fmt: skip
    assert all(row["nm_valid"] for row in nm.per_linear)
    ratios = [0.3, 0.6]  # the tiny model has two decoder blocks
    per_block = gblm.prune(copy.deepcopy(tiny_llama), method="magnitude", sparsity=ratios,
                           options={"comparison_group": "row"}, progress=False)  # fmt: skip
    assert [b["sparsity"] for b in per_block.per_block] == pytest.approx(ratios, abs=0.01)


def test_bad_calls_say_what_is_missing(tiny_llama):
    with pytest.raises(ValueError, match="needs calibration"):
        gblm.prune(tiny_llama, method="wanda", progress=False)
    with pytest.raises(ValueError, match="'N:M'"):
        gblm.prune(tiny_llama, method="magnitude", sparsity="half", progress=False)
    with pytest.raises(ValueError, match="need the tokenizer"):
        gblm.prune(tiny_llama, method="wanda", calibration=["some text"], progress=False)
    with pytest.raises(Exception, match="nrom"):
        gblm.prune(tiny_llama, method="gblm", calibration=WINDOWS, options={"nrom": "l2"})


def test_token_ids_outside_the_vocabulary_are_refused_before_the_model_runs(tiny_llama):
    """An id the embedding has no row for was an IndexError from inside the walk (on a GPU, a
    device-side assert that spoils the process's CUDA context)."""
    high = WINDOWS.clone()
    high[0, 3] = 256  # the tiny model's vocabulary is 256
    with pytest.raises(
        ValueError, match=r"calibration: token ids must lie in \[0, 256\).*found \d+\.\.256\."
    ):
        gblm.prune(tiny_llama, method="wanda", calibration=high, progress=False)
    negative = torch.full((1, 64), -1)
    with pytest.raises(
        ValueError, match=r"data: token ids must lie in \[0, 256\).*found -1\.\.-1\."
    ):
        gblm.evaluate(tiny_llama, data=negative, seqlen=32, progress=False)


def test_evaluate_is_the_runs_perplexity(tiny_llama):
    tokens = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    expected = perplexity(tiny_llama, tokens, 32, device=torch.device("cpu"), progress=False)
    assert gblm.evaluate(tiny_llama, data=tokens, seqlen=32, progress=False) == expected
    assert "gblm" in gblm.method_names()


def test_prune_onloaded_gives_the_same_masks(tiny_llama):
    reference = copy.deepcopy(tiny_llama)
    expected = gblm.prune(reference, calibration=WINDOWS, progress=False)
    result = gblm.prune(tiny_llama, calibration=WINDOWS, progress=False, onload=True)
    assert same_masks(result.masks, expected.masks)
    assert all(torch.equal(a, b) for a, b in zip(tiny_llama.parameters(), reference.parameters()))


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        ({"max_windows": -1}, "max_windows=-1: allowed values are an integer >= 1"),
        ({"max_windows": 0}, "max_windows=0: allowed values are an integer >= 1"),
        ({"seqlen": 0}, "seqlen=0: allowed values are an integer >= 2"),
        ({"seqlen": 1}, "seqlen=1: allowed values are an integer >= 2"),
        ({"batch_size": 0}, "batch_size=0: allowed values are an integer >= 1"),
    ],
)
def test_evaluate_refuses_bad_arguments_instead_of_a_wrong_perplexity(
    tiny_llama, arguments, needle
):
    # max_windows=-1 was a perplexity of 1.0 (no window, a sum of nothing); the others a
    # ZeroDivisionError, a NaN perplexity or a message blaming the text's length
    tokens = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=needle):
        gblm.evaluate(tiny_llama, data=tokens, **{"seqlen": 32, **arguments}, progress=False)


def test_options_of_a_plugin_that_takes_none_are_refused(tiny_llama):
    # reconstruct="none" dropped its options without a word (no ADMM ran), "dense" failed
    # with an AttributeError, "2:0" with a ZeroDivisionError
    before = [p.detach().clone() for p in tiny_llama.parameters()]
    with pytest.raises(ValueError, match=r"reconstruct.iters=5: reconstruct=none takes no option"):
        gblm.prune(tiny_llama, method="wanda", calibration=WINDOWS, progress=False,
                   reconstruct_options={"iters": 5})  # fmt: skip
    with pytest.raises(ValueError, match="method=dense prunes nothing"):
        gblm.prune(tiny_llama, method="dense", calibration=WINDOWS, progress=False)
    with pytest.raises(ValueError, match="0 < N < M"):
        gblm.prune(tiny_llama, method="magnitude", sparsity="2:0", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_llama.parameters()))


def test_evaluate_a_model_in_training_mode_runs_without_dropout():
    tokens = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    model = build_tiny_model(tiny_config("opt", vocab_size=256), seed=0)  # OPT: dropout 0.1
    expected = gblm.evaluate(model, data=tokens, seqlen=32, progress=False)
    model.train()  # e.g. just fine-tuned
    assert gblm.evaluate(model, data=tokens, seqlen=32, progress=False) == expected
    assert model.training  # left as found
