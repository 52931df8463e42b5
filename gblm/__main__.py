"""``python -m gblm``: the Hydra app (see ``gblm.run``), its config checked first (``cli``)."""

from gblm.run import cli

if __name__ == "__main__":
    cli()
