"""gblm: prune causal language models with GBLM-Pruner, Wanda, SparseGPT and magnitude."""

__version__ = "0.1.0"
