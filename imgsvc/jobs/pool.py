"""The embedded runner: worker threads in the API process reading the job store (no broker, no
extra service). A new job wakes them; otherwise they look for claimable items every `poll_s`
(which also picks up items whose worker died: their lease expired)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from imgsvc.jobs import store
from imgsvc.jobs.runner import ItemRunner

log = logging.getLogger("imgsvc.jobs")
BUSY_BACKOFF_S = 0.5  # after an item found the device queue full


class LocalPool:
    def __init__(self, runner: ItemRunner, *, threads: int, poll_s: float) -> None:
        self.runner = runner
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"imgsvc-jobs-{n}", daemon=True)
            for n in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def dispatch(self, items: Sequence[tuple[int, str]]) -> None:
        """New or re-queued items: wake the threads (they claim from the store)."""
        if items:
            self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.runner.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ids = store.claimable(self.runner.db, limit=4)
            except SQLAlchemyError:
                log.exception("job store unreachable; retrying in %s s", self.poll_s)
                ids = []
            if not ids:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            for item_id in ids:
                if self._stop.is_set():
                    return
                try:
                    outcome = self.runner.run(item_id)
                except Exception:
                    log.exception("item #%d: runner error", item_id)
                    outcome = "retry"
                if outcome == "retry":
                    self._stop.wait(BUSY_BACKOFF_S)
