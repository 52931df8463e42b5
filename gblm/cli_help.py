"""``gblm --help``: the groups, every method with its options, the top-level keys.

Read as text from where each is defined, without importing torch or Hydra, so that it prints at
once: the methods and their options from ``conf/method/*.yaml`` (each option's comment is its
help), the other groups' options from their files' first comment paragraph, the top-level keys
and their comments from the schema's source (:class:`gblm.config.RunConf`, read with ``ast``).
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

from gblm.methods.registry import ENTRY_KEYS
from gblm.paths import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"
SCHEMA_SOURCE = PROJECT_ROOT / "gblm" / "config.py"
GROUPS = ("model", "sparsity", "calibration", "eval", "logger", "experiment")
WIDTH = 100
_OPTION = re.compile(r"^([A-Za-z_][\w]*):\s*(.*?)\s*(?:#\s*(.*))?$")
# A sentence ends at a full stop followed by a capital or a digit (or the end); "e.g.", "i.e."
# and the dots of a range ("1 .. 128") do not end one.
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)(?<!\.)\.(?=\s+[A-Z0-9(`]|\s*$)")


def sentence(text: str) -> str:
    """The first sentence of ``text``, ending in a full stop (its first word keeps its case: it
    is often a value, ``l1 | l2``)."""
    text = " ".join(text.split())
    end = _SENTENCE_END.search(text)
    text = text[: end.start()] if end else text.rstrip(".")
    return text + "." if text else ""


def _leading_comment(path: Path) -> str:
    """The file's first comment paragraph (after a ``# @package`` line): the comment lines up to
    an empty or indented one (an example command)."""
    lines = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("# @package"):
            continue
        if not text.startswith("#") or text.rstrip("#").strip() == "" or text.startswith("#  "):
            break
        lines.append(text.lstrip("#").strip())
    return " ".join(lines)


def description(path: Path) -> str:
    """One option of a group as a sentence: its file's first comment sentence, else the Hub model
    it names."""
    text = _leading_comment(path)
    if not text:
        hub = re.search(r"^name_or_path:\s*(\S+)", path.read_text(), flags=re.M)
        text = f"The Hub model {hub.group(1)}" if hub else f"The {path.stem} option"
    return sentence(text)


def _entry(text: str, help_text: str, indent: int, column: int) -> list[str]:
    """``text`` then ``help_text`` from ``column``, wrapped to :data:`WIDTH` under it."""
    head = " " * indent + text
    long = len(head) >= column  # a long key: its help on the next line
    lines = textwrap.wrap(help_text, WIDTH, subsequent_indent=" " * column,
                          initial_indent=" " * column if long else head.ljust(column),
                          break_on_hyphens=False, break_long_words=False)  # fmt: skip
    return [head, *lines] if long else lines or [head]


def _method_lines(path: Path) -> list[str]:
    """A method (or weight update) and its options, ``group.key=default``, from its yaml."""
    group = path.parent.name
    lines = _entry(path.stem, description(path), 2, 15)
    for raw in path.read_text().splitlines():
        match = _OPTION.match(raw)  # top-level keys only (no indentation)
        if match and match.group(1) not in ENTRY_KEYS:
            key, value, comment = match.groups()
            lines += _entry(f"{group}.{key}={value}", sentence(comment or ""), 6, 43)
    return lines


def _shown(value: object) -> str:
    """A default as it is typed on the command line: ``true``, ``null``, ``[a, b]``."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_shown, value)) + "]"
    return str(value)


def schema_keys() -> list[tuple[str, str, str]]:
    """``(key, default, comment)`` of the schema's top-level scalar keys, read from its source."""
    source = SCHEMA_SOURCE.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RunConf")
    constants = {
        target.id: n.value
        for n in tree.body if isinstance(n, ast.Assign)
        for target in n.targets if isinstance(target, ast.Name)
    }  # fmt: skip
    keys = []
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        value = item.value
        if isinstance(value, ast.Call):  # field(default_factory=...): a group, or a list
            factory = next((k.value for k in value.keywords if k.arg == "default_factory"), None)
            if not isinstance(factory, ast.Lambda):
                continue  # a group node (ModelConf, ...): listed by group
            value = factory.body
        if isinstance(value, ast.Call) and value.args and isinstance(value.args[0], ast.Name):
            value = constants.get(value.args[0].id, value)  # list(CONSTANT): the constant's value
        default = ast.literal_eval(value) if value is not None else None
        comment = re.search(r"#\s*(.*)$", lines[item.lineno - 1])
        above = []
        row = item.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        text = comment.group(1) if comment else " ".join(above)
        keys.append((item.target.id, _shown(default), text))
    return keys


def help_text() -> str:
    from gblm.methods.registry import method_names, reconstruct_names

    lines = [
        "gblm: prune a causal LM and evaluate it (one run), or sweep many (-m).",
        "",
        "  gblm [group=option ...] [key=value ...]                # or: python -m gblm ...",
        "  gblm -m method=wanda,gblm sparsity.ratio=0.5,0.6      # a Hydra multirun",
        "  gblm experiment=demo                                   # a stored experiment",
        "",
        "Methods (method=NAME), with their options and defaults:",
    ]
    for name in method_names():
        lines += _method_lines(CONF / "method" / f"{name}.yaml")
    lines += [
        "",
        "Weight updates after the masks (reconstruct=NAME; after any mask method but sparsegpt and admm):",
    ]
    for name in reconstruct_names():
        lines += _method_lines(CONF / "reconstruct" / f"{name}.yaml")
    for group in GROUPS:
        lines += ["", f"{group} (= one of):"]
        for path in sorted((CONF / group).glob("*.yaml")):
            lines += _entry(path.stem, description(path), 2, 25)
    lines += ["", "Top-level keys (key=default):"]
    for key, default, comment in schema_keys():
        lines += _entry(f"{key}={default}", sentence(comment), 2, 43)
    lines += [
        "",
        "Group keys: sparsity.ratio, sparsity.per_block, calibration.nsamples, calibration.seqlen,",
        "eval.perplexity.max_windows, ... (gblm --cfg job prints the whole composed config).",
        "Hydra's own options: --hydra-help. Tab completion of groups and keys in bash:",
        '  eval "$(gblm -sc install=bash)"   # gblm is the console script of the installed package',
    ]
    return "\n".join(lines) + "\n"
