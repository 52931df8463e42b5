"""The gradient stage's lean loss: bit for bit transformers' ForCausalLMLoss, forward and backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

import gblm.calibration.gradients as gradients_module
from gblm.calibration.gradients import GradientSettings, gradient_norms
from gblm.calibration.loss import lean_causal_lm_loss, lean_loss
from gblm.models.tiny import build_tiny_model, tiny_config

VOCAB = 300


def _logits_and_labels(dtype: torch.dtype, ignored: int = 0):
    gen = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(2, 17, VOCAB, generator=gen)).to(dtype)  # (b, T, vocab)
    labels = torch.randint(0, VOCAB, (2, 17), generator=gen)
    labels[0, :ignored] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ignored", [0, 5])
def test_loss_and_logits_gradient_are_bitwise_the_models_own(dtype, ignored) -> None:
    logits, labels = _logits_and_labels(dtype, ignored)
    results = []
    for loss_fn in (ForCausalLMLoss, lean_causal_lm_loss):
        leaf = logits.clone().requires_grad_()
        loss = loss_fn(logits=leaf, labels=labels, vocab_size=VOCAB)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (ref_loss, ref_grad), (loss, grad) = results
    assert torch.equal(loss, ref_loss)
    assert grad.dtype == dtype and torch.equal(grad, ref_grad)
    # and the gradient is the textbook one: (softmax - onehot) / #scored positions
    probs = torch.softmax(logits.double(), dim=-1)[:, :-1]
    target = labels[:, 1:]
    scored = target != -100
    expected = (probs - torch.nn.functional.one_hot(target.clamp(min=0), VOCAB)) * scored[..., None]
    expected = expected / scored.sum()
    torch.testing.assert_close(
        grad[:, :-1].double(), expected, rtol=0.02 if dtype != torch.float32 else 1e-5, atol=1e-4
    )
    assert not grad[:, -1].any()  # the last position predicts nothing


def test_other_arguments_go_to_transformers_own_function() -> None:
    logits, labels = _logits_and_labels(torch.float32)
    ours = lean_causal_lm_loss(logits, labels, VOCAB, num_items_in_batch=torch.tensor(7))
    assert torch.equal(ours, ForCausalLMLoss(logits, labels, VOCAB, torch.tensor(7)))


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2", "mistral"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradient_norms_identical_to_the_autograd_loss(monkeypatch, arch, norm) -> None:
    model = build_tiny_model(tiny_config(arch, vocab_size=VOCAB), seed=0)
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    seen = []  # the loss function in force while the LM head runs
    handle = model.get_output_embeddings().register_forward_hook(
        lambda *_: seen.append(model.loss_function)
    )
    lean = gradient_norms(model, ids, GradientSettings(norm=norm), progress=False)
    assert seen and all(fn is lean_causal_lm_loss for fn in seen)
    assert model.loss_function is ForCausalLMLoss  # restored
    seen.clear()
    monkeypatch.setattr(gradients_module, "lean_loss", lambda _model: contextlib.nullcontext(False))
    plain = gradient_norms(model, ids, GradientSettings(norm=norm), progress=False)
    handle.remove()
    assert seen and all(fn is ForCausalLMLoss for fn in seen)
    assert set(lean) == set(plain)
    for name in plain:
        assert torch.equal(lean[name], plain[name]), name


def test_lean_loss_swaps_only_the_standard_loss_and_restores_it() -> None:
    model = build_tiny_model(tiny_config("llama", vocab_size=VOCAB), seed=0)
    assert model.loss_function is ForCausalLMLoss
    with lean_loss(model) as active:
        assert active and model.loss_function is lean_causal_lm_loss
    assert model.loss_function is ForCausalLMLoss and "_loss_function" not in vars(model)

    def custom(**kwargs):
        return ForCausalLMLoss(**kwargs)

    model.loss_function = custom
    with lean_loss(model) as active:
        assert not active and model.loss_function is custom
    assert model.loss_function is custom
