"""The sequential layer walk (Wanda, GBLM-Pruner, SparseGPT; ALGORITHMS.md).

1. Capture the inputs of decoder block 0 (hidden states and every keyword argument) for all N
   calibration windows.
2. For each block b in order: hook all its Linears, run the block on the N inputs (every Linear
   sees the block's unpruned forward), fold the statistics the method asks for (``row_sq`` for
   Wanda / GBLM, the Hessian for SparseGPT), prune every Linear, then run the now-pruned block
   again on the same inputs to produce the inputs of block b + 1. So block b sees the outputs of
   the pruned blocks 0..b-1.
3. With ``pruner.true_sequential`` (SparseGPT's option) the block is pruned group by group,
   [q,k,v] -> [o] -> [gate,up] -> [down], re-running it with hooks on the next group each time.

Methods that need no calibration (magnitude) prune every block's Linears without data. Only the
Linears inside decoder blocks are pruned; embeddings and the LM head never are.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from gblm.calibration.capture import BlockInputs, capture_block_inputs
from gblm.calibration.hooks import attached_hooks
from gblm.calibration.stats import (
    accumulate_hessian,
    accumulate_row_sq,
    make_hessian,
    make_row_sq,
)
from gblm.models.layers import (
    decoder_layers,
    decoder_layers_path,
    prunable_linears,
    sequential_groups,
)
from gblm.pruning.base import LinearStats, Pruner, Sparsity
from gblm.pruning.storage import PackedMasks

logger = logging.getLogger("gblm.walk")

#: The walk's stages, as handed to ``prune_model(timer=...)``: block-0 input capture, the hooked
#: forward that folds the statistics, scoring and masking (the method's per-Linear step), and the
#: forward of the pruned block that produces the next block's inputs.
WALK_STAGES = ("capture", "statistics", "scoring and masking", "re-forward")


class StageClock(Protocol):
    """What ``prune_model`` needs of a timer: a context manager per named stage."""

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]: ...


@contextlib.contextmanager
def _untimed(_name: str) -> Iterator[None]:
    yield


def _as_ids(windows: Tensor | Sequence[Tensor]) -> Tensor:
    """(N, T) token ids from a tensor or a sequence of (T,) / (1, T) tensors."""
    if isinstance(windows, Tensor):
        return windows
    return torch.cat([w.reshape(1, -1) for w in windows])


@contextlib.contextmanager
def _on_device(block: nn.Module, device: torch.device) -> Iterator[torch.device]:
    """Run a block's work on ``device``: move it there and back, unless accelerate places it.

    Yields:
        The device the block computes on (accelerate's execution device for a dispatched block).
    """
    params = list(block.parameters())
    if any(p.device.type == "meta" for p in params):
        raise NotImplementedError(
            "A decoder block has weights offloaded by accelerate (meta tensors); the walk prunes "
            "weights in place and needs them materialised. Load the model on the CPU instead."
        )
    execution_device = getattr(getattr(block, "_hf_hook", None), "execution_device", None)
    if execution_device is not None:  # accelerate moves inputs to where the weights already are
        yield torch.device(execution_device)
        return
    home = {p.device for p in params}
    moved = home != {device}
    if moved:
        if len(home) > 1:
            raise NotImplementedError(
                f"A decoder block is split over devices {sorted(map(str, home))}."
            )
        block.to(device)
    try:
        yield device
    finally:
        if moved:
            block.to(home.pop())


def _run_block(
    block: nn.Module,
    inputs: BlockInputs,
    hidden: Tensor,
    device: torch.device,
    start: int,
    end: int,
) -> Tensor:
    """Block output for windows ``start:end`` of ``hidden`` (N, T, hidden), on ``device``."""
    args, kwargs = inputs.call_args(end - start, device)
    out = block(hidden[start:end].to(device), *args, **kwargs)
    # transformers >= 5 returns a Tensor, older versions a tuple whose first entry is the states.
    return out[0] if isinstance(out, tuple | list) else out  # (b, T, hidden)


def _calibrate(
    block: nn.Module,
    linears: Mapping[str, nn.Linear],
    inputs: BlockInputs,
    hidden: Tensor,
    pruner: Pruner,
    device: torch.device,
    *,
    share_inputs: bool = True,
) -> dict[str, LinearStats]:
    """Run the block on all N inputs with hooks on ``linears``; fold the method's statistics.

    Linears that read the very same input tensor (LLaMA's q/k/v, gate/up) get the same statistics,
    so with ``share_inputs`` they are folded once, by the first of them, and the others refer to
    the same tensors (bit for bit what folding them separately gives, at a third of the Hessian
    work for q/k/v). Should a block feed a Linear a shared input in some batches and its own in
    others, the statistics are gathered again without sharing.
    """
    stats = {
        name: LinearStats(
            row_sq_norms=make_row_sq(lin.in_features, device) if pruner.needs_activations else None,
            hessian=make_hessian(lin.in_features, device) if pruner.needs_hessian else None,
        )
        for name, lin in linears.items()
    }
    if not (pruner.needs_activations or pruner.needs_hessian):
        return stats
    batch = 0  # windows in the current forward call, read by the hooks
    # this call's inputs, id -> (weak reference, who folded it); weak, so no activation is kept
    folded: dict[int, tuple[weakref.ref, str]] = {}
    source: dict[str, set[str | None]] = {name: set() for name in linears}  # None: its own input

    def fold(name: str):
        def hook(_module: nn.Module, args: tuple, _output: Tensor) -> None:
            x = args[0]
            seen = folded.get(id(x)) if share_inputs else None
            if seen is not None and seen[0]() is x:  # already folded for another Linear
                source[name].add(seen[1])
                return
            source[name].add(None)
            folded[id(x)] = (weakref.ref(x), name)
            x = x.detach()
            x = x.reshape(batch, -1, x.shape[-1])  # (b, T, d_in): OPT's MLP flattens the tokens
            entry = stats[name]
            # One window at a time, as with batch_size=1: the block's forward is batched, the
            # running means take the same steps in the same order whatever the batch size.
            for sample in x.split(1):  # (1, T, d_in) each
                if entry.row_sq_norms is not None:
                    accumulate_row_sq(entry.row_sq_norms, entry.nsamples, sample)
                if entry.hessian is not None:
                    accumulate_hessian(entry.hessian, entry.nsamples, sample)
                entry.nsamples += 1

        return hook

    with attached_hooks([(lin, fold(name)) for name, lin in linears.items()]):
        for start, end in inputs.batches():
            batch = end - start
            folded.clear()
            _run_block(block, inputs, hidden, device, start, end)
    folded.clear()
    if any(len(sources) > 1 for sources in source.values()):
        logger.debug("inputs shared in some batches only: statistics gathered per Linear")
        return _calibrate(block, linears, inputs, hidden, pruner, device, share_inputs=False)
    for name, sources in source.items():
        owner = next(iter(sources), None)
        if owner is not None:
            shared = stats[owner]
            stats[name] = LinearStats(
                row_sq_norms=shared.row_sq_norms, hessian=shared.hessian, nsamples=shared.nsamples
            )
    return stats


def _check_grad_norms(
    pruner: Pruner, names: list[str], grad_norms: Mapping[str, Tensor] | None
) -> None:
    if not pruner.needs_gradients:
        return
    missing = [n for n in names if grad_norms is None or n not in grad_norms]
    if missing:
        raise ValueError(
            f"Method {pruner.name!r} needs gradient norms, but grad_norms lacks {len(missing)} of "
            f"the {len(names)} decoder-block Linears (first: {missing[0]!r}). Compute them with "
            "gblm.calibration.gradients on the dense model first."
        )


@torch.no_grad()
def prune_model(
    model: nn.Module,
    pruner: Pruner,
    sparsity: Sparsity,
    windows: Tensor | Sequence[Tensor] | None = None,
    *,
    device: torch.device | str,
    batch_size: int = 1,
    grad_norms: Mapping[str, Tensor] | None = None,
    progress: bool = True,
    offload_inputs: bool = False,
    timer: StageClock | None = None,
) -> PackedMasks:
    """Prune every Linear inside the decoder blocks of ``model``, in place, block by block.

    Args:
        model: a causal LM (LLaMA, Mistral, Qwen2, OPT, ...).
        pruner: the method; its ``needs_*`` flags decide which statistics are gathered.
        sparsity: the target sparsity.
        windows: (N, T) calibration token ids (or N tensors of T ids); not used by methods that
            need no calibration (magnitude).
        device: the compute device; blocks living elsewhere are moved there for their work.
        batch_size: windows per forward call.
        grad_norms: GBLM's gradient norms, keyed by full Linear name, when the method needs them.
        progress: show a tqdm bar.
        offload_inputs: keep the (N, T, hidden) block inputs on the CPU instead of ``device``.
        timer: anything with a ``stage(name)`` context manager (e.g. :class:`gblm.utils.StageTimer`);
            the walk's four stages are timed under the names in :data:`WALK_STAGES`, entered
            once per block (the benchmarks use it).

    Returns:
        The boolean masks (True = pruned), on the CPU, keyed by the full module name as in
        ``model.named_modules()`` (e.g. ``model.layers.0.self_attn.q_proj``); held as bits
        (:class:`gblm.pruning.masks.PackedMasks`), each unpacked when read.
    """
    device = torch.device(device)
    blocks = decoder_layers(model)
    prefix = decoder_layers_path(model)
    linear_names = [
        f"{prefix}.{b}.{name}" for b, block in enumerate(blocks) for name in prunable_linears(block)
    ]
    _check_grad_norms(pruner, linear_names, grad_norms)
    if pruner.needs_calibration and windows is None:
        raise ValueError(f"Method {pruner.name!r} needs calibration windows; none were given.")
    groups_of = sequential_groups if getattr(pruner, "true_sequential", False) else lambda n: [n]
    stage = timer.stage if timer is not None else _untimed
    capture_stage, statistics_stage, masking_stage, reforward_stage = WALK_STAGES

    was_training = model.training
    model.eval()
    masks = PackedMasks()
    began = time.perf_counter()
    try:
        if pruner.needs_calibration:
            storage = torch.device("cpu") if offload_inputs else device
            with stage(capture_stage):
                inputs = capture_block_inputs(
                    model, _as_ids(windows), batch_size=batch_size, storage_device=storage
                )
            hidden = inputs.hidden  # (N, T, hidden): inputs of the current block
            outputs = torch.empty_like(hidden)  # (N, T, hidden): inputs of the next block
        for b, block in enumerate(tqdm(blocks, desc="prune blocks", disable=not progress)):
            block_began = time.perf_counter()
            with _on_device(block, device) as block_device:
                linears = prunable_linears(block)
                for group in groups_of(list(linears)):
                    if pruner.needs_calibration:
                        group_linears = {name: linears[name] for name in group}
                        with stage(statistics_stage):
                            stats = _calibrate(
                                block, group_linears, inputs, hidden, pruner, block_device
                            )
                    else:
                        stats = {name: LinearStats() for name in group}
                    with stage(masking_stage):
                        for name in group:
                            full_name = f"{prefix}.{b}.{name}"
                            linear = linears[name]
                            if pruner.needs_gradients:
                                stats[name].grad_norm = grad_norms[full_name].to(
                                    linear.weight.device
                                )
                            mask = pruner.prune_linear(linear, stats[name], sparsity)
                            masks.add(full_name, mask)
                            stats[name] = LinearStats()  # free the Hessian before the next Linear
                if pruner.needs_calibration:  # the pruned block feeds the next one
                    with stage(reforward_stage):
                        for start, end in inputs.batches():
                            out = _run_block(block, inputs, hidden, block_device, start, end)
                            outputs[start:end] = out.to(outputs.device)
                    hidden, outputs = outputs, hidden
            logger.debug("block %d pruned in %.2f s", b, time.perf_counter() - block_began)
    finally:
        model.train(was_training)
    logger.info(
        "%s: pruned %d Linears in %d blocks in %.1f s",
        pruner.name,
        len(masks),
        len(blocks),
        time.perf_counter() - began,
    )
    return masks
