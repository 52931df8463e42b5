"""``python -m gblm``: the Hydra app (see ``gblm.run``); ``--help`` prints gblm's own help, and a
config that does not compose is refused before Hydra starts (:func:`gblm.cli.cli`)."""

import sys


def cli() -> None:
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        from gblm.cli_help import help_text

        sys.stdout.write(help_text())
        return
    from gblm.cli import cli as run_cli

    run_cli()


if __name__ == "__main__":
    cli()
