"""ProgressMeter (block/progress_meter.c): ``current`` and ``total`` bytes of a job.

query-jobs shows them as current-progress / total-progress, BLOCK_JOB_* events as offset /
len. Finished work does not change the total; only set/increase_remaining do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ProgressMeter:
    current: int = 0
    total: int = 0

    def work_done(self, done: int) -> None:
        """progress_work_done."""
        self.current += done

    def set_remaining(self, remaining: int) -> None:
        """progress_set_remaining: total = current + remaining."""
        self.total = self.current + remaining

    def increase_remaining(self, delta: int) -> None:
        """progress_increase_remaining."""
        self.total += delta
