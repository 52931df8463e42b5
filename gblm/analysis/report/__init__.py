"""Sweep report (``python -m gblm.report``; README, "The sweep report"): :mod:`.runs` reads the
run folders, :mod:`.axes` finds the swept settings, :mod:`.tables` and :mod:`.plots` make the
tables and their figures, :mod:`.render` writes them (Markdown, HTML, CSV, LaTeX) and
:mod:`.build` assembles the sections; ``published.yaml`` holds the published numbers."""
