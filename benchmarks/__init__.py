"""Benchmarks of gblm: time, memory and ratio to floor of every method and stage.

``make bench`` (``python -m benchmarks.run``) runs them; ``--quick`` for a short run, ``--smollm2``
adds the real model. See :mod:`benchmarks.suite` for what is measured and how.
"""
