"""EnginePool: engines in child processes behind the Engine interface (vLLM's pool), tested with torch engines on CPU.

The factories are module-level so that the spawned children can unpickle them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import pyarrow as pa
import pytest

from batch.config import Device, DType, TorchEngineConfig
from batch.engines.base import TopK, UserBatch
from batch.engines.pool import EngineFailed, EnginePool, plan_chunks
from batch.engines.torch_engine import TorchEngine
from batch.errors import ConfigError
from batch.model import load_checkpoint

from conftest import REPO


def torch_engine(path: str, instance: int) -> TorchEngine:
    return TorchEngine(TorchEngineConfig(device=Device.cpu, dtype=DType.float32, batch_tokens=512),
                       load_checkpoint(path))


class Faulty:
    """Answers each user's first token as its items; fails as told by the users' first tokens: 1 raises
    ValueError, 2 raises an unpicklable error, 3 exits, 4 answers and exits right after."""

    def score(self, batch: UserBatch, top_k: int, exclude_seen: bool) -> TopK:
        first = batch.tokens[batch.offsets[:-1]]
        if 1 in first:
            raise ValueError("bad batch")
        if 2 in first:
            raise Unpicklable(lambda: None)
        if 3 in first:
            os._exit(3)
        if 4 in first:
            threading.Timer(0.2, os._exit, args=(4,)).start()
        return TopK(np.repeat(first[:, None], top_k, axis=1), np.zeros((len(batch), top_k), dtype=np.float32))

    def close(self) -> None:
        pass


class Unpicklable(Exception):
    pass


def faulty_engine(instance: int) -> Faulty:
    return Faulty()


def failing_start(instance: int) -> Faulty:
    if instance == 1:
        raise ConfigError("engine.x=1 is invalid: expected 0")
    return Faulty()


def flaky_start(marks: str, fail_times: int, instance: int, error: type[Exception] = RuntimeError) -> Faulty:
    """Instance 1 fails to start its first ``fail_times`` times (each try leaves a file in ``marks``)."""
    if instance == 1:
        tries = len(os.listdir(marks))
        open(os.path.join(marks, f"try-{tries}"), "w").close()
        if tries < fail_times:
            raise error(f"CUDA out of memory (try {tries})")
    return Faulty()


def batch_of(lengths: list[int], first_tokens: list[int] | None = None, seed: int = 0) -> UserBatch:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(10, 500, size=int(offsets[-1])).astype(np.int64)
    if first_tokens is not None:
        tokens[offsets[:-1]] = first_tokens
    return UserBatch(pa.array(np.arange(len(lengths))), tokens, offsets)


def test_chunk_plan_covers_all_users_in_order_growing_then_shrinking():
    lengths = np.random.default_rng(1).integers(1, 200, size=5000)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n, unit = 4, 20_000
    plan = plan_chunks(offsets, n, unit)
    assert plan[0][0] == 0 and plan[-1][1] == len(lengths)
    assert all(a < b == c for (a, b), (c, _) in zip(plan, plan[1:]))  # contiguous, none empty
    tokens = np.array([offsets[b] - offsets[a] for a, b in plan])
    assert (np.diff(tokens[:n]) > 0).all()  # the first chunks grow: staggered starts
    assert abs(tokens[0] - unit / n) <= lengths.max() and abs(tokens[n - 1] - unit) <= lengths.max()
    assert tokens.max() <= unit + lengths.max()
    assert (tokens[-2 * n:-1] <= unit / 4 + lengths.max()).all()  # the tail is quarter chunks
    assert len(plan) > len(lengths) * lengths.mean() / unit  # and there are more of them than whole units


def test_chunk_plan_of_small_batches_spreads_users_over_the_instances():
    assert plan_chunks(np.array([0]), 3, 100) == []
    assert plan_chunks(np.array([0, 5, 10]), 2, 1 << 18) == [(0, 1), (1, 2)]
    plan = plan_chunks(np.arange(0, 101, 5), 4, 1 << 18)  # 20 users of 5 tokens: unit = 25 tokens
    assert plan[0] == (0, 2) and plan[-1][1] == 20 and len(plan) >= 4
    assert plan_chunks(np.array([0, 0, 0]), 2, 100) == [(0, 1), (1, 2)]  # no tokens: one user per chunk


def test_pool_gives_the_single_engines_results(tiny_checkpoint):
    path = str(tiny_checkpoint)
    ckpt = load_checkpoint(path)
    lay, n = ckpt.layout, ckpt.config.num_items
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, ckpt.config.max_seq_len + 1, size=57).tolist()
    batch = batch_of(lengths)
    batch.tokens[:] = lay.item_offset + rng.integers(0, n, size=len(batch.tokens))
    expected = torch_engine(path, 0).score(batch, 7, True)
    for in_flight in (1, 2):
        pool = EnginePool(partial(torch_engine, path), 3, "torch", chunk_tokens=150,  # ~9 chunks per instance
                          in_flight=in_flight)
        try:
            for users in (batch, batch.select(slice(0, 2)), batch.select(slice(0, 0))):
                got = pool.score(users, 7, True)
                np.testing.assert_array_equal(got.items, expected.items[: len(users)])
                # A slice is a different GEMM shape on the CPU: scores may differ in the last bit, the order may not.
                np.testing.assert_allclose(got.scores, expected.scores[: len(users)], rtol=1e-6, atol=1e-6)
        finally:
            pool.close()


@pytest.mark.parametrize("in_flight", [1, 2])
def test_errors_come_back_from_the_instance_that_raised_them(in_flight):
    pool = EnginePool(faulty_engine, 2, "faulty", in_flight=in_flight)
    try:
        ok = pool.score(batch_of([5, 5, 5, 5], [7, 7, 8, 8]), 2, True)
        assert ok.items[:, 0].tolist() == [7, 7, 8, 8]  # each user its own answer, in order, across chunks
        with pytest.raises(ValueError, match="bad batch"):
            pool.score(batch_of([5, 5, 5, 5], [7, 7, 1, 1]), 2, True)
        with pytest.raises(RuntimeError, match="Unpicklable"):  # sent back as text, the instance serves on
            pool.score(batch_of([5, 5], [2, 9]), 2, True)
        assert pool.score(batch_of([5, 5], [9, 9]), 2, True).items[:, 0].tolist() == [9, 9]  # still serving
        with pytest.raises(EngineFailed, match="exited with code 3|closed its pipe"):
            pool.score(batch_of([5, 5], [9, 3]), 2, True)
        with pytest.raises(EngineFailed, match="instance 1"):  # one instance is gone: the pool scores no more
            pool.score(batch_of([5, 5], [9, 9]), 2, True)
    finally:
        pool.close()
    assert pool.instances == 0


def test_an_instance_with_two_chunks_in_flight_answers_both_or_fails_without_hanging():
    pool = EnginePool(faulty_engine, 1, "faulty", chunk_tokens=5, in_flight=2)  # one user per chunk
    try:
        assert pool.score(batch_of([5] * 5, [7, 8, 9, 10, 11]), 2, True).items[:, 0].tolist() == [7, 8, 9, 10, 11]
        with pytest.raises(ValueError, match="bad batch"):  # the chunk behind it is answered, then the error raised
            pool.score(batch_of([5, 5, 5, 5], [7, 1, 8, 8]), 2, True)
        assert pool.score(batch_of([5, 5], [9, 9]), 2, True).items[:, 0].tolist() == [9, 9]  # still serving
        with pytest.raises(EngineFailed, match="instance 0"):  # it dies with a chunk queued behind
            pool.score(batch_of([5, 5, 5], [9, 3, 9]), 2, True)
    finally:
        pool.close()


def test_an_instance_that_died_between_batches_stops_the_pool():
    pool = EnginePool(faulty_engine, 1, "faulty")
    try:
        assert pool.score(batch_of([5], [4]), 2, True).items[0, 0] == 4  # answers, then exits
        time.sleep(1.0)
        with pytest.raises(EngineFailed, match="instance 0"):
            pool.score(batch_of([5], [9]), 2, True)
    finally:
        pool.close()


def test_a_failed_start_raises_the_error_and_stops_every_instance():
    with pytest.raises(ConfigError, match="engine.x=1"):
        EnginePool(failing_start, 3, "faulty")
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if p.name.startswith("faulty-")]


def test_a_start_that_failed_beside_the_others_is_retried_alone(tmp_path):
    pool = EnginePool(partial(flaky_start, str(tmp_path), 1), 3, "faulty")
    try:
        assert len(os.listdir(tmp_path)) == 2  # failed once, started alone
        top = pool.score(batch_of([5] * 6, [7] * 6), 2, True)
        assert (top.items == 7).all()
    finally:
        pool.close()


def test_a_start_that_fails_alone_too_is_final_and_a_config_error_is_not_retried(tmp_path):
    with pytest.raises(RuntimeError, match=r"CUDA out of memory \(try 1\)"):
        EnginePool(partial(flaky_start, str(tmp_path), 2), 3, "faulty")
    assert len(os.listdir(tmp_path)) == 2
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if p.name.startswith("faulty-")]
    once = tmp_path / "config"
    once.mkdir()
    with pytest.raises(ConfigError, match=r"\(try 0\)"):
        EnginePool(partial(flaky_start, str(once), 2, error=ConfigError), 3, "faulty")
    assert len(os.listdir(once)) == 1


POOL_THEN_WAIT = """
import sys, time
from batch.engines.pool import EnginePool
sys.path.insert(0, sys.argv[1])
from test_pool import faulty_engine
pool = EnginePool(faulty_engine, 2, "faulty")
print(" ".join(str(p.pid) for p in pool._procs), flush=True)
time.sleep(600)
"""


def test_instances_exit_when_the_job_is_killed():
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen([sys.executable, "-c", POOL_THEN_WAIT, str(REPO / "tests")], stdout=subprocess.PIPE,
                           text=True, env=env, cwd=REPO)
    try:
        pids = [int(p) for p in job.stdout.readline().split()]
        assert len(pids) == 2
        job.send_signal(signal.SIGKILL)
        job.wait(10)
        deadline = time.monotonic() + 15
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in pids if _alive(p)]
        assert not alive, f"engine processes {alive} outlived the killed job"
    finally:
        job.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
