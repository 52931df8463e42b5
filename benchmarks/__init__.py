"""Benchmarks of gblm: time, peak memory and ratio to a floor per method and stage.

One harness. :mod:`benchmarks.measure` runs one configuration (model, method, sparsity
allocator, N x T calibration, device, dtype, onload) in a fresh Python process and prunes it
through :func:`gblm.pipeline.prune`: the stage seconds are those of the pipeline's own
:class:`gblm.utils.StageTimer` (``outlier ratios``, ``gradients``, ``prune``; the benchmark adds
``perplexity pruned`` in the same timer); a listener on that timer reads each stage's peak memory
(the resident high-water mark, reset per stage; on CUDA the allocator's peak, between device
synchronisations). Nothing in gblm is wrapped or patched: a split the timer does not give (the
walk's parts) is not measured. :mod:`benchmarks.flops` prices each stage: its matrix-product
FLOPs at the matmul rate, plus the bytes it must move at the copy bandwidth, both measured in the
same process; and a run's memory floor: weights + one block's scratch + N x T x hidden
activations + the method's state (GBLM's accumulators, SparseGPT's Hessians of one block).

Four reports, each a thin module over :func:`benchmarks.measure.measure`:

- ``make bench`` (:mod:`benchmarks.run`, then :mod:`benchmarks.floor`): magnitude, Wanda,
  SparseGPT, GBLM and Wanda with OWL on SmolLM2-135M at 32 x 256; per method and stage the
  seconds, floor and ratio, the peak memory beside the memory floor, verdicts on the targets.
- ``make bench-floor`` (:mod:`benchmarks.floor`): GBLM's gradient stage and the Wanda walk at
  32 x 256 and 128 x 256 on SmolLM2 and on a 2048-wide LLaMA, against their FLOP floor.
- ``make bench-onload`` (:mod:`benchmarks.onload`): a 1.55B LLaMA shape from disk-backed weights
  against the in-memory run: peak anonymous memory, time, masks compared.
- ``make bench-gpu`` (:mod:`benchmarks.gpu`): GBLM end to end on a LLaMA-2-7B shape on one GPU.

Reports go to ``outputs/bench/`` (``outputs/bench_onload/``) as JSON and Markdown. ``--smoke``
runs each in seconds, in-process, for ``tests/test_bench*.py``.
"""
