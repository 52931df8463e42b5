"""GBLM-Pruner's gradient stage: per-sample gradient norms of the dense model.

GBLM-Pruner (Das et al., arXiv 2311.04902) scores a weight with

    W_m[i, j] = |W[i, j]| * ||X[:, j]||_2  +  alpha * |W[i, j]| * ||G[:, i, j]||_p

where ``G[n, i, j]`` is the gradient of sample ``n``'s loss with respect to ``W[i, j]``. This
module computes the gradient factor, alpha folded in (:mod:`gblm.calibration.fold`). Each of the
N calibration windows is a batch of one; its loss is the model's own mean next-token
cross-entropy with labels = the input ids. The weights never change.

**One driver over units.** The decoder blocks ``0 .. k-1`` are units of one block each; the rest
of the model (blocks ``k ..``, final norm, LM head, loss) is the head unit. In memory ``k = 0``:
the head unit is the whole model and each window's pass is ``model(ids, labels=ids).loss
.backward()``, the published computation. Block by block (``blockwise``, for models larger than
the compute device, or whose weights accelerate offloads) ``k`` is the last block, and for each
group of S windows:

1. **Skeleton pass**: the model runs with its blocks replaced by stand-ins that record each
   block's call (hidden states, mask, rotary tables); the stand-in of block ``k - 1`` stops it.
2. **Forward**: blocks ``0 .. k-1`` in order, each onloaded once, on the S windows; every
   block's input is kept on the host.
3. **Head unit**: the model runs on each window with blocks ``0 .. k-1`` standing in for the kept
   input of block ``k``, a leaf that requires grad; its loss's backward leaves the gradient there.
4. **Backward**: blocks ``k-1 .. 0``, each onloaded once, recompute their forward from the kept
   input and backpropagate the gradient from the block above.

Either way autograd forms each window's weight gradients, and a post-accumulate-grad hook folds
each one into its accumulator the moment it is complete, then frees it
(:class:`gblm.calibration.fold.Folder`). Every accumulator adds the windows in the order
0 .. N-1, and a block's input gradient is summed from the same consumers in the same order on a
leaf as on an interior node, so both ways give the same norms bit for bit
(tests/test_blockwise.py). Weights are never written: onloading swaps a
parameter's ``.data`` for a device copy and puts the very same tensor back
(:func:`gblm.models.onloading.visiting`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gblm import devices
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
        model.eval()
        for p in params:
            p.requires_grad_(False)
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


def _check_windows(windows: Tensor) -> tuple[int, int]:
    """(N, T) of a valid window tensor: int64 ids, N >= 1 samples of T >= 2 tokens."""
    if windows.ndim != 2 or windows.dtype != torch.long:
        raise ValueError(
            f"windows must be a (N, T) tensor of int64 token ids, got {tuple(windows.shape)} "
            f"{windows.dtype}."
        )
    nsamples, seqlen = windows.shape
    if nsamples == 0 or seqlen < 2:
        raise ValueError(f"windows of shape {tuple(windows.shape)}: need N >= 1 and T >= 2.")
    return nsamples, seqlen


def _compute_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``; else accelerate's one execution device, else that of the input embeddings."""
    if device is not None:
        return torch.device(device)
    placed = execution_devices(model)
    return placed.pop() if len(placed) == 1 else devices.input_device(model)


def gradient_norms(
    model: nn.Module,
    windows: Tensor,
    settings: GradientSettings | None = None,
    *,
    device: str | torch.device | None = None,
    accumulate_on: str | torch.device | None = None,
    progress: bool = True,
    file_backed: bool = False,
    scratch_dir: Path | None = None,
) -> dict[str, Tensor]:
    """GBLM-Pruner's accumulated per-sample gradient norm of every decoder-block Linear.

    Args:
        model: A causal LM (``model(input_ids, labels=input_ids).loss``); it is left exactly as
            found: same weights, train/eval flags, ``requires_grad`` flags and ``.grad``.
        windows: Calibration token ids, shape (N, T); each row is one sample (batch of one).
        settings: The stage's settings (:class:`GradientSettings`; default: the published ones).
            A model whose weights accelerate offloads always goes block by block.
        device: The compute device: where the ids go (in memory, as
            :func:`gblm.devices.input_device` rules) or where each block, the embeddings and the
            head are moved for their work (block by block; default accelerate's execution device,
            else that of the input embeddings).
        accumulate_on: Device of the accumulators (between uses, block by block); default each
            weight's device (the CPU for a weight accelerate offloads). ``"cpu"`` keeps them in
            host memory, as the published code does.
        progress: Show a tqdm bar labelled ``gradients``.
        file_backed: Block by block, the accumulators in file-backed mappings, one file per
            block in ``scratch_dir`` (default: the system's temporary folder), never anonymous
            memory (:func:`gblm.models.memory.file_backed_zeros`; the CPU only).

    Returns:
        ``{full Linear name: (d_out, d_in) tensor}``, e.g. ``model.layers.0.self_attn.q_proj``.

    Raises:
        GradientError: A window's loss or a Linear's gradient is NaN or infinite.
    """
    settings = settings or GradientSettings()
    nsamples, seqlen = _check_windows(windows)
    blockwise = settings.blockwise or has_offloaded(model)
    on = torch.device(accumulate_on) if accumulate_on is not None else None
    if file_backed and (not blockwise or on not in (None, torch.device("cpu"))):
        raise ValueError("file-backed accumulators: block by block, on the CPU only.")
    blocks = block_linear_names(model)
    folder = Folder(blocks, settings, on, (scratch_dir,) if file_backed else None)
    # Every in-place write to a tensor bumps its version counter: a free check that the stage
    # (no optimizer, hooks under no_grad) left every parameter untouched.
    versions = {name: p._version for name, p in model.named_parameters()}
    start = time.perf_counter()
    if blockwise:
        compute = _compute_device(model, device)
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


def _first(out: Any) -> Tensor:
    # transformers >= 5 returns a Tensor, older versions a tuple whose first entry is the states.
    return out[0] if isinstance(out, tuple | list) else out


class _Stage:
    """The passes of the module docstring: blocks ``0 .. k-1`` one at a time, then the head unit.

    ``sources`` is None in memory (nothing is onloaded, the model runs where it is placed), else
    the offloaded weights' stores (:func:`gblm.models.offload.placeholders`) and every unit is
    onloaded to ``compute`` for its work, with its accumulators.
    """

    def __init__(
        self,
        model: nn.Module,
        folder: Folder,
        blocks: list[dict[str, nn.Linear]],
        compute: torch.device,
        sources: Mapping[int, Offloaded] | None,
        k: int,
        progress: bool,
    ) -> None:
        self.model, self.folder, self.compute, self.sources, self.k = (
            model, folder, compute, sources, k,
        )  # fmt: skip
        self.real = list(decoder_layers(model))
        self.names = [list(linears) for linears in blocks]
        self.linears = {name: lin for linears in blocks for name, lin in linears.items()}
        self.progress = progress
        self.host = torch.device("cpu")
        self.tuple_outputs = False

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
        with (
            bar,
            _stage_mode(self.model, weights),
            self.folder.hooks(self.linears),
        ):
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
                inputs.append(hidden.detach().to(self.host))
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
                outputs.append(_first(out).to(self.host))
        return outputs

    def _head_unit(self, ids: Tensor, inputs: list, first: int, bar: tqdm) -> list:
        """Each window's loss through blocks ``k ..`` and the head, and its backward; returns the
        gradient of block ``k``'s input per window (None for ``k = 0``)."""
        current: list[Any] = [None]  # what the stand-ins return: the current window's leaf
        names = [name for block in self.names[self.k :] for name in block]
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
        with self._onloaded(self.real[b], self.names[b]):
            for j, hidden in enumerate(inputs):
                # Block 0's input does not require grad in the full model either (embeddings frozen).
                x = hidden.to(self.compute).requires_grad_(b > 0)  # (1, T, H)
                args, kwargs = calls[j][b]
                _first(self.real[b](x, *args, **kwargs)).backward(grads[j])
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
            "%d decoder Linears received no gradient (their norm stays 0): %s",
            len(missing),
            ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
        )
    norms = folder.finish(settings.torch_accumulator_dtype)
    overflowed = [name for name, g in norms.items() if bool(torch.isinf(g).any())]
    if overflowed:
        logger.warning(
            "%s accumulator overflowed to inf in %d Linears (e.g. %s); those weights always "
            "survive. accumulator_dtype=float32 avoids it.",
            settings.accumulator_dtype,
            len(overflowed),
            overflowed[0],
        )
    return norms
