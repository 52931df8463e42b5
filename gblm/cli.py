"""``gblm`` (the console script) or ``python -m gblm``: gblm's own ``--help``, and a command line
whose config does not compose refused in one paragraph.

Hydra's own message for a bad override is a stack of its internals, so the command line is
composed here first, and a failure is the standard refusal (the key, the allowed values, exit
status 2). Then :func:`gblm.run.main` runs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from gblm.paths import PROJECT_ROOT

_HYDRA_FLAGS = ("--multirun", "-m", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info",
                "-i", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name",
                "-cn", "--config-dir", "-cd", "--resolve", "-p", "--package", "--run", "-r",
                "--experimental-rerun", "--version")  # fmt: skip
# Hydra's shell completion and its help for it name the command from sys.argv[0]: a script file
# ("python file.py") or a console script. "python -m gblm" is neither, so they name the console
# script, which completion then runs: eval "$(gblm -sc install=bash)".
_COMPLETION_FLAGS = ("--hydra-help", "-sc", "--shell-completion")

_TYPE_HINTS = (
    ("converted to Integer", "must be an integer"),
    ("converted to Float", "must be a number"),
    ("not a valid bool", "must be true or false"),
    ("is not Optional", "must not be null"),
    ("is not a ListConfig", "must be a list, e.g. [a,b]"),
)


def _override_value(overrides: list[str], key: str) -> str | None:
    """The value the command line gives ``key`` (the last override of it, as Hydra applies)."""
    for item in reversed(overrides):
        name, _, value = item.partition("=")
        if name.lstrip("+~") == key:
            return value
    return None


def _compose(overrides: list[str], **options):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, **options)


def _unknown_key_message(key: str, overrides: list[str]) -> str:
    """``key`` named with the keys of its parent node, composed without it."""
    from omegaconf import OmegaConf

    from gblm.config import unknown_key_message

    try:
        cfg = _compose([o for o in overrides if o.partition("=")[0].lstrip("+~") != key])
        parent = OmegaConf.select(cfg, key.rpartition(".")[0])
    except Exception:  # another override is bad too: list nothing rather than fail here
        parent = None
    return unknown_key_message(key, parent)


def _parse_failure(overrides: list[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_overrides([item])
        except Exception as err:
            reason = str(err).splitlines()[0]
            key = item.partition("=")[0].lstrip("+~")
            return f"{key}: the override {item!r} cannot be parsed ({reason})."
    return None


def composition_error_message(err: BaseException, overrides: list[str]) -> str:
    """One paragraph for an override that does not compose, naming the key and what is allowed."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    text = str(err)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if isinstance(err, MissingConfigException) and missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        allowed = f": choose one of {', '.join(options)}" if options else ""
        return f"{group}={option} is not an option of {group}{allowed}."
    cause = err.__cause__
    key = getattr(cause, "full_key", None) if cause is not None else None
    if key and isinstance(cause, ConfigAttributeError | ConfigKeyError):
        return _unknown_key_message(str(key), overrides)
    if key:
        reason = str(getattr(cause, "msg", cause)).splitlines()[0]
        hint = next((f"{h} ({reason})" for needle, h in _TYPE_HINTS if needle in reason), reason)
        return f"{key}={_override_value(overrides, str(key))}: {hint}."
    parsed = _parse_failure(overrides)
    return parsed or " ".join(text.split())


def composition_problem(argv: list[str]) -> str | None:
    """The paragraph for a command line whose config does not compose (``hydra.*`` overrides left
    out), or None."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import gblm.config  # noqa: F401  (the schema in Hydra's ConfigStore)

    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    try:
        _compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return composition_error_message(err, overrides)
    return None


def run_folder_problem(argv: list[str]) -> str | None:
    """The refusal for a plain run whose folder cannot be written, or None (Hydra would end in a
    traceback of its logging setup): ``hydra.run.dir`` itself when it is fixed, else its fixed
    part (the folder that the dated run folders go into), tried by writing a file."""
    from omegaconf import OmegaConf

    from gblm.errors import ConfigError
    from gblm.utils import writable_dir

    try:
        cfg = _compose(argv, return_hydra_config=True)
        raw = str(OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"])
    except Exception:  # a Hydra-only option of the command line: Hydra itself decides
        return None
    fixed = raw.partition("${")[0]
    folder = Path(fixed) if fixed == raw or fixed.endswith("/") else Path(fixed).parent
    try:
        writable_dir(folder if str(folder) else ".", "hydra.run.dir")
    except ConfigError as err:
        return str(err) if fixed == raw else f"{err} The run folders {raw} go into it."
    return None


def cli() -> None:
    """``--help`` prints gblm's own help (read as text: no torch, no Hydra); a config that does
    not compose is one paragraph and exit 2; so is a run folder that cannot be written; then
    Hydra. Only plain runs are checked: Hydra's own flags are left to Hydra, and the sweep
    preflight checks a multirun's jobs."""
    argv = sys.argv[1:]
    if any(arg in ("--help", "-h") for arg in argv):
        from gblm.cli_help import help_text

        sys.stdout.write(help_text())
        return
    if sys.argv[0].endswith("__main__.py") and any(
        arg.split("=", 1)[0] in _COMPLETION_FLAGS for arg in argv
    ):
        sys.argv[0] = "gblm"
    if not any(arg.split("=", 1)[0] in _HYDRA_FLAGS for arg in argv):
        problem = composition_problem(argv) or run_folder_problem(argv)
        if problem is not None:
            print(f"gblm: configuration error: {problem}", file=sys.stderr, flush=True)
            raise SystemExit(2)
    from gblm.run import main

    main()
