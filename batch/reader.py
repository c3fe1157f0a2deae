"""Shards read and turned into sequences in processes of their own, ahead of the engine.

Polars and NumPy work in the engine's process competes with it for the GIL: measured on an H100, a reader thread
cut the torch engine from 3.8 M to 2.4 M tokens/s (GPU busy 72% -> 45%) because kernel launches waited for the
GIL. Separate processes (spawned, never forked, so no CUDA or vLLM state is copied) remove that contention and
start building the first shards while the engine is still loading. One process built a shard in ~3 s where the
GPU scored it in ~1.9 s, so several readers build consecutive shards in parallel; the job still takes them in
shard order, so the output does not depend on how many there are.

The processes are started first thing in the job, before the checkpoint is loaded, so that their imports (Polars,
and torch through the job's modules) overlap that load; their inputs (the shard files, the builder) follow once
those exist. Started after the load, beside the pass that partitions the input, 4 readers took ~5.4 s to spawn and
import on an H100 host (60,000 users, 8 shards), and the torch engine waited 5.5 s for its first shard, a third
of a 16 s job.

The shards' rows are read from the input once: :class:`ShardFiles` writes every shard's rows to a local temporary
Arrow IPC file in one streaming pass, and each reader reads only its shard's file. Before, every shard scanned the
whole input and kept its users by hash: at 60,000 users x ~1,000 events in 8 shards that was 8 full scans, and
each extra shard cost one more.

Each reader's Polars gets an even share of the CPUs (``POLARS_MAX_THREADS``), else every reader would start a
thread per core. Polars reads that variable once, and a spawned child imports polars while it unpickles its
target (and the job's ``__main__``), before any initializer runs: so the variable is put in the parent's
environment for the moment each child is started, which the child inherits.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.reduction import ForkingPickler
from typing import Any, Iterator

import polars as pl

from batch.events import DROP_REASON, EventSource
from batch.orphans import exit_with_parent
from batch.sequences import SequenceBuilder, ShardSequences, in_window, shard_of

MAX_AUTO_WORKERS = 4  # read_workers=0 starts one reader per 4 CPUs, at most this many
TEMP_PREFIX = "mtgr-shards-"  # + host-pid-random: the job's temporary directory under data.temp_dir
_SHARD = "_shard"


class ShardFiles:
    """``with ShardFiles(source, num_shards, temp_dir) as shards:`` a job-owned temporary directory;
    ``shards.write()`` puts each shard's rows (in the run window, clean and dirty) into its own Arrow IPC files in
    one streaming pass over the input, then ``shards.frame(k)`` scans shard k's files only.

    Disk: the in-window rows uncompressed, ~50 bytes per event for the default columns (3.2 GB for 64 M events).
    The directory (``<temp_dir or the system temp dir>/mtgr-shards-<host>-<pid>-*``) is removed when the block
    exits, on success, error or SIGTERM; if the job is SIGKILLed, a reader that has its inputs removes it; the next
    job on the host removes any left by a dead job. With one shard nothing is written: the shard is the input, read
    once either way.
    """

    def __init__(self, source: EventSource, num_shards: int, temp_dir: str | None = None):
        self.source = source
        self.num_shards = num_shards
        self.temp_dir = temp_dir or tempfile.gettempdir()
        self.path: str | None = None

    def __enter__(self) -> "ShardFiles":
        if self.num_shards > 1:
            os.makedirs(self.temp_dir, exist_ok=True)
            remove_stale(self.temp_dir)
            self.path = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-",
                                         dir=self.temp_dir)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Delete the files (idempotent)."""
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)

    def write(self) -> None:
        """One streaming pass over the input (bounded memory) that writes every shard's files. Counting rows in
        the same pass (``pl.collect_all`` with the count query) saved ~20% of its CPU but held ~1.2 GB more at
        60,000 users x ~1,000 events, so the job counts in a pass of its own."""
        if self.path is None:
            return
        rows = self._file_rows()
        self.source.collect(rows.sink_ipc(pl.PartitionBy(self.path, key=_SHARD, include_key=False,
                                                         file_path_provider=self._file_name), lazy=True))

    def _file_rows(self) -> pl.LazyFrame:
        """The rows the files hold, with their shard in column _SHARD."""
        return self._rows().with_columns(
            shard_of("user_id", self.source.frame.collect_schema()["user_id"], self.num_shards).alias(_SHARD),
            pl.col(DROP_REASON).cast(pl.Categorical))  # null for almost every row: 4 bytes, not a string view

    def _rows(self) -> pl.LazyFrame:
        """The input rows some shard reads (a null user id belongs to none)."""
        return self.source.frame.filter(pl.col("user_id").is_not_null(), in_window())

    def _file_name(self, args: Any) -> str:
        shard = int(args.partition_keys[_SHARD][0])
        return os.path.join(self.path, f"shard-{shard:05d}-{args.index_in_partition:05d}.arrow")

    def frame(self, shard: int) -> pl.LazyFrame:
        """The rows of ``shard`` (any order; collect with ``source.collect``)."""
        if self.path is None:
            return self._rows()
        files = sorted(glob.glob(os.path.join(self.path, f"shard-{shard:05d}-*.arrow")))
        if files:
            return pl.scan_ipc(files)
        return pl.LazyFrame(schema=self._file_rows().drop(_SHARD).collect_schema())  # a shard with no rows


def remove_stale(temp_dir: str) -> None:
    """Remove shard directories under ``temp_dir`` that jobs on this host left when they were killed."""
    host = f"{TEMP_PREFIX}{socket.gethostname()}-"
    for entry in glob.glob(os.path.join(glob.escape(temp_dir), glob.escape(host) + "*")):
        pid = os.path.basename(entry)[len(host):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class BuiltShard:
    """One shard's sequences, with when (Unix seconds) and how long its read and build took."""

    seqs: ShardSequences
    read: tuple[float, float, float]  # start, end, seconds
    sequences: tuple[float, float, float]


class ShardReader:
    """``with ShardReader(workers, num_shards) as r:`` then ``r.begin(shards, builder)`` and ``r.take()`` once
    per shard, in order.

    Entering starts the reader processes, which import their libraries meanwhile and then wait for their inputs:
    :meth:`begin` sends them the shard files (:class:`ShardFiles`, entered) and the builder; :meth:`start` (or the
    first ``take()``) sends them the first shards, once the files are written. A block left without ``begin()``
    (the job failed before its inputs were ready) stops the waiting processes.

    ``workers`` reader processes (0 = auto, see :func:`reader_count`) build the next shards while the caller works
    on the one it took: at most ``workers`` shards are being built or wait to be taken. They run ``nice`` steps
    below the caller's priority, so that on a host whose CPUs are all busy the engine's host work goes first.
    Errors raised while reading (e.g. InputError for a corrupt file) come back from ``take()`` of that shard,
    unchanged.
    """

    def __init__(self, workers: int, num_shards: int, nice: int = 0):
        self.num_shards = num_shards
        self._nice = nice
        self.workers = reader_count(workers, num_shards)
        self.threads = max(1, _cpus() // self.workers)  # Polars threads per reader process

    def __enter__(self) -> "ShardReader":
        context = _ReaderContext(self.threads)
        self._queue = context.Queue()
        self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start,
                                         initargs=(os.getpid(), self._queue, self._nice))
        self._ahead: deque[Future[BuiltShard]] = deque()
        self._submitted = 0
        self._begun = self._started = False
        try:
            for _ in range(self.workers):  # spawns the processes now: each runs _start (imports) at once
                self._pool.submit(_ready)
        except BaseException:
            self._close()
            raise
        return self

    def begin(self, shards: ShardFiles, builder: SequenceBuilder) -> None:
        """Send every reader its inputs: ``shards`` (entered, its files written before :meth:`start`) and
        ``builder``; returns at once."""
        if self._begun:
            raise RuntimeError("ShardReader.begin() was already called")
        if shards.num_shards != self.num_shards:
            raise ValueError(f"the shard files have {shards.num_shards} shards, the readers expect {self.num_shards}")
        # The inputs (the builder holds the item vocabulary: 16 MB at 1M items) go through a queue, not with the
        # process: Process.start() writes its arguments into a pipe that the child reads only after importing
        # the job's modules, so with large arguments each start waited for that import (~3 s on an H100 host,
        # one reader after the other: 10-13 s of every job's start-up). A queue's own thread writes them, pickled
        # here once (so that an input that cannot be pickled fails here, not in that thread).
        inputs = ForkingPickler.dumps((shards, builder)).tobytes()
        for _ in range(self.workers):
            self._queue.put(inputs)
        self._begun = True

    def start(self) -> None:
        """Send the first shards, one per reader (the shard files must be written)."""
        if not self._begun:
            raise RuntimeError("ShardReader.begin() must send the readers their inputs before shards are read")
        if not self._started:
            self._started = True
            for _ in range(self.workers):
                self._submit_next()

    def take(self) -> BuiltShard:
        """The next shard in order (waits for it); then the next unsubmitted shard goes to the freed reader."""
        self.start()
        built = self._ahead.popleft().result()
        self._submit_next()
        return built

    def _submit_next(self) -> None:
        if self._submitted < self.num_shards:
            self._ahead.append(self._pool.submit(_build, self._submitted))
            self._submitted += 1

    def __exit__(self, exc_type, *exc) -> None:
        self._close(cancel=exc_type is not None)

    def _close(self, cancel: bool = True) -> None:
        if not self._begun:  # the readers wait for inputs in their initializer: None lets them go on and exit
            for _ in range(self.workers):
                self._queue.put(None)
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        self._queue.cancel_join_thread()  # inputs no process took (a pool that broke early) are dropped
        self._queue.close()


def reader_count(requested: int, num_shards: int) -> int:
    """Reader processes to start: ``requested``, or for 0 one per 4 CPUs (at most 4); never more than shards."""
    auto = min(MAX_AUTO_WORKERS, max(1, _cpus() // 4))
    return max(1, min(requested or auto, num_shards))


def _cpus() -> int:
    """CPUs the readers may use together: POLARS_MAX_THREADS when set, else the CPUs this process may run on."""
    limit = os.environ.get("POLARS_MAX_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        return int(limit)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _ReaderProcess(SpawnProcess):
    """A spawned process started with ``POLARS_MAX_THREADS=threads`` in its environment."""

    def __init__(self, threads: int, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._threads = threads

    def start(self) -> None:
        with _env("POLARS_MAX_THREADS", str(self._threads)):
            super().start()


class _ReaderContext(SpawnContext):
    """The spawn start method, with :class:`_ReaderProcess` as its processes."""

    def __init__(self, threads: int):
        super().__init__()
        self._threads = threads

    def Process(self, *args: Any, **kwargs: Any) -> _ReaderProcess:  # noqa: N802 (multiprocessing's name)
        return _ReaderProcess(self._threads, *args, **kwargs)


@contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    """``os.environ[key] = value`` inside the block, then the previous value (or none) again."""
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


_state: tuple[ShardFiles, SequenceBuilder] | None = None  # the reader process's inputs, once they came


def _start(parent: int, inputs: Queue, nice: int) -> None:
    global _state
    # Watch first: a job killed before the inputs came would leave this reader waiting for them below.
    exit_with_parent(parent, _remove_files)
    os.nice(nice)
    received = inputs.get()
    if received is not None:  # None: the job ended before it sent the inputs
        _state = ForkingPickler.loads(received)


def _remove_files() -> None:
    """An orphaned reader removes the killed job's shard files (the ShardFiles directory), if it has its inputs;
    else the next job on the host does (:func:`remove_stale`)."""
    if _state is not None and _state[0].path:
        shutil.rmtree(_state[0].path, ignore_errors=True)


def _timed(t0: float, wall0: float) -> tuple[float, float, float]:
    return wall0, time.time(), time.perf_counter() - t0


def _ready() -> None:
    """A first task that only makes the pool start a process (the initializer does the work)."""


def _build(shard: int) -> BuiltShard:
    if _state is None:
        raise RuntimeError("this reader process never received its inputs (ShardReader.begin() was not called)")
    shards, builder = _state
    t0, wall0 = time.perf_counter(), time.time()
    rows = shards.source.collect(shards.frame(shard))
    read = _timed(t0, wall0)
    t0, wall0 = time.perf_counter(), time.time()
    seqs = builder.build(rows)
    return BuiltShard(seqs, read, _timed(t0, wall0))
