"""The run's overall estimate, logged after every stage: how much of its work is done and about
how long is left. Each stage is weighed by the tokens it pushes through the model
(:func:`gblm.pipeline.planned_stages`), a cached one by nothing; the rate measured so far prices
the stages left.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("gblm.progress")


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
        if event == "cached" and stage in self.work:  # read from a cache: no work to weigh
            self.total -= self.work.pop(stage)
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
