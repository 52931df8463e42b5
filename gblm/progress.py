"""The run's overall estimate: how much of its work is done and about how long is left.

Each stage that does model work is weighed by the tokens it pushes through the model, counted
in forward-pass equivalents (a backward costs about two forwards): a perplexity pass is its
windows x T tokens, GBLM's gradient stage 3 x N x T, the layer walk 2 x N x T (the capture and
the re-forward of every block; its statistics and solves ride on them), a zero-shot pass its
items x choices x context tokens. The rate measured on the stages done so far prices the ones
left. Loading, bookkeeping and magnitude's masking (no forward pass) weigh nothing; the estimate is a guide, printed in the log
after every stage.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("gblm.progress")

#: Tokens per zero-shot item: choices x a typical context (the cloze passages are ~160 tokens).
ZEROSHOT_TOKENS_PER_ITEM = 4 * 160


def planned_work(settings: Any, method: Any, plan: Any) -> dict[str, float]:
    """Stage name -> forward-equivalent tokens, for the stages this run will do."""
    c, p = settings.calibration, settings.perplexity
    work: dict[str, float] = {}
    if p.enabled:
        windows = p.max_windows or 0  # None (all of the text): known only later, weighed as 64
        tokens = (windows or 64) * p.seqlen
        if p.dense or method is None:
            work["perplexity dense"] = tokens
        if method is not None:
            work["perplexity pruned"] = tokens
    if method is not None:
        calibration = (
            c.nsamples * c.seqlen if (method.needs_calibration or plan.needs_calibration) else 0
        )
        if plan.dense_pass:
            work[plan.dense_pass] = 2 * calibration
        if method.dense_pass:
            work[method.dense_pass] = 3 * calibration
        if calibration:  # magnitude's walk runs no forward pass: it is not weighed
            work["prune"] = 2 * calibration
    if settings.zeroshot.enabled:
        work["zero-shot"] = settings.zeroshot.cloze_items * ZEROSHOT_TOKENS_PER_ITEM
    return work


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class OverallEstimate:
    """A :class:`gblm.utils.StageTimer` listener that logs the overall progress after each stage."""

    def __init__(self, work: dict[str, float]) -> None:
        self.work = dict(work)
        self.total = sum(self.work.values())
        self.done_work = 0.0
        self.work_seconds = 0.0  # time spent in the weighed stages
        self.began = time.perf_counter()
        self.lines: list[str] = []

    def __call__(self, event: str, stage: str, seconds: float | None, done: int) -> None:
        if event != "end" or seconds is None:
            return
        if stage in self.work:
            self.done_work += self.work.pop(stage)
            self.work_seconds += seconds
        elapsed = time.perf_counter() - self.began
        line = f"overall: {_duration(elapsed)} so far"
        if self.total and self.done_work:
            share = self.done_work / self.total
            left = (self.total - self.done_work) * self.work_seconds / self.done_work
            line += f", {100 * share:.0f}% of the work done, about {_duration(left)} left"
            if self.work:
                line += f" ({', '.join(self.work)})"
        self.lines.append(line)
        log.info(line)
