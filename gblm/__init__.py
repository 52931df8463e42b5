"""gblm: prune causal language models with GBLM-Pruner, Wanda, SparseGPT, magnitude and more.

The Python API (:mod:`gblm.api`): ``gblm.prune(model, tokenizer, method=..., sparsity=...,
calibration=...)`` and ``gblm.evaluate(model, tokenizer, texts)``. ``python -m gblm`` runs the
Hydra app. The API is imported on first use, so ``import gblm`` stays light.
"""

import os as _os

# OpenMP threads that finish their share of an operation spin for a few milliseconds (libgomp's
# default) before they sleep. On a machine whose cores other processes also use, a spinning
# thread holds a core that the thread the others wait for needs: two threads beside one
# CPU-bound process ran Wanda 4-5 times slower than one thread. PASSIVE threads sleep at once:
# as fast as one thread there, as fast as spinning on an idle machine (``make bench``). Set before
# torch starts its OpenMP runtime (``python -m gblm``, or ``import gblm`` before torch); a
# setting of the user's own (OMP_WAIT_POLICY or GOMP_SPINCOUNT) is kept.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

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
