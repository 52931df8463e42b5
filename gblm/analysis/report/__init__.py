"""Sweep report: tables and plots comparing every run under a sweep directory.

``python -m gblm.report SWEEP_DIR [--out DIR]`` (default ``SWEEP_DIR/report``) reads each run
folder (any folder with a ``metrics.json``; a folder with a ``.hydra/`` but no ``metrics.json``
is an unfinished run) and writes:

- ``report.md``: per model, methods x sparsity tables of perplexity, zero-shot mean accuracy and
  wall time, the stage timings, the mask-structure measures of :mod:`gblm.analysis.stats`, the
  achieved share of zeros per decoder block of every run (beside its per-block target when a
  schedule set one), and every run with its status (failed and unfinished runs are listed,
  never silently dropped);
- PNG plots: perplexity (log scale) and zero-shot accuracy against sparsity per method, the
  per-block share of zeros of each run, and the same Linear's mask side by side across methods;
- ``report.html``: the same content in one self-contained file (images embedded as base64), for
  readers without a W&B server.

Several runs in one cell (seeds, calibration settings) are averaged and the cell says how many.
Methods are ordered as the method registry orders them (:mod:`gblm.methods.registry`).

Modules: :mod:`.runs` (reading run folders), :mod:`.tables`, :mod:`.plots`, :mod:`.render`
(Markdown and HTML) and :mod:`.build` (the sections, :func:`build_report` and :func:`main`).
"""

from gblm.analysis.report.build import build_report, main
from gblm.analysis.report.runs import RunRecord, find_runs, read_run

__all__ = ["RunRecord", "build_report", "find_runs", "main", "read_run"]
