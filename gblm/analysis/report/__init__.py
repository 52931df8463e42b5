"""Sweep report: tables and figures comparing every run under a sweep directory.

``python -m gblm.report SWEEP_DIR [--out DIR]`` (default ``SWEEP_DIR/report``) reads each run
folder (any folder with a ``metrics.json``; a folder with a ``.hydra/`` but no ``metrics.json``
is an unfinished run) and writes ``report.md``, ``report.html`` (self-contained, images inlined),
the PNG figures and, in ``tables/``, every table as CSV (numbers unformatted) and LaTeX
(booktabs). Per model: perplexity, zero-shot accuracy and wall time per method x sparsity (the
published numbers beside ours where a paper gives them), one table and figure per ablation axis
found in the runs' configs (:mod:`.axes`), the stage timings, zero-shot per task, the mask
structure, the share of zeros per decoder block; failed and unfinished runs are listed, never
silently dropped.

A cell averages repeats (seeds) only, as ``mean ± std (n=k)``; runs of another setting of an axis
are rows of their own, and the same job found in two sweeps is counted once. Methods are ordered
as the method registry orders them (:mod:`gblm.methods.registry`).

Modules: :mod:`.runs` (reading run folders), :mod:`.axes`, :mod:`.tables`, :mod:`.plots`,
:mod:`.render` (Markdown, HTML, CSV, LaTeX) and :mod:`.build` (the sections, :func:`build_report`
and :func:`main`); ``published.yaml`` holds the published numbers.
"""

from gblm.analysis.report.build import build_report, main
from gblm.analysis.report.runs import RunRecord, find_runs, read_run

__all__ = ["RunRecord", "build_report", "find_runs", "main", "read_run"]
