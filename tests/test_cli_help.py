"""``python -m gblm --help``: every method with every option, every group's options."""

from __future__ import annotations

import subprocess
import sys

import yaml

from gblm.cli_help import CONF, GROUPS
from gblm.methods.registry import ENTRY_KEYS, method_names
from gblm.paths import PROJECT_ROOT


def test_help_lists_every_method_option_and_group_file():
    done = subprocess.run([sys.executable, "-m", "gblm", "--help"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr
    text = done.stdout
    lines = text.splitlines()
    for name in method_names():
        assert any(line.split()[:1] == [name] for line in lines), name
        options = yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text())
        for key, value in options.items():
            if key not in ENTRY_KEYS:
                shown = str(value).lower() if isinstance(value, bool) else str(value)
                assert f"method.{key}={shown}" in text, (name, key)
    for group in GROUPS:
        for path in (CONF / group).glob("*.yaml"):
            assert any(line.split()[:1] == [path.stem] for line in lines), (group, path.stem)
    assert "calibration.nsamples" in text and "--hydra-help" in text


def test_short_flag_is_the_same_help():
    from gblm.cli_help import help_text

    done = subprocess.run([sys.executable, "-m", "gblm", "-h"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout == help_text()
