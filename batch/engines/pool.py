"""Several engines of one kind, each in its own process, sharing the batches: an engine pool.

vLLM spends about 1 ms of host time per request in ``LLM.generate`` while its GPU work per user is a fifth of
that (bench/RESULTS.md, issue 6), so one vLLM engine leaves the GPU idle most of the time. A pool runs
``instances`` engines side by side, on one GPU, each in a spawned process with its own Python interpreter. A batch
is cut into contiguous chunks of users (:func:`plan_chunks`), and an instance that finishes a chunk takes the next
one, so one's host work (adding requests, reading results) overlaps the others' GPU work. The first chunks grow
and the last ones shrink: instances that start a batch together would otherwise do their host work at the same
time and leave the GPU idle, and at its end wait for the slowest one. With ``in_flight=2`` an instance's next
chunk is sent while it scores the current one (a thread in the instance takes it off the pipe), so it does not wait
for the pool to read its answer and send more. Results come back in user order; each user is scored by exactly one
engine, so the output is the same for any number of instances, chunks or chunks in flight.

Instances start side by side. One that fails to start (not with a ConfigError) is started again alone once the
others are ready: starting together they race for device memory at their start-up peaks and for free ports (on
one H100 host, three 12-engine starts in a row failed so). A second failure is final.

The pool knows nothing of vLLM: ``factory(instance)`` builds the engine inside the child process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
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


class EnginePool:
    """``instances`` engines in child processes behind the :class:`Engine` interface."""

    def __init__(self, factory: EngineFactory, instances: int, name: str = "engine", chunk_tokens: int = 1 << 18,
                 in_flight: int = 1):
        if instances < 1 or chunk_tokens < 1 or in_flight < 1:
            raise ValueError(f"an engine pool needs instances, chunk_tokens and in_flight >= 1, got {instances}, "
                             f"{chunk_tokens}, {in_flight}")
        self.name = name
        self.chunk_tokens = chunk_tokens
        self.in_flight = in_flight  # chunks sent to an instance before its first answer: the next one waits there
        self._factory = factory
        self._broken: str | None = None  # set when an instance died: the pool cannot score any more
        self._procs: list[mp.process.BaseProcess] = []
        self._conns: list[Connection] = []
        try:
            for i in range(instances):
                self._spawn(i)
            t0 = time.perf_counter()
            failed = []
            for i in range(instances):
                try:
                    self._receive(i)  # "ready", or the error that stopped the engine from starting
                except ConfigError:
                    raise  # the settings are wrong: every instance would fail alike
                except Exception as e:  # noqa: BLE001
                    failed.append(i)
                    log.warning("%s instance %d failed to start beside the others; it starts again alone once "
                                "they are ready: %s", name, i, str(e).strip().splitlines()[-1])
            # Instances starting side by side race for what only one may hold at a time: the device memory of
            # vLLM's start-up peaks (profiling, warm-up) and the free ports that torch.distributed listens on.
            # Started again with the others ready and settled, a failure is the instance's own, and final.
            for i in failed:
                self._procs[i].join(CLOSE_TIMEOUT_S)
                self._conns[i].close()
                self._spawn(i)
                self._receive(i)
            log.info("%s pool: %d instances ready in %.1fs", name, instances, time.perf_counter() - t0)
        except BaseException:
            self.close()
            raise

    def _spawn(self, i: int) -> None:
        """Start instance i's process (a fork would copy the job's threads, Polars and CUDA, into the child)."""
        ctx = mp.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(self._factory, i, child_end, os.getpid()), name=f"{self.name}-{i}")
        proc.start()
        child_end.close()
        if i < len(self._procs):
            self._procs[i], self._conns[i] = proc, parent_end
        else:
            self._procs.append(proc)
            self._conns.append(parent_end)

    @property
    def instances(self) -> int:
        return len(self._procs)

    def score(self, batch: UserBatch, top_k: int, exclude_seen: bool) -> TopK:
        """Top-K of every user (see Engine.score): chunks of users go to whichever instance is free."""
        if self._broken:
            raise EngineFailed(self._broken)
        n = self.instances
        todo = deque(enumerate(plan_chunks(batch.offsets, n, self.chunk_tokens)))
        results: dict[int, TopK] = {}
        errors: list[Exception] = []
        running: dict[int, deque[int]] = {i: deque() for i in range(n)}  # instance -> chunks sent, oldest first

        def feed(i: int) -> None:
            if todo and not errors:
                c, (start, stop) = todo.popleft()
                try:
                    self._conns[i].send((batch.select(slice(start, stop)), top_k, exclude_seen))
                except OSError:  # the instance died since its last answer
                    self._broken = f"{self.name} instance {i} (pid {self._procs[i].pid}) is gone; its log is above"
                    errors.append(EngineFailed(self._broken))
                    return
                running[i].append(c)

        for _ in range(self.in_flight):
            for i in range(n):
                feed(i)
        while any(running.values()):  # every sent chunk is answered (or its instance is gone) before we return
            busy = [i for i in running if running[i]]
            ready = set(wait([self._conns[i] for i in busy] + [self._procs[i].sentinel for i in busy]))
            for i in [i for i in busy if self._conns[i] in ready or self._procs[i].sentinel in ready]:
                c = running[i].popleft()  # an instance answers its chunks in the order it got them
                try:
                    results[c] = self._receive(i)
                except EngineFailed as e:
                    self._broken = str(e)
                    errors.append(e)
                    running[i].clear()  # its other chunks will never be answered
                except Exception as e:  # noqa: BLE001 (an error of the batch: the instance serves on)
                    errors.append(e)
                if self._broken is None:
                    feed(i)
        if errors:
            raise errors[0]
        parts = [results[c] for c in sorted(results)]
        if not parts:
            return TopK(np.full((0, top_k), -1, dtype=np.int64), np.full((0, top_k), -np.inf, dtype=np.float32))
        return TopK(np.concatenate([p.items for p in parts]), np.concatenate([p.scores for p in parts]))

    def _receive(self, i: int) -> Any:
        """Instance i's answer; its error re-raised here; EngineFailed if it died without answering."""
        conn, proc = self._conns[i], self._procs[i]
        while not conn.poll(1.0):
            if not proc.is_alive() and not conn.poll():
                raise EngineFailed(f"{self.name} instance {i} (pid {proc.pid}) exited with code {proc.exitcode} "
                                   "without an answer; its log is above")
        try:
            status, value = conn.recv()
        except (EOFError, ConnectionResetError):  # reset: it died with a chunk of ours unread in its pipe
            proc.join(5.0)
            raise EngineFailed(f"{self.name} instance {i} (pid {proc.pid}) closed its pipe (exit code "
                               f"{proc.exitcode}); its log is above") from None
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Ask every instance to shut its engine down; kill what has not exited after CLOSE_TIMEOUT_S."""
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


def plan_chunks(offsets: np.ndarray, instances: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Consecutive, non-empty user ranges covering all users, in the order the instances take them.

    With ``unit`` = ``chunk_tokens``, or a 1/instances share of a smaller batch: the first ``instances`` chunks
    hold 1/n, 2/n, ... n/n of a unit, so instances that get them at the same moment start their GPU work one after
    another instead of all at once; each later chunk is a 1/(2 instances) share of the tokens left, between a
    quarter unit and a unit, so the instances finish the batch within about a quarter unit of each other. A chunk
    holds at least one user. The plan depends only on the lengths, so every run cuts a batch alike.
    """
    offsets = np.asarray(offsets)
    num_users, total = len(offsets) - 1, int(offsets[-1])
    unit = min(float(chunk_tokens), total / instances)
    chunks: list[tuple[int, int]] = []
    start = 0
    while start < num_users:
        if len(chunks) < instances:
            size = unit * (len(chunks) + 1) / instances
        else:
            size = min(unit, max(unit / 4, (total - int(offsets[start])) / (2 * instances)))
        stop = int(np.searchsorted(offsets, offsets[start] + size, side="left"))
        stop = min(max(stop, start + 1), num_users)
        chunks.append((start, stop))
        start = stop
    return chunks


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
        # A thread takes the messages off the pipe as they come, so that the pool may send the next chunk while this
        # one is scored without waiting for this process to read it.
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=_read_messages, args=(conn, inbox), name="pool-inbox", daemon=True).start()
        while (message := inbox.get()) is not None:
            try:
                conn.send(("ok", engine.score(*message)))
            except Exception as e:  # noqa: BLE001
                conn.send(("error", _portable(e, instance)))
    finally:
        engine.close()


def _read_messages(conn: Connection, inbox: "queue.SimpleQueue[Any]") -> None:
    """The child's inbox thread: every message off the pipe, then None at its end (None sent, or the pipe closed)."""
    try:
        while (message := conn.recv()) is not None:
            inbox.put(message)
    except (EOFError, OSError):
        pass
    inbox.put(None)


def _portable(error: BaseException, instance: int) -> BaseException:
    """The error itself when it survives pickling as itself (ConfigError, ValueError, ...), else a RuntimeError
    carrying its traceback."""
    if isinstance(error, (ConfigError, ValueError, TypeError, RuntimeError)) and type(error).__module__ in (
            "builtins", ConfigError.__module__):
        return error
    text = "".join(traceback.format_exception(error)).rstrip()
    return RuntimeError(f"instance {instance} failed:\n{text}")
