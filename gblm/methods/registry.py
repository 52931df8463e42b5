"""The registries of plug-ins are config-group folders: ``conf/method/``, ``conf/sparsity/`` and
``conf/reconstruct/``.

Each ``conf/method/<name>.yaml`` names its class (``_target_``, null for the dense baseline), an
``order`` (where the method stands in tables: baselines first) and the method's options, which
are the keyword arguments of the class. Each ``conf/sparsity/<file>.yaml`` that names a
``_target_`` is a sparsity allocator, registered under its ``allocator`` key (``uniform``,
``owl``, ...); the other files of that folder are patterns (``nm_2_4``) that any allocator takes.
An allocator's options are the keyword arguments of its class after the target ``sparsity``.
Each ``conf/reconstruct/<name>.yaml`` is a weight update after the masks (``_target_``, null for
``none``), its options the keyword arguments of its class. Nothing else in the code lists method,
allocator or update names.

Every option is declared once, by its annotation in the class's signature
(:mod:`gblm.options`: ``Annotated[float, Range(ge=0)]``, ``Annotated[str, OneOf(...)]``,
``bool``, ...), and :func:`check_options` checks a plug-in's options against those declarations.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gblm.options import Option, check_value, declared_options
from gblm.paths import PROJECT_ROOT

METHOD_DIR = PROJECT_ROOT / "conf" / "method"
SPARSITY_DIR = PROJECT_ROOT / "conf" / "sparsity"
RECONSTRUCT_DIR = PROJECT_ROOT / "conf" / "reconstruct"
#: Keys of a method file that describe the entry, not the class's options.
ENTRY_KEYS = ("name", "_target_", "order")
#: Keys of a sparsity node that every allocator shares: its name, its class and the target.
SPARSITY_KEYS = ("allocator", "_target_", "ratio", "n", "m")
#: An allocator's arguments that its builder passes (the run's target), not options.
ALLOCATOR_INPUTS = ("sparsity",)


@dataclass(frozen=True)
class MethodEntry:
    """One plug-in of a registry: a method or a sparsity allocator."""

    name: str
    target: str | None  # dotted class path; None: no pruning (the dense baseline)
    order: int
    options: dict[str, Any] = field(default_factory=dict)  # the file's defaults of the options


def _read(path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _entries() -> tuple[MethodEntry, ...]:
    return _folder_entries(METHOD_DIR)


@functools.lru_cache(maxsize=2)
def _folder_entries(folder) -> tuple[MethodEntry, ...]:
    """The entries of a registry folder of named plug-ins (methods, weight updates), in order."""
    entries = []
    for path in sorted(folder.glob("*.yaml")):
        data = _read(path)
        entries.append(
            MethodEntry(
                name=path.stem,
                target=data.get("_target_"),
                order=int(data.get("order", 1000)),
                options={k: v for k, v in data.items() if k not in ENTRY_KEYS},
            )
        )
    return tuple(sorted(entries, key=lambda e: (e.order, e.name)))


@functools.lru_cache(maxsize=1)
def allocator_entries() -> tuple[MethodEntry, ...]:
    """The sparsity allocators: the files of ``conf/sparsity/`` with a ``_target_``, by name."""
    entries = []
    for path in sorted(SPARSITY_DIR.glob("*.yaml")):
        data = _read(path)
        if data.get("_target_"):
            options = {k: v for k, v in data.items() if k not in SPARSITY_KEYS}
            entries.append(MethodEntry(data["allocator"], data["_target_"], 0, options))
    return tuple(sorted(entries, key=lambda e: e.name))


def allocator_names() -> tuple[str, ...]:
    return tuple(e.name for e in allocator_entries())


def allocator_options(entry: MethodEntry) -> dict[str, Option]:
    """An allocator's options: its class's keyword arguments after the target ``sparsity``."""
    return options_of(entry.target, skip=ALLOCATOR_INPUTS)


def allocator_entry(name: str) -> MethodEntry | None:
    """The registered allocator ``name``, or None."""
    return next((e for e in allocator_entries() if e.name == name), None)


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


def options_of(target: str, skip: tuple[str, ...] = ()) -> dict[str, Option]:
    """The declared options of the class ``target`` (less ``skip``), by name, in order."""
    from hydra.utils import get_class

    return declared_options(get_class(target), skip=skip)


def check_options(
    key: str, target: str, options: Mapping[str, Any], inputs: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The ``options`` of the plug-in class ``target``, each checked against its declaration.

    The one check of every plug-in's options (methods, allocators, any ``_target_`` class of a
    config group), run by the config validation and by the builders, before the model loads.

    Args:
        key: The config node, named in refusals: ``method``, ``sparsity``, ...
        target: The class's dotted path (its ``_target_``).
        options: Option name -> value (the registry file's defaults with the user's on top).
        inputs: The class's arguments that its builder passes itself (not options).

    Returns:
        The values as checked (an int given to a float option becomes a float).

    Raises:
        ConfigError: an unknown option, a missing one without a default, or a value outside
            its declared type or range; the message names ``key.<option>`` and what is allowed.
    """
    from gblm.errors import ConfigError

    declared = options_of(target, skip=inputs)
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]} is not an option of {target.rpartition('.')[2]}: its options "
            f"are {', '.join(declared) or 'none'}."
        )
    missing = [o.name for o in declared.values() if o.required and o.name not in options]
    if missing:
        raise ConfigError(f"{key}.{missing[0]} must be set (it has no default).")
    return {
        name: check_value(f"{key}.{name}", value, declared[name].annotation)
        for name, value in options.items()
    }


def _construct(
    what: str, key: str, target: str, options: dict[str, Any], inputs: Mapping[str, Any] = {}
):
    """``target(**inputs, **options)``, the options checked (``inputs``: what the builder passes
    itself, by argument name); a value the class refuses is a ConfigError naming ``what``."""
    from hydra.utils import get_class

    from gblm.errors import ConfigError

    checked = check_options(key, target, options, tuple(inputs))
    try:
        return get_class(target)(**inputs, **checked)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what}: {err}") from err


def build_method(name: str, target: str | None = None, **options: Any):
    """The method ``name`` with its registered defaults updated by ``options``; None for dense.

    Args:
        name: A registered method (a file of ``conf/method/``).
        target: The class's dotted path, when the config names another class than the registry.
        options: Keyword arguments of the class; unknown ones are refused with the allowed list.

    Raises:
        ConfigError: unknown method or option, or a value the class refuses.
    """
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
    return _construct(f"method={name}", "method", target, {**entry.options, **options})


def build_allocator(name: str, sparsity: Any, **options: Any):
    """The sparsity plan of allocator ``name`` for the target ``sparsity`` (a ``Sparsity``).

    Raises:
        ConfigError: unknown allocator or option, or a value the class refuses.
    """
    from gblm.errors import ConfigError

    entry = allocator_entry(name)
    if entry is None:
        raise ConfigError(
            f"sparsity.allocator={name!r} is not allowed: choose one of "
            f"{', '.join(allocator_names())}."
        )
    options = {**entry.options, **options}
    what = f"sparsity.allocator={name}"
    return _construct(what, "sparsity", entry.target, options, {"sparsity": sparsity})


def reconstruct_entries() -> tuple[MethodEntry, ...]:
    """Every registered weight update (``none`` first)."""
    return _folder_entries(RECONSTRUCT_DIR)


def reconstruct_names() -> tuple[str, ...]:
    return tuple(e.name for e in reconstruct_entries())


def build_reconstruct(name: str, **options: Any):
    """The weight update ``name`` with its registered defaults updated by ``options``; None for
    ``none``.

    Raises:
        ConfigError: unknown update or option, or a value the class refuses.
    """
    from gblm.errors import ConfigError

    entry = next((e for e in reconstruct_entries() if e.name == name), None)
    if entry is None:
        raise ConfigError(
            f"reconstruct={name!r} is not allowed: choose one of {', '.join(reconstruct_names())}."
        )
    if entry.target is None:
        return None
    options = {**entry.options, **options}
    return _construct(f"reconstruct={name}", "reconstruct", entry.target, options)


def compose(name: str, method: Any, update: Any, target: Any):
    """The method ``name`` ready for a run to ``target`` (a ``Sparsity``), with ``update`` after
    its masks; None for the dense baseline.

    Raises:
        ConfigError: the method cannot reach ``target``, or the update cannot follow it (the
            dense baseline prunes nothing; SparseGPT updates its weights itself).
    """
    from gblm.errors import ConfigError

    if method is None:
        if update is not None:
            raise ConfigError(
                f"reconstruct={update.name} with method={name}: nothing is pruned, so nothing is "
                "updated (allowed: reconstruct=none)."
            )
        return None
    try:
        method.check_target(target)
        return method.with_update(update)
    except ValueError as err:
        raise ConfigError(f"method={name}: {err}") from None
