"""Shards read and turned into sequences in a process of their own, ahead of the engine.

Polars and NumPy work in the engine's process competes with it for the GIL: measured on an H100, a reader thread
cut the torch engine from 3.8 M to 2.4 M tokens/s (GPU busy 72% -> 45%) because kernel launches waited for the
GIL. A separate process (spawned, never forked, so no CUDA or vLLM state is copied) removes that contention and
starts building the first shard while the engine is still loading. One shard is built ahead of the engine.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from batch.events import EventSource
from batch.sequences import SequenceBuilder, ShardSequences


@dataclass
class BuiltShard:
    """One shard's sequences, with when (Unix seconds) and how long its read and build took."""

    seqs: ShardSequences
    read: tuple[float, float, float]  # start, end, seconds
    sequences: tuple[float, float, float]


class ShardReader:
    """``with ShardReader(source, builder, num_shards) as r: r.submit(shard).result()`` -> :class:`BuiltShard`.

    Errors raised while reading (e.g. InputError for a corrupt file) come back from ``result()`` unchanged.
    """

    def __init__(self, source: EventSource, builder: SequenceBuilder, num_shards: int):
        self._args = (source, builder, num_shards)

    def __enter__(self) -> "ShardReader":
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start, initargs=(os.getpid(), *self._args))
        return self

    def submit(self, shard: int) -> "Future[BuiltShard]":
        return self._pool.submit(_build, shard)

    def __exit__(self, exc_type, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)


_state: tuple[EventSource, SequenceBuilder, int] | None = None  # the reader process's inputs


def _start(parent: int, source: EventSource, builder: SequenceBuilder, num_shards: int) -> None:
    global _state
    _state = (source, builder, num_shards)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A job killed with SIGKILL cannot stop its reader: the reader notices it was orphaned and exits. ``parent`` is
    the job's pid as the job saw it (not ``os.getppid()`` here: a reader still starting when the job died would
    take its new parent, init, for the job and never exit)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _timed(t0: float, wall0: float) -> tuple[float, float, float]:
    return wall0, time.time(), time.perf_counter() - t0


def _build(shard: int) -> BuiltShard:
    assert _state is not None, "reader process not started"
    source, builder, num_shards = _state
    t0, wall0 = time.perf_counter(), time.time()
    rows = source.collect(builder.shard_frame(source.frame, shard, num_shards))
    read = _timed(t0, wall0)
    t0, wall0 = time.perf_counter(), time.time()
    seqs = builder.build(rows)
    return BuiltShard(seqs, read, _timed(t0, wall0))
