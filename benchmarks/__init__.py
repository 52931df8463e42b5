"""Benchmarks of gblm: time, memory and ratio to floor of every method and stage.

``make bench`` (``python -m benchmarks.run``) runs them, on tiny LLaMAs and SmolLM2; ``--quick``
for a short run, ``--no-smollm2`` without the real model. ``make bench-gpu``
(:mod:`benchmarks.gpu`) is the GPU benchmark. See :mod:`benchmarks.suite` for what is measured
and how.
"""
