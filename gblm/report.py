"""``python -m gblm.report SWEEP_DIR [--out DIR]``: the sweep report of :mod:`gblm.analysis.report`."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gblm.analysis.report.build import build_report
from gblm.analysis.report.runs import find_runs
from gblm.errors import ConfigError

__all__ = ["build_report", "find_runs", "main"]
DESCRIPTION = "Sweep report: tables and plots comparing every run under a sweep directory."


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gblm.report SWEEP_DIR [--out DIR]``; 2 when the sweep folder is missing
    or the report's folder cannot be written."""
    parser = argparse.ArgumentParser(prog="python -m gblm.report", description=DESCRIPTION)
    parser.add_argument(
        "sweep_dir", type=Path, help="a sweep folder (or any folder of run folders)"
    )
    parser.add_argument("--out", type=Path, help="the report's folder (default SWEEP_DIR/report)")
    args = parser.parse_args(argv)
    try:
        out = build_report(args.sweep_dir, args.out)
    except (FileNotFoundError, ConfigError) as err:  # no sweep folder; --out not writable
        print(err, file=sys.stderr)
        return 2
    print(f"Wrote {out / 'report.md'}, {out / 'report.html'} and the tables in {out / 'tables'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
