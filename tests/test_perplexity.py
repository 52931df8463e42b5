"""Perplexity: the windowed protocol against a direct loop, and a known answer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gblm.eval.perplexity import perplexity


def test_matches_a_plain_loop_and_drops_the_remainder(tiny_llama):
    tokens = torch.randint(0, 256, (1, 16 * 5 + 7))
    got = perplexity(
        tiny_llama, tokens, 16, device=torch.device("cpu"), batch_size=2, progress=False
    )
    nlls = []
    for s in range(5):
        w = tokens[:, s * 16 : (s + 1) * 16]
        logits = tiny_llama(w).logits
        nlls.append(F.cross_entropy(logits[0, :-1], w[0, 1:]) * 16)
    assert math.isclose(got, math.exp(torch.stack(nlls).sum().item() / (5 * 16)), rel_tol=1e-5)
    one = perplexity(
        tiny_llama, tokens, 16, device=torch.device("cpu"), batch_size=1, progress=False
    )
    assert math.isclose(got, one, rel_tol=1e-5)


def test_uniform_model_has_vocabulary_perplexity():
    class Uniform(torch.nn.Module):
        def forward(self, ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, 50)})()

    ppl = perplexity(
        Uniform(), torch.randint(0, 50, (1, 64)), 8, device=torch.device("cpu"), progress=False
    )
    # mean CE = log 50 over T-1 tokens, times T, over T: exactly 50 (the published T vs T-1 rule).
    assert math.isclose(ppl, 50.0, rel_tol=1e-6)


def test_max_windows_limits_the_work(tiny_llama):
    tokens = torch.randint(0, 256, (1, 64))
    a = perplexity(
        tiny_llama, tokens, 16, device=torch.device("cpu"), max_windows=1, progress=False
    )
    b = perplexity(tiny_llama, tokens[:, :16], 16, device=torch.device("cpu"), progress=False)
    assert math.isclose(a, b, rel_tol=1e-6)
