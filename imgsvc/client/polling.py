"""Waiting for a job: when to read it again, and when to give up (shared by both clients)."""

from __future__ import annotations

import time
from collections.abc import Callable

from imgsvc.client.results import Job


class JobWaitTimeout(TimeoutError):
    """The job did not finish in time; `job` is how it was last seen (it goes on running)."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(f"job {job.id} is still {job.status} after {timeout:g} s")
        self.job = job
        self.timeout = timeout


class JobWatch:
    """Polls every `poll_interval` seconds, or later when the service's Retry-After says so,
    until the job has finished or `timeout` seconds (None: no limit) have passed."""

    def __init__(
        self,
        poll_interval: float,
        timeout: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.poll_interval = poll_interval
        self.timeout = timeout
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout

    def next_delay(self, job: Job, retry_after: float | None) -> float | None:
        """Seconds until the next read; None once the job has finished. Raises
        JobWaitTimeout once the deadline has passed (the last read is at the deadline)."""
        if job.finished:
            return None
        delay = max(self.poll_interval, retry_after or 0.0)
        if self._deadline is None:
            return delay
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            assert self.timeout is not None
            raise JobWaitTimeout(job, self.timeout)
        return min(delay, remaining)  # one last read at the deadline
