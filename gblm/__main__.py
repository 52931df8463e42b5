"""``python -m gblm``: the Hydra app (see ``gblm.run``); ``--help`` prints gblm's own help."""

import sys


def cli() -> None:
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        from gblm.cli_help import help_text

        sys.stdout.write(help_text())
        return
    from gblm.run import main

    main()


if __name__ == "__main__":
    cli()
