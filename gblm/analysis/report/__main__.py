"""``python -m gblm.analysis.report SWEEP_DIR``: the same as ``python -m gblm.report``."""

import sys

from gblm.analysis.report.build import main

sys.exit(main())
