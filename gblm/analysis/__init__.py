"""What a pruning run did to the model, measured and reported.

- :mod:`gblm.analysis.stats`: mask statistics on tensors (per Linear; per block, per type and
  overall; N:M validity). Pure tensor math: no files, no plots, no model.
- :mod:`gblm.analysis.records`: the CSV / JSON records of those statistics in a run folder.
- :mod:`gblm.analysis.plots`: mask images (matplotlib is imported lazily).
- :mod:`gblm.analysis.report`: the sweep report (reading runs, tables, plots, Markdown / HTML).

The package sits above :mod:`gblm.methods` and below :mod:`gblm.eval`; it reads no model and
runs no calibration.
"""
