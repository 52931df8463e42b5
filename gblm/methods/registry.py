"""The registry of methods is the config-group folder ``conf/method/``.

Each ``conf/method/<name>.yaml`` names its class (``_target_``, null for the dense baseline), an
``order`` (where the method stands in tables: baselines first) and the method's options, which
are the keyword arguments of the class. Nothing else in the code lists method names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from gblm.paths import PROJECT_ROOT

METHOD_DIR = PROJECT_ROOT / "conf" / "method"
#: Keys of a method file that describe the entry, not the class's options.
ENTRY_KEYS = ("name", "_target_", "order")


@dataclass(frozen=True)
class MethodEntry:
    """One method of the registry."""

    name: str
    target: str | None  # dotted class path; None: no pruning (the dense baseline)
    order: int
    options: dict[str, Any] = field(default_factory=dict)  # the file's defaults of the options


@functools.lru_cache(maxsize=1)
def _entries() -> tuple[MethodEntry, ...]:
    import yaml

    entries = []
    for path in sorted(METHOD_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        entries.append(
            MethodEntry(
                name=path.stem,
                target=data.get("_target_"),
                order=int(data.get("order", 1000)),
                options={k: v for k, v in data.items() if k not in ENTRY_KEYS},
            )
        )
    return tuple(sorted(entries, key=lambda e: (e.order, e.name)))


def method_names() -> tuple[str, ...]:
    """Every registered method, in table order (``order``, then name)."""
    return tuple(e.name for e in _entries())


def method_entry(name: str) -> MethodEntry:
    """The registry entry of ``name``; KeyError when there is none."""
    for entry in _entries():
        if entry.name == name:
            return entry
    raise KeyError(name)


def method_order(name: str) -> tuple[int, str]:
    """Sort key for tables: registered methods in registry order, unknown ones after, by name."""
    names = method_names()
    return (names.index(name), name) if name in names else (len(names), name)


def build_method(name: str, target: str | None = None, **options: Any):
    """The method ``name`` with its registered defaults updated by ``options``; None for dense.

    Args:
        name: A registered method (a file of ``conf/method/``).
        target: The class's dotted path, when the config names another class than the registry.
        options: Keyword arguments of the class; unknown ones are refused with the allowed list.

    Raises:
        ConfigError: unknown method or option, or a value the class refuses.
    """
    import inspect

    from hydra.utils import get_class

    from gblm.errors import ConfigError

    try:
        entry = method_entry(name)
    except KeyError:
        raise ConfigError(
            f"method={name!r} is not allowed: choose one of {', '.join(method_names())}."
        ) from None
    target = target or entry.target
    if target is None:
        return None
    cls = get_class(target)
    allowed = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"method.{unknown[0]} is not an option of method={name}: its options are "
            f"{', '.join(allowed) or 'none'}."
        )
    try:
        return cls(**{**entry.options, **options})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method={name}: {err}") from err
