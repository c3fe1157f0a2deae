"""Per-shard progress: one log line per shard, plus a live tqdm bar when stderr is a terminal.

Scheduler logs (stderr not a TTY) get only plain log lines, no carriage-return redraws. On a terminal the
bar is drawn by tqdm, which reads ``TQDM_*`` environment variables (e.g. ``TQDM_DISABLE=1``,
``TQDM_MININTERVAL=5``); while it is shown, console log handlers are routed through ``tqdm.write`` so that
log lines and the bar do not overwrite each other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sys
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

_log = logging.getLogger("batch.progress")


def _hms(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(max(seconds, 0.0))))


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds > 0 else "-"


class ProgressLog:
    """Report ``shard_done`` calls as log lines (always) and a tqdm bar (TTY only)."""

    def __init__(self, total_shards: int, total_users: int | None = None, logger: logging.Logger = _log,
                 bar: bool | None = None):
        self.total_shards, self.total_users, self.logger = total_shards, total_users, logger
        self.shards = self.users = self.events = 0
        self._t0 = time.perf_counter()
        self._closed = False
        self._stack = contextlib.ExitStack()
        self._bar: tqdm | None = None
        if bar is None:
            bar = sys.stderr.isatty()
        if bar:
            self._stack.enter_context(logging_redirect_tqdm())
            # Only total/unit/desc are passed, so every other tqdm option stays open to TQDM_* env vars.
            self._bar = self._stack.enter_context(tqdm(total=total_users or total_shards, desc="scoring",
                                                       unit="user" if total_users else "shard"))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def eta(self) -> float | None:
        """Seconds left, from users (when the total is known) or else from shards done so far."""
        elapsed = self.elapsed
        if self.total_users and self.users:
            return (self.total_users - self.users) * elapsed / self.users
        if self.shards:
            return (self.total_shards - self.shards) * elapsed / self.shards
        return None

    def shard_done(self, shard: int, users: int, events: int, seconds: float) -> None:
        """Record that ``shard`` (its id) finished with ``users`` users and ``events`` events in ``seconds``."""
        self.shards += 1
        self.users += users
        self.events += events
        eta = self.eta()
        self.logger.info(
            "shard %d done (%d/%d): %s users, %s events in %.1fs (%s events/s, %s users/s) | "
            "total %s users, elapsed %s, ETA %s",
            shard, self.shards, self.total_shards, f"{users:,}", f"{events:,}", seconds,
            _rate(events, seconds), _rate(users, seconds), f"{self.users:,}", _hms(self.elapsed),
            _hms(eta) if eta is not None else "?")
        if self._bar is not None:
            self._bar.update(users if self.total_users else 1)

    def close(self) -> None:
        """Log the totals and tear the bar down (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stack.close()
        elapsed = self.elapsed
        self.logger.info("scored %s users, %s events in %d/%d shards in %s (%s events/s, %s users/s)",
                         f"{self.users:,}", f"{self.events:,}", self.shards, self.total_shards, _hms(elapsed),
                         _rate(self.events, elapsed), _rate(self.users, elapsed))

    def __enter__(self) -> "ProgressLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
