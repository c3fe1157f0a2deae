"""Several engines of one kind, each in its own process, sharing the batches: an engine pool.

vLLM spends about 1 ms of host time per request in ``LLM.generate`` while its GPU work per user is a fifth of
that (bench/RESULTS.md, issue 6), so one vLLM engine leaves the GPU idle most of the time. A pool runs
``instances`` engines side by side, on one GPU, each in a spawned process with its own Python interpreter. A batch
is cut into contiguous chunks of about ``chunk_tokens`` tokens (a multiple of ``instances`` of them), and an
instance that finishes a chunk takes the next one: the instances drift apart, so one's host work (adding requests,
reading results) overlaps the others' GPU work. Batches queue (``submit``): an instance that finishes the last
chunk of one batch takes the first of the next, so the instances do not wait for each other at the end of a shard.
Results come back in user order; each user is scored by exactly one engine, so the output is the same for any
number of instances or chunks.

The pool knows nothing of vLLM: ``factory(instance)`` builds the engine inside the child process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from batch.engines.base import Engine, TopK, UserBatch
from batch.errors import ConfigError
from batch.orphans import exit_with_parent

log = logging.getLogger("batch.engines.pool")

EngineFactory = Callable[[int], Engine]  # picklable (a module-level function or a functools.partial of one)
CLOSE_TIMEOUT_S = 120.0  # an engine that has not shut down by then is killed


class EngineFailed(RuntimeError):
    """An engine process died (or closed its pipe): the pool cannot score any more."""


@dataclass
class _Job:
    """One submitted batch: its future and its chunks' results, in user order."""

    future: Future[TopK]
    parts: list[TopK | None]
    left: int


@dataclass
class _Chunk:
    job: _Job
    index: int
    message: tuple[UserBatch, int, bool]  # what an instance's score() gets


class EnginePool:
    """``instances`` engines in child processes behind the :class:`Engine` interface.

    A dispatcher thread sends the chunks of every submitted batch, oldest batch first, to whichever instance is
    free, so the instances start on the next shard while the last chunks of this one finish.
    """

    def __init__(self, factory: EngineFactory, instances: int, name: str = "engine", chunk_tokens: int = 1 << 18):
        if instances < 1 or chunk_tokens < 1:
            raise ValueError(f"an engine pool needs instances >= 1 and chunk_tokens >= 1, got {instances}, "
                             f"{chunk_tokens}")
        self.name = name
        self.chunk_tokens = chunk_tokens
        self._broken: str | None = None  # set when an instance died: the pool cannot score any more
        self._stopping = False
        self._todo: deque[_Chunk] = deque()  # chunks not sent yet, oldest batch first
        self._lock = threading.Lock()
        self._dispatcher: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()  # a byte here wakes the dispatcher up (a new batch, or close)
        os.set_blocking(self._wake_w, False)
        ctx = mp.get_context("spawn")  # a fork would copy the job's threads (Polars, CUDA) into the child
        self._procs: list[mp.process.BaseProcess] = []
        self._conns: list[Connection] = []
        try:
            for i in range(instances):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(factory, i, child_end, os.getpid()), name=f"{name}-{i}")
                proc.start()
                child_end.close()
                self._procs.append(proc)
                self._conns.append(parent_end)
            t0 = time.perf_counter()
            for i in range(instances):
                self._receive(i)  # "ready", or the error that stopped the engine from starting
            log.info("%s pool: %d instances ready in %.1fs", name, instances, time.perf_counter() - t0)
        except BaseException:
            self.close()
            raise
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"{name}-pool", daemon=True)
        self._dispatcher.start()

    @property
    def instances(self) -> int:
        return len(self._procs)

    def score(self, batch: UserBatch, top_k: int, exclude_seen: bool) -> TopK:
        """Top-K of every user (see Engine.score): chunks of users go to whichever instance is free."""
        return self.submit(batch, top_k, exclude_seen).result()

    def submit(self, batch: UserBatch, top_k: int, exclude_seen: bool) -> Future[TopK]:
        """Queue ``batch`` behind the batches submitted before it (see Engine.submit)."""
        if self._stopping:
            raise RuntimeError(f"{self.name} pool is closed")
        future: Future[TopK] = Future()
        n = self.instances
        count = n * max(1, -(-int(batch.offsets[-1]) // (self.chunk_tokens * n)))
        parts = [(a, b) for a, b in split_by_tokens(batch.offsets, count) if b > a]
        if not parts:
            future.set_result(TopK(np.full((0, top_k), -1, dtype=np.int64),
                                   np.full((0, top_k), -np.inf, dtype=np.float32)))
            return future
        job = _Job(future, [None] * len(parts), len(parts))
        with self._lock:
            if self._broken or self._stopping:
                future.set_exception(EngineFailed(self._broken or f"{self.name} pool was closed"))
                return future
            self._todo.extend(_Chunk(job, c, (batch.select(slice(a, b)), top_k, exclude_seen))
                              for c, (a, b) in enumerate(parts))
        self._wake()
        return future

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def _dispatch(self) -> None:
        """The dispatcher thread: feed free instances, collect answers, settle futures, until closed."""
        running: dict[int, _Chunk] = {}  # instance -> the chunk it is scoring
        try:
            while True:
                with self._lock:
                    if self._stopping or self._broken:
                        self._fail_queued(EngineFailed(self._broken or f"{self.name} pool was closed"))
                    if self._stopping and not running:
                        return
                    sends = []
                    for i in range(self.instances):
                        while i not in running and self._todo:
                            chunk = self._todo.popleft()
                            if not chunk.job.future.done():  # else an earlier chunk of its batch failed
                                running[i] = chunk
                                sends.append(i)
                for i in sends:
                    try:
                        self._conns[i].send(running[i].message)
                    except OSError:  # the instance died since its last answer
                        self._fail(running.pop(i), EngineFailed(
                            f"{self.name} instance {i} (pid {self._procs[i].pid}) is gone; its log is above"))
                ready = set(wait([self._wake_r, *(self._conns[i] for i in running),
                                  *(self._procs[i].sentinel for i in running)]))
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                for i in [i for i in running if self._conns[i] in ready or self._procs[i].sentinel in ready]:
                    chunk = running.pop(i)
                    try:
                        self._done(chunk, self._receive(i))
                    except Exception as e:  # noqa: BLE001 (the batch's error; EngineFailed stops the pool)
                        self._fail(chunk, e)
        except BaseException as e:  # a bug here must not leave the job waiting forever
            log.exception("%s pool: dispatcher failed", self.name)
            with self._lock:
                self._broken = self._broken or f"{self.name} pool dispatcher failed: {e!r}"
                self._fail_queued(EngineFailed(self._broken))
            for chunk in running.values():
                self._fail(chunk, EngineFailed(self._broken))

    def _done(self, chunk: _Chunk, top: TopK) -> None:
        job = chunk.job
        job.parts[chunk.index] = top
        job.left -= 1
        if job.left == 0 and not job.future.done():
            job.future.set_result(TopK(np.concatenate([p.items for p in job.parts]),
                                       np.concatenate([p.scores for p in job.parts])))

    def _fail(self, chunk: _Chunk, error: Exception) -> None:
        """``chunk``'s batch fails with ``error`` (its other chunks are dropped); EngineFailed breaks the pool."""
        if isinstance(error, EngineFailed):
            with self._lock:
                self._broken = self._broken or str(error)
                self._fail_queued(error)
        if not chunk.job.future.done():
            chunk.job.future.set_exception(error)

    def _fail_queued(self, error: Exception) -> None:
        """Fail every batch with chunks not sent yet (hold the lock)."""
        for chunk in self._todo:
            if not chunk.job.future.done():
                chunk.job.future.set_exception(error)
        self._todo.clear()

    def _receive(self, i: int) -> Any:
        """Instance i's answer; its error re-raised here; EngineFailed if it died without answering."""
        conn, proc = self._conns[i], self._procs[i]
        while not conn.poll(1.0):
            if not proc.is_alive() and not conn.poll():
                raise EngineFailed(f"{self.name} instance {i} (pid {proc.pid}) exited with code {proc.exitcode} "
                                   "without an answer; its log is above")
        try:
            status, value = conn.recv()
        except EOFError:
            proc.join(5.0)
            raise EngineFailed(f"{self.name} instance {i} (pid {proc.pid}) closed its pipe (exit code "
                               f"{proc.exitcode}); its log is above") from None
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Fail what is still queued, let the instances finish what they are scoring, and shut every engine
        down; kill what has not exited after CLOSE_TIMEOUT_S."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._dispatcher is not None:
            self._dispatcher.join(CLOSE_TIMEOUT_S)
            if self._dispatcher.is_alive():  # an instance hangs on its chunk
                log.warning("%s: instances still scoring after %.0fs; killing them", self.name, CLOSE_TIMEOUT_S)
                for proc in self._procs:
                    proc.kill()
                self._dispatcher.join()
            self._dispatcher = None
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("%s: %s did not exit in %.0fs; killing it", self.name, proc.name, CLOSE_TIMEOUT_S)
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:  # closed by an earlier close()
                pass


def split_by_tokens(offsets: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive user ranges covering all users, with about the same number of tokens each."""
    offsets = np.asarray(offsets)
    num_users, total = len(offsets) - 1, int(offsets[-1])
    targets = np.arange(1, parts) * total / parts
    cuts = np.searchsorted(offsets, targets, side="left").clip(0, num_users)
    bounds = [0, *np.maximum.accumulate(cuts).tolist(), num_users]
    return list(zip(bounds[:-1], bounds[1:]))


def _serve(factory: EngineFactory, instance: int, conn: Connection, parent: int) -> None:
    """The child: build the engine, answer ``(batch, top_k, exclude_seen)`` messages until None or the pipe closes."""
    exit_with_parent(parent)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [instance {instance}] %(name)s: "
                                                   "%(message)s")
    try:
        engine = factory(instance)
    except BaseException as e:  # noqa: BLE001 (everything goes back to the job)
        conn.send(("error", _portable(e, instance)))
        return
    try:
        conn.send(("ok", None))
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return
            if message is None:
                return
            try:
                conn.send(("ok", engine.score(*message)))
            except Exception as e:  # noqa: BLE001
                conn.send(("error", _portable(e, instance)))
    finally:
        engine.close()


def _portable(error: BaseException, instance: int) -> BaseException:
    """The error itself when it survives pickling as itself (ConfigError, ValueError, ...), else a RuntimeError
    carrying its traceback."""
    if isinstance(error, (ConfigError, ValueError, TypeError, RuntimeError)) and type(error).__module__ in (
            "builtins", ConfigError.__module__):
        return error
    text = "".join(traceback.format_exception(error)).rstrip()
    return RuntimeError(f"instance {instance} failed:\n{text}")
