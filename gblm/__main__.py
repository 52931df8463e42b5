"""``python -m gblm``: the Hydra app (see ``gblm.run``)."""

from gblm.run import main

if __name__ == "__main__":
    main()
