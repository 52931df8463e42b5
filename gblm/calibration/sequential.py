"""The sequential layer walk (Wanda, GBLM-Pruner, SparseGPT; docs/methods.md).

1. Capture the inputs of decoder block 0 (hidden states and every keyword argument) for all N
   calibration windows.
2. For each block b in order: hook all its Linears, run the block on the N inputs (every Linear
   sees the block's unpruned forward), fold the statistics the method declares (``row_sq`` for
   Wanda / GBLM, the Hessian for SparseGPT, input mean and variance for a refinement, and what
   the method's weight update needs), prune every Linear to the target the sparsity plan gives
   it and, with a weight update, update its kept weights from its dense ones (one Linear at a
   time, its statistics freed right after), then run the now-pruned block again on the same
   inputs to produce the inputs of block b + 1. So block b sees the outputs of the pruned blocks
   0..b-1.
3. With ``method.true_sequential`` (SparseGPT's option) the block is pruned group by group,
   [q,k,v] -> [o] -> [gate,up] -> [down], re-running it with hooks on the next group each time.

The stages are module-level functions (:func:`capture_block_inputs`, :func:`gather_statistics`,
:func:`reforward_block`; the per-Linear step is the method's ``prune_linear``), so a benchmark
can time each one by wrapping it, without parameters of its own in these signatures.

Methods that need no calibration (magnitude) prune every block's Linears without data, unless a
weight update asks for the walk's statistics. Only the
Linears inside decoder blocks are pruned; embeddings and the LM head never are.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from gblm.calibration.capture import BlockInputs, capture_block_inputs
from gblm.calibration.hooks import attached_hooks
from gblm.calibration.stats import LinearStats
from gblm.devices import calibration_batch
from gblm.models.layers import (
    decoder_layers,
    decoder_layers_path,
    prunable_linears,
    sequential_groups,
)
from gblm.models.memory import (
    in_file_mappings,
    map_parameters_to_file,
    private_file_mappings,
    privatize_parameters,
    release_free_heap,
)
from gblm.models.offload import execution_devices, materialized
from gblm.models.onloading import skeleton, visiting
from gblm.pruning.sparsity import Sparsity
from gblm.pruning.storage import PackedMasks

logger = logging.getLogger("gblm.walk")


class WeightUpdate(Protocol):
    """What the walk needs of a weight update (:class:`gblm.methods.base.WeightUpdate`)."""

    def apply(
        self,
        linear: nn.Linear,
        dense: Tensor,
        mask: Tensor,
        stats: LinearStats,
        target: Sparsity,
        score: Callable,
    ) -> Tensor: ...


class WalkMethod(Protocol):
    """What the walk needs of a method (:class:`gblm.methods.base.Pruner` has it)."""

    walk_stats: frozenset[str]  # the method's statistics and its update's
    walk_calibrates: bool  # the method or its update needs the calibration windows
    true_sequential: bool
    update: WeightUpdate | None

    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor: ...

    def column_score(
        self, name: str, stats: LinearStats, weight_cols: Tensor, start: int, end: int
    ) -> Tensor: ...


class TargetPlan(Protocol):
    """What the walk needs of a sparsity plan: :class:`gblm.methods.plans.SparsityPlan`, or one
    :class:`Sparsity` for every Linear (it is its own uniform plan)."""

    def target(self, block: int, name: str) -> Sparsity: ...


def _as_ids(windows: Tensor | Sequence[Tensor]) -> Tensor:
    """(N, T) token ids from a tensor or a sequence of (T,) / (1, T) tensors."""
    if isinstance(windows, Tensor):
        return windows
    return torch.cat([w.reshape(1, -1) for w in windows])


@contextlib.contextmanager
def _on_device(block: nn.Module, device: torch.device) -> Iterator[torch.device]:
    """Run a block's work on ``device``: move it there and back, unless accelerate places it.

    A block accelerate places computes on its execution device; its offloaded weights (meta
    tensors) are read from their hooks' stores onto that device for the work and the pruned
    values written back there afterwards (:func:`gblm.models.offload.materialized`), so that
    evaluation and saving see them.

    Yields:
        The device the block computes on (accelerate's execution device for a dispatched block).
    """
    placed = execution_devices(block)
    if len(placed) > 1:
        raise NotImplementedError(
            f"accelerate runs parts of a decoder block on {sorted(map(str, placed))}; "
            "give the whole block one device in the device map."
        )
    if placed:
        execution_device = placed.pop()
        with materialized(block, execution_device, write=True):
            yield execution_device
        return
    home = {p.device for p in block.parameters()}
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


@contextlib.contextmanager
def _embeddings_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Everything but the decoder blocks on ``device`` (read only), the blocks where they are."""
    with skeleton(model, lambda _index, hidden, _args, _kwargs: hidden), visiting(model, device):
        yield


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


def gather_statistics(
    block: nn.Module,
    linears: Mapping[str, nn.Linear],
    inputs: BlockInputs,
    hidden: Tensor,
    wanted: frozenset[str],
    device: torch.device,
    *,
    share_inputs: bool = True,
) -> dict[str, LinearStats]:
    """Run the block on all N inputs with hooks on ``linears``; fold the statistics ``wanted``.

    Linears that read the very same input tensor (LLaMA's q/k/v, gate/up) get the same statistics,
    so with ``share_inputs`` they are folded once, by the first of them, and the others refer to
    the same tensors (bit for bit what folding them separately gives, at a third of the Hessian
    work for q/k/v). Should a block feed a Linear a shared input in some batches and its own in
    others, the statistics are gathered again without sharing.
    """
    stats = {
        name: LinearStats.empty(wanted, lin.in_features, device) for name, lin in linears.items()
    }
    if not wanted:
        return stats
    batch = 0  # windows in the current forward call, read by the hooks
    # this call's inputs, id -> (weak reference, who folded it); weak, so no activation is kept
    folded: dict[int, tuple[weakref.ref, str]] = {}
    source: dict[str, set[str | None]] = {name: set() for name in linears}  # None: its own input

    def fold(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, _output: Tensor) -> None:
            x = args[0]
            seen = folded.get(id(x)) if share_inputs else None
            if seen is not None and seen[0]() is x:  # already folded for another Linear
                source[name].add(seen[1])
                return
            source[name].add(None)
            folded[id(x)] = (weakref.ref(x), name)
            x = x.detach().reshape(batch, -1, x.shape[-1])  # (b, T, d_in): OPT flattens tokens
            # One window at a time, as with batch_size=1: the block's forward is batched, the
            # running means take the same steps in the same order whatever the batch size.
            for sample in x.split(1):  # (1, T, d_in) each
                stats[name].fold(sample)

        return hook

    with attached_hooks([(lin, fold(name)) for name, lin in linears.items()]):
        for start, end in inputs.batches():
            batch = end - start
            folded.clear()
            _run_block(block, inputs, hidden, device, start, end)
    folded.clear()
    if any(len(sources) > 1 for sources in source.values()):
        logger.debug("inputs shared in some batches only: statistics gathered per Linear")
        return gather_statistics(block, linears, inputs, hidden, wanted, device, share_inputs=False)
    for name, sources in source.items():
        owner = next(iter(sources), None)
        if owner is not None:
            stats[name] = stats[owner]  # the same tensors: read only by the methods
    return stats


def reforward_block(
    block: nn.Module, inputs: BlockInputs, hidden: Tensor, outputs: Tensor, device: torch.device
) -> None:
    """Run the (pruned) block on every input in ``hidden``, writing the results into ``outputs``."""
    for start, end in inputs.batches():
        out = _run_block(block, inputs, hidden, device, start, end)
        outputs[start:end] = out.to(outputs.device)


def _prune_block(
    block: nn.Module,
    b: int,
    prefix: str,
    method: WalkMethod,
    plan: TargetPlan,
    inputs: BlockInputs | None,
    hidden: Tensor | None,
    device: torch.device,
    masks: PackedMasks,
) -> None:
    """Gather statistics and prune every Linear of block ``b`` (group by group if sequential);
    with a weight update, update each Linear's kept weights right after its mask is chosen."""
    linears = prunable_linears(block)
    update = method.update
    groups = sequential_groups(list(linears)) if method.true_sequential else [list(linears)]
    for group in groups:
        group_linears = {name: linears[name] for name in group}
        if inputs is not None:
            stats = gather_statistics(
                block, group_linears, inputs, hidden, frozenset(method.walk_stats), device
            )
        else:
            stats = {name: LinearStats() for name in group}
        for name in group:
            full_name, linear = f"{prefix}.{b}.{name}", linears[name]
            target = plan.target(b, name)
            dense = linear.weight.data.clone() if update is not None else None
            mask = method.prune_linear(full_name, linear, stats[name], target)
            if update is not None:
                score = functools.partial(method.column_score, full_name, stats[name])
                mask = update.apply(linear, dense, mask, stats[name], target, score)
                del dense
            masks.add(full_name, mask)
            stats[name] = LinearStats()  # free the Hessian before the next Linear


@torch.no_grad()
def _walk_blocks(
    blocks: Sequence[nn.Module],
    prefix: str,
    method: WalkMethod,
    plan: TargetPlan,
    inputs: BlockInputs | None,
    device: torch.device,
    masks: PackedMasks,
    progress: bool,
    spill: bool = False,
    scratch_dir: Path | None = None,
) -> None:
    """Prune the blocks in order; with calibration inputs, each pruned block feeds the next.

    With ``spill``, a block whose weights were the pages of a memory-mapped checkpoint gets a
    file-backed mapping of its own (in ``scratch_dir``; the system's temporary folder by default;
    :func:`gblm.models.memory.map_parameters_to_file`), so the pruned model does not pile up in
    anonymous memory. A block that computes where it lives (the CPU) moves there before it is
    pruned, in place of the private copy: one copy of the block instead of two, and no anonymous
    copy of it at all. A block moved to a device comes back as ordinary memory and moves after.
    After each block the free pages of the heap go back to the kernel
    (:func:`gblm.models.memory.release_free_heap`): the block's freed scratch otherwise stayed
    there, fragmented, about 60 MB more per block at 2048 hidden (docs/onload.md).
    """
    hidden = outputs = None
    if inputs is not None:
        hidden = inputs.hidden  # (N, T, hidden): inputs of the current block
        outputs = torch.empty_like(hidden)  # (N, T, hidden): inputs of the next block
    for b, block in enumerate(tqdm(blocks, desc="prune blocks", disable=not progress)):
        block_began = time.perf_counter()
        # Read per block: a checkpoint shard is unmapped once its last tensor is gone, and its
        # addresses may then hold a new (shared) mapping that must not be taken for it.
        mapped = private_file_mappings()  # weights still in the checkpoint's pages (mmap)
        to_file = spill and in_file_mappings(block, mapped)
        with _on_device(block, device) as block_device:
            if to_file and in_file_mappings(block, mapped):  # not moved: it computes at home
                map_parameters_to_file(block, scratch_dir)  # no copy-on-write faults either
                to_file = False
            else:
                privatize_parameters(block, mapped)  # no copy-on-write faults as the masks land
            _prune_block(block, b, prefix, method, plan, inputs, hidden, block_device, masks)
            if inputs is not None:
                reforward_block(block, inputs, hidden, outputs, block_device)
                hidden, outputs = outputs, hidden
        if to_file:  # it came back from the device as ordinary memory
            map_parameters_to_file(block, scratch_dir)
        if spill:
            release_free_heap()  # the block's scratch, freed, out of the heap (module docstring)
        logger.debug("block %d pruned in %.2f s", b, time.perf_counter() - block_began)


def prune_model(
    model: nn.Module,
    method: WalkMethod,
    plan: TargetPlan,
    windows: Tensor | Sequence[Tensor] | None = None,
    *,
    device: torch.device | str,
    batch_size: int | str = "auto",
    progress: bool = True,
    offload_inputs: bool = False,
    onload: bool = False,
    scratch_dir: Path | None = None,
) -> PackedMasks:
    """Prune every Linear inside the decoder blocks of ``model``, in place, block by block.

    Args:
        model: a causal LM (LLaMA, Mistral, Qwen2, OPT, ...).
        method: the method (:class:`gblm.methods.base.Pruner`); its ``stats`` decide which
            statistics are gathered, its ``prune_linear`` prunes each Linear.
        plan: every Linear's target (:class:`gblm.methods.plans.SparsityPlan`), or one target for
            all of them.
        windows: (N, T) calibration token ids (or N tensors of T ids); not used by methods that
            need no calibration (magnitude).
        device: the compute device; blocks living elsewhere are moved there for their work.
        batch_size: windows per forward call, or ``auto`` (one window, as published;
            :func:`gblm.devices.calibration_batch`).
        progress: show a tqdm bar.
        offload_inputs: keep the (N, T, hidden) block inputs on the CPU instead of ``device``.
        onload: the weights live off ``device`` (CPU memory, memory-mapped files): block 0's
            inputs are captured with only the embeddings (and whatever else is not a decoder
            block) moved to ``device``, so masks, rotary tables and hidden states are computed
            there as in the in-memory run. Each block is moved to ``device`` for its work and
            back in any case (:func:`_on_device`). Weights that were a memory-mapped checkpoint's
            pages leave it for a file-backed mapping of their own, block by block, once pruned.
        scratch_dir: with ``onload``, where those files go (unlinked at once); None: the
            system's temporary folder.

    Returns:
        The boolean masks (True = pruned), on the CPU, keyed by the full module name as in
        ``model.named_modules()`` (e.g. ``model.layers.0.self_attn.q_proj``); held as bits
        (:class:`gblm.pruning.storage.PackedMasks`), each unpacked when read.
    """
    device = torch.device(device)
    if method.walk_calibrates and windows is None:
        raise ValueError(f"{type(method).__name__} needs calibration windows; none were given.")
    blocks, prefix = decoder_layers(model), decoder_layers_path(model)
    was_training = model.training
    model.eval()
    masks = PackedMasks()
    began = time.perf_counter()
    try:
        inputs = None
        if method.walk_calibrates:
            ids = _as_ids(windows)
            storage = torch.device("cpu") if offload_inputs else device
            batch = min(calibration_batch(batch_size), ids.shape[0])
            with _embeddings_on(model, device) if onload else contextlib.nullcontext():
                inputs = capture_block_inputs(model, ids, batch_size=batch, storage_device=storage)
        _walk_blocks(
            blocks, prefix, method, plan, inputs, device, masks, progress, onload, scratch_dir
        )
    finally:
        model.train(was_training)
    logger.info(
        "%s: pruned %d Linears in %d blocks in %.1f s",
        type(method).__name__,
        len(masks),
        len(blocks),
        time.perf_counter() - began,
    )
    return masks
