"""``python -m gblm --help``: every method with every option, every group's options."""

from __future__ import annotations

import subprocess
import sys

import pytest
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


def test_every_description_is_a_whole_sentence():
    """No description stops mid-sentence: each is the first sentence of its source, whole."""
    from gblm.cli_help import _leading_comment, description, schema_keys, sentence

    for group in (*GROUPS, "method"):
        for path in (CONF / group).glob("*.yaml"):
            text = description(path)
            assert text.endswith(".") and "  " not in text, (path, text)
            source = " ".join(_leading_comment(path).split())
            assert not source or source.startswith(text[:-1]), (path, text)
    keys = schema_keys()
    assert {"seed", "device", "save_model", "mask_images", "overwrite"} <= {k for k, _, _ in keys}
    assert all(comment for _, _, comment in keys), [k for k, _, c in keys if not c]
    assert sentence("ratios that rise (e.g. 0.5). The second sentence.") == (
        "ratios that rise (e.g. 0.5)."
    )
    assert sentence("N = 1 .. 128 for three methods") == "N = 1 .. 128 for three methods."
    assert sentence("the paper's protocol. 2 x 4 = 8 jobs") == "the paper's protocol."


def test_help_imports_neither_torch_nor_hydra():
    """--help reads text only, so it prints at once (under 0.3 s of CPU on an idle 2-core
    machine, where importing torch alone takes seconds)."""
    code = (
        "import sys; from gblm.__main__ import cli; sys.argv = ['gblm', '--help']; cli(); "
        "heavy = [m for m in ('torch', 'transformers', 'hydra', 'omegaconf') if m in sys.modules]; "
        "sys.stderr.write(repr(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stderr.endswith("[]"), done.stderr[-2000:]
    assert "gblm -sc install=bash" in done.stdout  # how to turn on completion


def test_hydra_help_names_a_command_its_completion_can_run():
    """Under python -m gblm, Hydra's completion lines name the console script gblm (Hydra knows
    script files and console scripts, not modules), and installing it registers gblm."""
    done = subprocess.run([sys.executable, "-m", "gblm", "--hydra-help"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'eval "$(gblm -sc install=bash)"' in done.stdout and "__main__.py" not in done.stdout


@pytest.mark.slow
def test_bash_completion_through_the_console_script(tmp_path):
    """The README's line, in a real bash: completing ``gblm method=wa`` offers method=wanda."""
    import os
    from pathlib import Path

    script = (
        'eval "$(gblm -sc install=bash)"\n'
        'COMP_LINE="gblm method=wa"; COMP_POINT=${#COMP_LINE}; COMP_CWORD=1\n'
        'hydra_bash_completion; echo "${COMPREPLY[@]}"\n'
    )
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PATH": path})  # fmt: skip
    assert "method=wanda" in done.stdout.split(), done.stdout + done.stderr[-2000:]
