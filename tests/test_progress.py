"""ProgressLog: plain per-shard log lines without a TTY, a tqdm bar with one, TQDM_* env honoured."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from batch.progress import ProgressLog

REPO = str(Path(__file__).resolve().parents[1])
SCRIPT = """
import logging, sys
from batch.progress import ProgressLog
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
p = ProgressLog(total_shards=3, total_users=30)
for i in range(3):
    p.shard_done(i, users=10, events=500, seconds=0.5)
p.close()
"""


def run_script(tty: bool, env: dict[str, str] | None = None) -> str:
    """Run SCRIPT with stderr on a pseudo-terminal or a pipe; return what it wrote to stderr."""
    env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    if not tty:
        return subprocess.run([sys.executable, "-c", SCRIPT], stderr=subprocess.PIPE, env=env, text=True,
                              check=True, timeout=60).stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO once the child has exited and the pty is drained
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    os.close(leader)
    return b"".join(chunks).decode()


def test_log_lines_without_tty_have_no_carriage_returns() -> None:
    err = run_script(tty=False)
    lines = err.strip().splitlines()
    assert "\r" not in err
    assert len(lines) == 4, err
    assert lines[0].startswith("INFO shard 0 done (1/3): 10 users, 500 events in 0.5s (1,000 events/s, 20 users/s)")
    assert "total 10 users, elapsed 0:00:00, ETA 0:00:00" in lines[0]
    assert "scored 30 users, 1,500 events in 3/3 shards" in lines[-1]


def test_bar_on_tty_and_tqdm_disable_env() -> None:
    err = run_script(tty=True)
    assert "\r" in err and "scoring" in err and "30/30" in err  # a live bar, redrawn in place
    assert err.count("shard ") >= 3  # log lines still come through (via tqdm.write)
    err = run_script(tty=True, env={"TQDM_DISABLE": "1"})
    assert "scoring" not in err and err.count("shard ") == 3


def test_tqdm_env_overrides_reach_the_bar() -> None:
    # tqdm reads TQDM_* when it is imported, so this needs a fresh interpreter
    code = ("from batch.progress import ProgressLog; p = ProgressLog(total_shards=2, bar=True); "
            "print(p._bar.mininterval, p._bar.unit); p.close()")
    env = {**os.environ, "PYTHONPATH": REPO, "TQDM_MININTERVAL": "7"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, text=True, check=True,
                         timeout=60).stdout
    assert out.split() == ["7.0", "shard"]


def test_eta_from_users_or_shards(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="batch.progress")
    p = ProgressLog(total_shards=4, total_users=100, bar=False)
    p._t0 -= 10.0  # pretend 10 s have passed
    p.shard_done(0, users=25, events=1000, seconds=10.0)
    assert p.eta() == pytest.approx(30.0, rel=0.01)
    p.total_users = None
    assert p.eta() == pytest.approx(30.0, rel=0.01)
    p.close()
    p.close()  # idempotent
    assert "ETA 0:00:30" in caplog.records[0].getMessage()
    assert sum("scored" in r.getMessage() for r in caplog.records) == 1
