"""The next-token loss of the gradient stage, bit for bit the model's own, with a leaner backward.

A causal LM in transformers computes its loss with ``ForCausalLMLoss``: logits cast to fp32,
labels shifted by one (the last position ignored), then ``cross_entropy`` with mean reduction,
which is ``nll_loss(log_softmax(logits))``. Under autograd its backward holds three (T, vocab)
fp32 buffers at once: the saved log-probabilities, the gradient ``nll_loss`` hands back (zeros
but for one entry per row) and the gradient of the logits. That is one buffer more than the
forward ever held (logits and log-probabilities), so for a large vocabulary the backward, not the
forward, sets the stage's peak.

:func:`lean_causal_lm_loss` runs the same two ATen kernels forward and the same two backward, so
loss and gradients are identical to the bit, but on the CPU the logits gradient is written over
the ``nll_loss`` gradient (``_log_softmax_backward_data`` reads each entry of it once, after
summing its row, before writing that entry), so the backward holds no more than the forward did.
On other devices the kernels run as autograd runs them (no aliasing, which is untested there).

:func:`lean_loss` swaps it in for a model's own ``loss_function`` for the duration of a block,
only where that function is transformers' ``ForCausalLMLoss`` (others are left alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100
_MEAN = 1  # ATen's reduction code for "mean"


class _CrossEntropy(torch.autograd.Function):
    """``cross_entropy(logits, target, ignore_index, reduction="mean")`` for (rows, vocab) fp32."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
        log_probs = torch.log_softmax(logits, dim=1, dtype=logits.dtype)  # (rows, vocab)
        loss, total_weight = torch.ops.aten.nll_loss_forward(
            log_probs, target, None, _MEAN, ignore_index
        )
        ctx.save_for_backward(log_probs, target, total_weight)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        log_probs, target, total_weight = ctx.saved_tensors
        grad = torch.ops.aten.nll_loss_backward(
            grad_loss, log_probs, target, None, _MEAN, ctx.ignore_index, total_weight
        )  # (rows, vocab)
        backward = torch.ops.aten._log_softmax_backward_data
        if grad.device.type == "cpu":
            backward.out(grad, log_probs, 1, log_probs.dtype, out=grad)  # in place, see module doc
        else:
            grad = backward(grad, log_probs, 1, log_probs.dtype)
        return grad, None, None


def lean_causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """transformers' ``ForCausalLMLoss`` (same arguments, same result) with the lean backward.

    Args:
        logits: (b, T, vocab) in any float dtype; cast to fp32 as the model's loss does.
        labels: (b, T) token ids; position t is scored on label t + 1, the last ignored.
        vocab_size: the logits' last dimension.
        num_items_in_batch, shift_labels, kwargs: handled by transformers' own function (the
            gradient stage passes none of them).
    """
    if num_items_in_batch is not None or shift_labels is not None or kwargs:
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(
            logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs
        )
    logits = logits.float()
    shifted = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    return _CrossEntropy.apply(
        logits.view(-1, vocab_size), shifted.view(-1).to(logits.device), ignore_index
    )


@contextlib.contextmanager
def lean_loss(model: nn.Module) -> Iterator[bool]:
    """Within the block, ``model``'s loss is :func:`lean_causal_lm_loss` if it was ``ForCausalLMLoss``.

    Yields:
        Whether the lean loss is in use (False: the model keeps its own loss function).
    """
    from transformers.loss.loss_utils import ForCausalLMLoss  # imported late: transformers is slow

    original = getattr(model, "loss_function", None)
    if original is not ForCausalLMLoss:
        yield False
        return
    had_own = "_loss_function" in vars(model)
    model.loss_function = lean_causal_lm_loss
    try:
        yield True
    finally:
        if had_own:
            model.loss_function = original
        else:
            vars(model).pop("_loss_function", None)
