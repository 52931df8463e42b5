"""The registries of plug-ins are config-group folders; nothing else in the code lists names.

- ``conf/method/<name>.yaml``: the class (``_target_``, null for the dense baseline), an ``order``
  in tables (baselines first) and the options, the keyword arguments of the class;
- ``conf/sparsity/<file>.yaml`` with a ``_target_``: a sparsity allocator, registered under its
  ``allocator`` key, its options the class's keyword arguments after the target ``sparsity`` (the
  other files are patterns, ``nm_2_4``, that any allocator takes);
- ``conf/reconstruct/<name>.yaml``: a weight update after the masks (null ``_target_`` for
  ``none``).

Every option is declared once, by its annotation in the class's signature (:mod:`gblm.options`),
and :func:`check_options` checks a plug-in's options against it.
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


@functools.lru_cache(maxsize=2)
def _folder_entries(folder) -> tuple[MethodEntry, ...]:
    """The entries of a folder of named plug-ins (methods, weight updates), in order."""
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
    return tuple(e.name for e in _folder_entries(METHOD_DIR))


def method_entry(name: str) -> MethodEntry:
    """The registry entry of ``name``; KeyError when there is none."""
    return {e.name: e for e in _folder_entries(METHOD_DIR)}[name]


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
    """The ``options`` of the plug-in class ``target`` (less its builder's ``inputs``), each
    checked against its declaration (an int given to a float option becomes a float): the one
    check, by the config validation and the builders. ConfigError names ``key.<option>``."""
    from gblm.errors import ConfigError

    try:
        declared = options_of(target, skip=inputs)
    except (ImportError, ValueError) as err:  # hydra's get_class: no such module, not a class
        reason = str(err.__cause__ or err).splitlines()[0].rstrip(":")
        raise ConfigError(f"{key}._target_={target!r} cannot be imported: {reason}.") from None
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


def _build(
    what: str, key: str, entries: tuple[MethodEntry, ...], name: str, target: str | None,
    options: dict[str, Any], inputs: Mapping[str, Any] = {},
):  # fmt: skip
    """``target(**inputs, **options)`` of the entry ``name`` (``what={name}``), its registered
    options updated by ``options`` and checked; None where it has no ``_target_``. An unknown
    name, or a value the class refuses, is a ConfigError naming ``what``."""
    from hydra.utils import get_class

    from gblm.errors import ConfigError

    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        allowed = ", ".join(e.name for e in entries)
        raise ConfigError(f"{what}={name!r} is not allowed: choose one of {allowed}.")
    target = target or entry.target
    if target is None:
        if given := sorted(set(options) - set(entry.options)):
            raise ConfigError(
                f"{key}.{given[0]}={options[given[0]]!r}: {what}={name} takes no option."
            )
        return None
    checked = check_options(key, target, {**entry.options, **options}, tuple(inputs))
    try:
        return get_class(target)(**inputs, **checked)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what}={name}: {err}") from err


def build_method(name: str, target: str | None = None, **options: Any):
    """The method ``name`` (``target``: another class than the registry's) with its registered
    defaults updated by ``options``; None for dense. ConfigError on an unknown name or option."""
    entries = _folder_entries(METHOD_DIR)
    return _build("method", "method", entries, name, target, options)


def build_allocator(name: str, sparsity: Any, **options: Any):
    """The sparsity plan of allocator ``name`` for the target ``sparsity`` (a ``Sparsity``)."""
    what, entries = "sparsity.allocator", allocator_entries()
    return _build(what, "sparsity", entries, name, None, options, {"sparsity": sparsity})


def reconstruct_entries() -> tuple[MethodEntry, ...]:
    """Every registered weight update (``none`` first)."""
    return _folder_entries(RECONSTRUCT_DIR)


def reconstruct_names() -> tuple[str, ...]:
    return tuple(e.name for e in reconstruct_entries())


def build_reconstruct(name: str, **options: Any):
    """The weight update ``name`` with its registered defaults updated by ``options``; None for
    ``none``."""
    return _build("reconstruct", "reconstruct", reconstruct_entries(), name, None, options)


def compose(name: str, method: Any, update: Any, target: Any):
    """The method ``name`` ready for a run to ``target`` (a ``Sparsity``), with ``update`` after
    its masks; None for the dense baseline. ConfigError where the update cannot follow it."""
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
