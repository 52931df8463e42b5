"""GBLM-Pruner's gradient stage: per-sample gradient norms of the dense model.

For every decoder-block weight, ``alpha * ||G[:, i, j]||_p`` (the factor of GBLM-Pruner's score,
:mod:`gblm.methods.gblm`), with ``G[n, i, j]`` the gradient of window ``n``'s loss (the model's
own next-token cross-entropy, a batch of one) with respect to ``W[i, j]``, folded by
:mod:`gblm.calibration.fold`; the weights never change.

One driver over units: decoder blocks ``0 .. k-1`` are units of one block each, the rest of the
model (blocks ``k ..``, final norm, LM head, loss) is the head unit. In memory ``k = 0`` and each
window's pass is ``model(ids, labels=ids).loss.backward()``, as published. Block by block
``k = L - 1``: a skeleton pass records each block's call, blocks ``0 .. k-1`` run forward one at
a time, the head unit backpropagates into the kept input of block ``k``, and each block in reverse
recomputes its forward and passes the gradient on. Both give the same norms bit for bit
(docs/onload.md, tests/test_blockwise.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gblm import devices
from gblm.calibration.capture import block_output
from gblm.calibration.fold import Folder, GradientError, GradientSettings
from gblm.models.layers import decoder_layers, prunable_linears
from gblm.models.offload import (
    Offloaded,
    execution_devices,
    has_offloaded,
    held_hooks,
    placeholders,
)
from gblm.models.onloading import skeleton, visiting

logger = logging.getLogger("gblm.gradients")

Call = tuple[tuple, dict[str, Any]]  # a block's extra positional and keyword arguments


def block_linear_names(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """Per decoder block, its Linears by full name in ``model.named_modules()``."""
    full_names = {id(module): name for name, module in model.named_modules()}
    return [
        {full_names[id(linear)]: linear for linear in prunable_linears(block).values()}
        for block in decoder_layers(model)
    ]


@contextlib.contextmanager
def _stage_mode(model: nn.Module, weights: list[Tensor]) -> Iterator[None]:
    """Eval mode (no dropout), only ``weights`` requiring grad, no stale ``.grad``, grad enabled;
    the caller's train/eval flags, ``requires_grad`` flags and ``.grad`` restored afterwards."""
    training = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = {id(w): w.grad for w in weights}
    try:
        model.eval().requires_grad_(False)
        for w in weights:
            w.grad = None  # an old .grad would be summed into the first sample's gradient
            w.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for module, mode in training:
            module.training = mode
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for w in weights:
            w.grad = grads[id(w)]


def gradient_norms(
    model: nn.Module,
    windows: Tensor,
    settings: GradientSettings | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    file_backed: bool = False,
    scratch_dir: Path | None = None,
) -> dict[str, Tensor]:
    """GBLM-Pruner's accumulated per-sample gradient norm of every decoder-block Linear.

    Args:
        model: A causal LM, left exactly as found (weights, flags, ``.grad``).
        windows: Calibration token ids (N, T); each row is one sample (a batch of one).
        settings: Default: the published ones. An offloaded model always goes block by block.
        device: The compute device (block by block, default accelerate's execution device, else
            that of the input embeddings; in memory, as :func:`gblm.devices.input_device` rules).
        progress: Show a tqdm bar labelled ``gradients``.
        file_backed: Block by block, the accumulators in file-backed mappings, one file per
            block in ``scratch_dir`` (default: the system's temporary folder; the CPU only).

    Returns:
        ``{full Linear name: (d_out, d_in) tensor}``, e.g. ``model.layers.0.self_attn.q_proj``.

    Raises:
        GradientError: A window's loss or a Linear's gradient is NaN or infinite.
    """
    settings = settings or GradientSettings()
    if windows.ndim != 2 or windows.dtype != torch.long:
        raise ValueError(
            f"windows must be a (N, T) tensor of int64 token ids, got {tuple(windows.shape)} "
            f"{windows.dtype}."
        )
    nsamples, seqlen = windows.shape
    if nsamples == 0 or seqlen < 2:
        raise ValueError(f"windows of shape {tuple(windows.shape)}: need N >= 1 and T >= 2.")
    blockwise = settings.blockwise or has_offloaded(model)
    if file_backed and not blockwise:
        raise ValueError("file-backed accumulators: block by block only.")
    blocks = block_linear_names(model)
    folder = Folder(blocks, settings, (scratch_dir,) if file_backed else None)
    # Every in-place write to a tensor bumps its version counter: a free check that the stage
    # (no optimizer, hooks under no_grad) left every parameter untouched.
    versions = {name: p._version for name, p in model.named_parameters()}
    start = time.perf_counter()
    if blockwise:
        if device is not None:
            compute = torch.device(device)
        else:  # accelerate's one execution device, else that of the input embeddings
            placed = execution_devices(model)
            compute = placed.pop() if len(placed) == 1 else devices.input_device(model)
        with placeholders(model) as sources, held_hooks(model, compute):
            stage = _Stage(model, folder, blocks, compute, sources, len(blocks) - 1, progress)
            stage.run(windows, settings.group_size)
    else:
        compute = devices.input_device(model, device)
        _Stage(model, folder, blocks, compute, None, 0, progress).run(windows, 1)
    norms = _finish(model, versions, folder, settings)
    logger.info(
        "gradient norms (%s, scale %g, %s%s) of %d Linears over %d windows x %d tokens: %.1f s",
        settings.norm, settings.scale, settings.accumulator_dtype,
        ", block by block" if blockwise else "", len(norms), nsamples, seqlen,
        time.perf_counter() - start,
    )  # fmt: skip
    return norms


class _Stop(Exception):
    """Raised by the stand-in of block ``k - 1`` to end a skeleton pass."""


@dataclass
class _Stage:
    """The passes of the module docstring. ``sources`` is None in memory, else the offloaded
    weights' stores, and every unit is onloaded to ``compute`` with its accumulators."""

    model: nn.Module
    folder: Folder
    blocks: list[dict[str, nn.Linear]]  # per block, its Linears by full name
    compute: torch.device
    sources: Mapping[int, Offloaded] | None
    k: int
    progress: bool
    tuple_outputs: bool = False  # whether the blocks return tuples (transformers < 5)

    def __post_init__(self) -> None:
        self.real = list(decoder_layers(self.model))
        self.linears = {name: lin for linears in self.blocks for name, lin in linears.items()}

    def _onloaded(self, module: nn.Module, names: list[str]) -> contextlib.AbstractContextManager:
        """``module`` and the accumulators of ``names`` on the compute device (when onloading)."""
        if self.sources is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(visiting(module, self.compute, self.sources))
        stack.enter_context(self.folder.on(names, self.compute))
        return stack

    def run(self, windows: Tensor, size: int) -> None:
        nsamples, k = windows.shape[0], self.k
        weights = [lin.weight for lin in self.linears.values()]
        bar = tqdm(total=nsamples * (2 * k + 1), desc="gradients", disable=not self.progress)
        with bar, _stage_mode(self.model, weights), self.folder.hooks(self.linears):
            for first in range(0, nsamples, size):
                ids = windows[first : first + size]  # (S, T)
                inputs, calls = self._skeleton_pass(ids) if k else ([None] * len(ids), [])
                kept = []  # kept[b][j]: the input of block b for window j, on the host
                for b in range(k):
                    kept.append(inputs)
                    inputs = self._forward_block(b, inputs, calls)
                    bar.update(len(ids))
                grads = self._head_unit(ids, inputs, first, bar)
                for b in reversed(range(k)):
                    grads = self._backward_block(b, kept[b], calls, grads, first)
                    bar.update(len(ids))

    def _skeleton_pass(self, ids: Tensor) -> tuple[list[Tensor], list[list[Call]]]:
        """Block 0's input (on the host) and the calls of blocks ``0 .. k-1``, per window."""
        inputs, calls = [], []

        def record(index: int, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
            if index == 0:
                inputs.append(hidden.detach().to("cpu"))
            calls[-1].append((args, dict(kwargs)))
            if index == self.k - 1:
                raise _Stop
            return hidden

        with skeleton(self.model, record), self._onloaded(self.model, []), torch.no_grad():
            for j in range(len(ids)):
                calls.append([])
                try:
                    self.model(input_ids=ids[j : j + 1].to(self.compute), use_cache=False)
                except _Stop:
                    continue
                raise RuntimeError("The forward pass never reached the last decoder block.")
        return inputs, calls

    @torch.no_grad()
    def _forward_block(self, b: int, inputs: list[Tensor], calls: list[list[Call]]) -> list:
        """Block ``b`` on every window's input; its outputs on the host."""
        outputs = []
        with self._onloaded(self.real[b], []):
            for j, hidden in enumerate(inputs):
                args, kwargs = calls[j][b]
                out = self.real[b](hidden.to(self.compute), *args, **kwargs)
                self.tuple_outputs = isinstance(out, tuple | list)
                outputs.append(block_output(out).to("cpu"))
        return outputs

    def _head_unit(self, ids: Tensor, inputs: list, first: int, bar: tqdm) -> list:
        """Each window's loss through blocks ``k ..`` and the head, and its backward; returns the
        gradient of block ``k``'s input per window (None for ``k = 0``)."""
        current: list[Any] = [None]  # what the stand-ins return: the current window's leaf
        names = [name for block in self.blocks[self.k :] for name in block]
        grads = []
        with (
            skeleton(self.model, lambda *_: current[0], blocks=self.k),
            self._onloaded(self.model, names),
        ):
            for j, hidden in enumerate(inputs):
                leaf = None
                if hidden is not None:
                    leaf = hidden.to(self.compute).requires_grad_()  # (1, T, H)
                    current[0] = (leaf,) if self.tuple_outputs else leaf
                window = ids[j : j + 1].to(self.compute)  # (1, T)
                loss = self.model(input_ids=window, labels=window, use_cache=False).loss
                if not bool(torch.isfinite(loss.detach())):
                    raise GradientError(
                        f"non-finite loss ({loss.item()}) on sample {first + j}: the dense "
                        "model's forward pass overflows or has NaN/inf weights, so no gradient "
                        "is usable."
                    )
                loss.backward()
                self.folder.check_sample(first + j)
                grads.append(leaf.grad if leaf is not None else None)
                current[0] = None
                bar.update()
        return grads

    def _backward_block(
        self, b: int, inputs: list[Tensor], calls: list[list[Call]], grads: list, first: int
    ) -> list[Tensor | None]:
        """Recompute block ``b`` from each window's kept input, backpropagate its gradient, and
        return the gradients of the block's inputs."""
        passed = []
        with self._onloaded(self.real[b], list(self.blocks[b])):
            for j, hidden in enumerate(inputs):
                # Block 0's input does not require grad in the full model either (embeddings frozen).
                x = hidden.to(self.compute).requires_grad_(b > 0)  # (1, T, H)
                args, kwargs = calls[j][b]
                block_output(self.real[b](x, *args, **kwargs)).backward(grads[j])
                grads[j] = None
                self.folder.check_sample(first + j)
                passed.append(x.grad)
        return passed


def _finish(
    model: nn.Module, versions: dict[str, int], folder: Folder, settings: GradientSettings
) -> dict[str, Tensor]:
    """Check that no parameter changed, warn of Linears without gradient or with overflow, and
    return the finished norms."""
    changed = [name for name, p in model.named_parameters() if p._version != versions[name]]
    if changed:
        raise RuntimeError(f"the gradient stage modified parameters: {', '.join(changed[:5])}")
    missing = [name for name, count in folder.samples_seen.items() if count == 0]
    if missing:
        logger.warning(
            "%d decoder Linears received no gradient (their norm stays 0): %s", len(missing),
            ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
        )  # fmt: skip
    norms = folder.finish(settings.torch_accumulator_dtype)
    overflowed = [name for name, g in norms.items() if bool(torch.isinf(g).any())]
    if overflowed:
        logger.warning(
            "%s accumulator overflowed to inf in %d Linears (e.g. %s); those weights always "
            "survive. accumulator_dtype=float32 avoids it.",
            settings.accumulator_dtype, len(overflowed), overflowed[0],
        )  # fmt: skip
    return norms
