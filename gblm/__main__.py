"""``gblm`` (the console script) or ``python -m gblm``: ``--help`` prints gblm's own help, else
:func:`gblm.cli.cli` runs the Hydra app."""

import sys

# Hydra's shell completion and its help for it name the command from sys.argv[0]: a script file
# ("python file.py") or a console script. "python -m gblm" is neither, so they name the console
# script, which completion then runs: eval "$(gblm -sc install=bash)".
_COMPLETION_FLAGS = ("--hydra-help", "-sc", "--shell-completion")


def cli() -> None:
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        from gblm.cli_help import help_text

        sys.stdout.write(help_text())
        return
    if sys.argv[0].endswith("__main__.py") and any(
        arg.split("=", 1)[0] in _COMPLETION_FLAGS for arg in sys.argv[1:]
    ):
        sys.argv[0] = "gblm"
    from gblm.cli import cli as run_cli

    run_cli()


if __name__ == "__main__":
    cli()
