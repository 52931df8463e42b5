"""``python -m gblm.report SWEEP_DIR [--out DIR]``: the sweep report of :mod:`gblm.analysis.report`."""

import sys

from gblm.analysis.report import build_report, find_runs, main

__all__ = ["build_report", "find_runs", "main"]

if __name__ == "__main__":
    sys.exit(main())
