"""Forward hooks that never leak: removed on exit from :func:`attached_hooks`, also on an error."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from torch import nn


@contextlib.contextmanager
def attached_hooks(
    hooks: Iterable[tuple[nn.Module, Callable]], *, pre: bool = False, with_kwargs: bool = False
) -> Iterator[None]:
    """Register ``(module, hook)`` pairs as forward hooks (``pre``: forward pre-hooks) for the
    ``with`` block; ``with_kwargs`` also passes the call's keyword arguments to the hook."""
    with contextlib.ExitStack() as stack:
        for module, hook in hooks:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            stack.callback(register(hook, with_kwargs=with_kwargs).remove)
        yield
