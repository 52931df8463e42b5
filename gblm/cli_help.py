"""``python -m gblm --help``: the groups, every method with its options, the top-level keys.

Everything is read from where it is defined: the methods and their options from
``conf/method/*.yaml`` (the registry; each option's comment is its help line), the other groups'
options from their files' first comment line, the top-level keys from the schema
(:class:`gblm.config.RunConf`) and its comments. Hydra's own help stays at ``--hydra-help``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from gblm.methods.registry import ENTRY_KEYS
from gblm.paths import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"
GROUPS = ("model", "sparsity", "calibration", "eval", "logger", "experiment")
_OPTION = re.compile(r"^([A-Za-z_][\w]*):\s*(.*?)\s*(?:#\s*(.*))?$")


def _description(path: Path) -> str:
    """The file's first comment line (after a ``# @package`` line), without the ``#``."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") and not text.startswith("# @package"):
            return text.lstrip("#").strip()
        if text and not text.startswith("#"):
            break
    return ""


def _method_lines(path: Path, group: str = "method") -> list[str]:
    lines = [f"  {path.stem:<12} {_description(path)}"]
    for raw in path.read_text().splitlines():
        match = _OPTION.match(raw)  # top-level keys only (no indentation)
        if match and match.group(1) not in ENTRY_KEYS:
            key, value, comment = match.groups()
            text = f"{group}.{key}={value}"
            lines.append(f"      {text:<36} {comment or ''}".rstrip())
    return lines


def _schema_lines() -> list[str]:
    """``key=default  comment`` for the schema's top-level scalar keys, comments from its source."""
    from gblm.config import RunConf

    source = inspect.getsource(RunConf).splitlines()
    comments = {}
    for i, line in enumerate(source):
        match = re.match(r"\s+(\w+):.*?#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
        elif re.match(r"\s+(\w+):", line) and i and source[i - 1].strip().startswith("#"):
            comments[line.split(":")[0].strip()] = source[i - 1].strip().lstrip("# ")
    lines = []
    for f in dataclasses.fields(RunConf):
        if f.name in GROUPS or f.name in ("method", "reconstruct"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.name}={default}".replace("'", "")
        lines.append(f"  {text:<40} {comments.get(f.name, '')}".rstrip())
    return lines


def help_text() -> str:
    from gblm.methods.registry import method_names, reconstruct_names

    lines = [
        "gblm: prune a causal LM and evaluate it (one run), or sweep many (-m).",
        "",
        "  python -m gblm [group=option ...] [key=value ...]",
        "  python -m gblm -m method=wanda,gblm sparsity.ratio=0.5,0.6   # a Hydra multirun",
        "  python -m gblm experiment=demo                               # a stored experiment",
        "",
        "Methods (method=NAME), with their options and defaults:",
    ]
    for name in method_names():
        lines += _method_lines(CONF / "method" / f"{name}.yaml")
    lines += [
        "",
        "Weight updates after the masks (reconstruct=NAME; any mask method but sparsegpt):",
    ]
    for name in reconstruct_names():
        lines += _method_lines(CONF / "reconstruct" / f"{name}.yaml", "reconstruct")
    for group in GROUPS:
        lines += ["", f"{group} (= one of):"]
        for path in sorted((CONF / group).glob("*.yaml")):
            lines.append(f"  {path.stem:<24} {_description(path)}".rstrip())
    lines += ["", "Top-level keys (key=default):", *_schema_lines()]
    lines += [
        "",
        "Group keys: sparsity.ratio, sparsity.per_block, calibration.nsamples, calibration.seqlen,",
        "eval.perplexity.max_windows, ... (python -m gblm --cfg job prints the whole composed config).",
        "Hydra's own options: --hydra-help.",
    ]
    return "\n".join(lines) + "\n"
