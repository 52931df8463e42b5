"""Weights that accelerate keeps off their modules (offloaded device maps): read, visit, write.

A module offloaded by accelerate (``device_map`` with ``"cpu"``/``"disk"`` entries,
``dispatch_model``, ``cpu_offload``) carries an ``AlignDevicesHook`` with ``offload=True``: its
tensors sit on the meta device and the hook builds them from its ``weights_map`` for each forward.
gblm holds the hooks (:func:`held_hooks`) and puts the stored values in itself, one block at a
time (:func:`materialized`); GBLM's gradient stage gives each offloaded Parameter a storage-free
stand-in whose ``.data`` it swaps, so its hooks survive (:func:`placeholders`); pruned weights
are written where the hook reads them (:func:`write_back`), never into the source checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Offloaded:
    """One tensor, ``owner``'s ``name`` (a buffer or a parameter), that ``hook`` keeps in its
    ``weights_map`` under ``key``."""

    owner: nn.Module
    name: str
    hook: Any
    key: str
    buffer: bool

    @property
    def slots(self) -> dict:
        return self.owner._buffers if self.buffer else self.owner._parameters

    def current(self) -> Tensor:
        return self.slots[self.name]

    def read(self) -> Tensor:
        """The stored value (a CPU tensor; read from disk for a disk-offloaded one)."""
        return self.hook.weights_map[self.key]


def align_hooks(module: nn.Module) -> list[tuple[nn.Module, Any]]:
    """``(module, AlignDevicesHook)`` for every such hook in ``module``'s tree (also inside a
    ``SequentialHook``). Raises NotImplementedError for a hook of another kind."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    found = []
    for name, sub in module.named_modules():
        hook = getattr(sub, "_hf_hook", None)
        hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook] if hook else []
        for h in hooks:
            if not isinstance(h, AlignDevicesHook):
                raise NotImplementedError(
                    f"module {name or 'model'} carries an accelerate hook of kind "
                    f"{type(h).__name__}; gblm works with device maps (AlignDevicesHook) only."
                )
            found.append((sub, h))
    return found


def offloaded_tensors(module: nn.Module) -> list[Offloaded]:
    """Every tensor in ``module``'s tree that an offloading hook keeps off the module (on meta)."""
    from accelerate.utils import named_module_tensors

    found = []
    for hooked, hook in align_hooks(module):
        if not hook.offload:
            continue
        tensors = named_module_tensors(
            hooked, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
            remove_non_persistent=True,
        )  # fmt: skip
        for key, tensor in tensors:
            if tensor.device.type != "meta":
                continue
            path, _, name = key.rpartition(".")
            owner = hooked.get_submodule(path) if path else hooked
            found.append(Offloaded(owner, name, hook, key, name in owner._buffers))
    return found


def has_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps some of ``module``'s weights off it (meta tensors)."""
    return bool(offloaded_tensors(module))


def execution_devices(module: nn.Module) -> set[torch.device]:
    """The execution devices accelerate's hooks in ``module``'s tree compute on (may be empty)."""
    return {
        torch.device(hook.execution_device)
        for _, hook in align_hooks(module)
        if hook.execution_device is not None
    }


@contextlib.contextmanager
def held_hooks(module: nn.Module, execution_device: torch.device | None = None) -> Iterator[None]:
    """Within, accelerate's hooks in ``module`` load and drop no weights (``offload=False``), and
    with ``execution_device`` they send inputs there; both restored afterwards."""
    hooks = [hook for _, hook in align_hooks(module)]
    saved = [(hook.offload, hook.execution_device) for hook in hooks]
    try:
        for hook in hooks:
            hook.offload = False
            if execution_device is not None:
                hook.execution_device = execution_device
        yield
    finally:
        for hook, (offload, device) in zip(hooks, saved):
            hook.offload, hook.execution_device = offload, device


@contextlib.contextmanager
def _replaced(entries: list[Offloaded], value: Callable[[Offloaded], Tensor]) -> Iterator[None]:
    """Within, each entry's meta tensor is ``value(entry)`` (a Parameter for a parameter)."""
    originals = [entry.current() for entry in entries]
    try:
        for entry, original in zip(entries, originals):
            new = value(entry)
            entry.slots[entry.name] = (
                new if entry.buffer else nn.Parameter(new, original.requires_grad)
            )
        yield
    finally:
        for entry, original in zip(entries, originals):
            entry.slots[entry.name] = original


def _storage(entry: Offloaded) -> tuple[Mapping, str]:
    """The mapping under ``entry.hook.weights_map``'s prefixes, and the full key there."""
    from accelerate.utils import PrefixedDataset

    store, key = entry.hook.weights_map, entry.key
    while isinstance(store, PrefixedDataset):
        store, key = store.dataset, store.prefix + key
    return store, key


def check_writable(entries: list[Offloaded]) -> None:
    """Raise NotImplementedError, before any pruning, for a store :func:`write_back` cannot write."""
    from accelerate.utils import OffloadedWeightsLoader

    for entry in entries:
        store, key = _storage(entry)
        if isinstance(store, OffloadedWeightsLoader):
            if key in store.state_dict or store.save_folder is not None:
                continue
        elif isinstance(store, MutableMapping) and isinstance(store.get(key), Tensor):
            continue
        raise NotImplementedError(
            f"{key}: accelerate keeps it in a {type(store).__name__} that gblm cannot write the "
            "pruned weights into; give the device map an offload_folder, or load the model with "
            "model.onload=true instead of a device map."
        )


@torch.no_grad()
def write_back(entry: Offloaded, value: Tensor) -> None:
    """Store ``value`` where the hook will read ``entry`` from, bit for bit."""
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    store, key = _storage(entry)
    value = value.detach().cpu()
    if isinstance(store, OffloadedWeightsLoader) and key not in store.state_dict:
        # on disk: accelerate's own file in its offload folder, never the source checkpoint
        offload_weight(value, key, store.save_folder, index=store.index)
        return
    target = store.state_dict[key] if isinstance(store, OffloadedWeightsLoader) else store[key]
    target.copy_(value)


@contextlib.contextmanager
def materialized(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Within, ``module``'s offloaded tensors are real ones on ``device`` (new Parameters, read
    from the ``weights_map``) and the hooks hold still; their values are written back
    (:func:`write_back`) before the meta tensors return. One block's weights at a time."""
    entries = offloaded_tensors(module)
    check_writable(entries)
    with held_hooks(module), _replaced(entries, lambda entry: entry.read().to(device)):
        yield
        for entry in entries:
            write_back(entry, entry.current())


@contextlib.contextmanager
def placeholders(model: nn.Module) -> Iterator[dict[int, Offloaded]]:
    """Within, every offloaded tensor of ``model`` is a storage-free CPU stand-in (a broadcast
    zero of its shape and dtype), so hooks registered on it and ``.data`` swaps work as for a host
    weight. Yields ``id(stand-in) -> Offloaded``, where :meth:`Offloaded.read` finds its value."""
    entries = offloaded_tensors(model)

    def zero(entry: Offloaded) -> Tensor:
        meta = entry.current()
        return torch.zeros((), dtype=meta.dtype).expand(meta.shape)

    with _replaced(entries, zero):
        yield {id(entry.current()): entry for entry in entries}
