"""Sweep report: tables and figures comparing every run under a sweep directory (README, "The
sweep report"). :mod:`.runs` reads the run folders, :mod:`.axes` finds the swept settings,
:mod:`.tables` and :mod:`.plots` make the tables and their figures, :mod:`.render` writes them
(Markdown, HTML, CSV, LaTeX) and :mod:`.build` assembles the sections; ``published.yaml`` holds
the published numbers."""

from gblm.analysis.report.build import build_report, main
from gblm.analysis.report.runs import RunRecord, find_runs, read_run

__all__ = ["RunRecord", "build_report", "find_runs", "main", "read_run"]
