"""``python -m gblm``: :func:`gblm.cli.cli`."""

from gblm.cli import cli

if __name__ == "__main__":
    cli()
