"""RateLimit (include/qemu/ratelimit.h): the speed limit of jobs and block-copy."""

from __future__ import annotations

import time


def now_ns() -> int:
    return time.monotonic_ns()


class RateLimit:
    """Slices of ``slice_ns``; a slice's quota is speed * slice; excess data delays."""

    def __init__(self) -> None:
        self.slice_quota = 0
        self.slice_ns = 0
        self.slice_start_time = 0
        self.slice_end_time = 0
        self.dispatched = 0

    def set_speed(self, speed: int, slice_ns: int) -> None:
        """ratelimit_set_speed: speed 0 disables throttling."""
        self.slice_ns = slice_ns
        self.slice_quota = 0 if speed == 0 else max(int(speed * slice_ns / 1e9), 1)

    def calculate_delay(self, n: int) -> int:
        """ratelimit_calculate_delay: ns to wait before sending more (0: go on)."""
        if not self.slice_quota:
            return 0
        now = now_ns()
        if self.slice_end_time < now:
            self.slice_start_time = now
            self.slice_end_time = now + self.slice_ns
            self.dispatched = 0
        self.dispatched += n
        if self.dispatched < self.slice_quota:
            return 0
        # the slice is extended from its start by dispatched/quota slices (QEMU multiplies
        # slice_ns, not the already extended slice, so repeated calls do not compound)
        delay_slices = self.dispatched / self.slice_quota
        self.slice_end_time = self.slice_start_time + int(delay_slices * self.slice_ns)
        return self.slice_end_time - now
