"""Perplexity over non-overlapping windows: the published WikiText-2 protocol.

The test text (joined with ``"\n\n"``, tokenized once) is cut into ``nseg = numel // T`` windows of
T tokens, the remainder dropped. For each window the mean cross-entropy of ``logits[:, :-1]``
against ``ids[:, 1:]`` is multiplied by T, and ``ppl = exp(sum / (nseg * T))``. (The T-1 vs T
mismatch is the published protocol's and is kept so numbers compare with the papers.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from gblm.errors import NonFiniteError
from gblm.utils import evaluating

CHUNK_TOKENS = 256  # positions per cross-entropy call: bounds the fp32 copy of the logits


def token_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy of every position: (b, T, vocab) logits, (b, T) ids -> (b, T-1),
    :data:`CHUNK_TOKENS` positions at a time (the same numbers, without the whole fp32 copy)."""
    targets = ids[:, 1:]  # (b, T-1)
    losses = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for row in range(logits.shape[0]):
        for start in range(0, targets.shape[1], CHUNK_TOKENS):
            end = min(start + CHUNK_TOKENS, targets.shape[1])
            losses[row, start:end] = F.cross_entropy(
                logits[row, start:end].float(), targets[row, start:end], reduction="none"
            )
    return losses


@torch.no_grad()
def perplexity(
    model,
    tokens: Tensor,
    seqlen: int,
    *,
    device: torch.device,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of ``model`` on ``tokens`` (1, numel) in windows of ``seqlen``; only the first
    ``max_windows`` windows (quick runs), or all (None, as published)."""
    nseg = tokens.numel() // seqlen
    if max_windows is not None:
        nseg = min(nseg, max_windows)
    if nseg == 0:
        raise ValueError(
            f"eval.perplexity.seqlen={seqlen} is longer than the evaluation text ({tokens.numel()} tokens)."
        )
    windows = tokens.reshape(-1)[: nseg * seqlen].reshape(nseg, seqlen)  # (nseg, T)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    with evaluating(model):  # a model in training mode is evaluated without dropout
        for start in tqdm(range(0, nseg, batch_size), desc=desc, disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)  # (b, T)
            logits = model(batch, use_cache=False).logits  # (b, T, vocab)
            loss = token_losses(logits, batch)  # (b, T-1)
            nll_sum += (loss.mean(dim=1).double() * seqlen).sum()
    value = float(torch.exp(nll_sum / (nseg * seqlen)).item())
    if not math.isfinite(value):
        raise NonFiniteError(_non_finite_message(model, windows, device, desc, value))
    return value


@torch.no_grad()
def _non_finite_message(model, windows: Tensor, device, desc: str, value: float) -> str:
    """Which window's loss is not finite, and the first module (in the order they finish) whose
    output on it is not."""
    names = {module: name for name, module in model.named_modules()}
    found: list[str] = []

    def hook(module, inputs, output) -> None:
        out = output[0] if isinstance(output, tuple) else getattr(output, "logits", output)
        if found or not isinstance(out, Tensor) or not out.is_floating_point():
            return
        if not bool(torch.isfinite(out).all()):
            found.append(names[module] or type(module).__name__)

    where = ""
    for n in range(windows.shape[0]):
        batch = windows[n : n + 1].to(device)
        if bool(torch.isfinite(token_losses(model(batch, use_cache=False).logits, batch)).all()):
            continue
        handles = [module.register_forward_hook(hook) for module in model.modules()]
        try:
            model(batch, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        where = f" The loss of window {n} is not finite" + (
            f"; the first non-finite output is {found[0]}'s." if found else "."
        )
        break
    return (
        f"{desc}: the perplexity is {value}, not a finite number.{where} The model's forward "
        "pass overflows or has NaN/inf values; with an fp16 model try dtype=bfloat16 or float32."
    )
