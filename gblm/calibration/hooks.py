"""Forward hooks that never leak.

Every hook the calibration code attaches (statistics on Linears, the block-0 input catcher) is
registered inside :func:`attached_hooks`, whose ``finally`` removes it, so a failed step never
leaves a hook behind on the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle


@contextlib.contextmanager
def attached_hooks(
    hooks: Iterable[tuple[nn.Module, Callable]],
    *,
    pre: bool = False,
    with_kwargs: bool = False,
) -> Iterator[list[RemovableHandle]]:
    """Register ``(module, hook)`` pairs for the duration of the ``with`` block.

    Args:
        hooks: pairs of a module and the hook to attach to it.
        pre: forward pre-hooks (``hook(module, args[, kwargs])``) instead of forward hooks
            (``hook(module, args, [kwargs,] output)``).
        with_kwargs: pass the keyword arguments of the call to the hook as well.

    Yields:
        The handles, in registration order. All are removed on exit, also on an exception.
    """
    handles: list[RemovableHandle] = []
    try:
        for module, hook in hooks:
            if pre:
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
            else:
                handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))
        yield handles
    finally:
        for handle in handles:
            handle.remove()
