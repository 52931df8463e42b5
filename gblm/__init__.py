"""gblm: prune causal language models with GBLM-Pruner, Wanda, SparseGPT, magnitude and more.

``gblm.prune`` and ``gblm.evaluate`` (:mod:`gblm.api`, imported on first use, so that ``import
gblm`` stays light); ``python -m gblm`` runs the Hydra app.
"""

__version__ = "0.1.0"
__all__ = ["PruneResult", "evaluate", "method_names", "prune"]


def __getattr__(name: str):
    if name in ("prune", "evaluate", "PruneResult"):
        from gblm import api

        return getattr(api, name)
    if name == "method_names":
        from gblm.methods.registry import method_names

        return method_names
    raise AttributeError(f"module 'gblm' has no attribute {name!r}")
