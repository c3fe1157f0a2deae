"""Several reader processes: same results in shard order, a fair share of Polars threads each, errors and kills."""

from __future__ import annotations

import datetime as dt
import os
import pickle
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl
import pytest

from batch.errors import ConfigError, InputError
from batch.events import scan_events
from batch.reader import ShardFiles, ShardReader, _build, reader_count, remove_stale
from batch.run import run_job
from batch.sequences import SequenceBuilder

from conftest import RUN_DATE
from test_kill import start
from test_run import config, published

WINDOW = (RUN_DATE - dt.timedelta(days=28), RUN_DATE)


def reader(events: Path, checkpoint, schema, num_shards: int, workers: int,
           files: type[ShardFiles] = ShardFiles, nice: int = 0):
    """Scans now; entering starts the readers, then makes the shard files, sends the inputs and writes the files
    (in the job's order)."""
    return _reading(files(scan_events(str(events), schema, window=WINDOW), num_shards),
                    SequenceBuilder(checkpoint, schema), workers, nice)


@contextmanager
def _reading(files: ShardFiles, builder: SequenceBuilder, workers: int, nice: int) -> Iterator[ShardReader]:
    with ShardReader(workers, files.num_shards, nice) as r, files as shards:
        r.begin(shards, builder)
        shards.write()
        yield r


def test_read_workers_do_not_change_results(tmp_path, events_dir, tiny_checkpoint):
    runs = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        m = run_job(config(events_dir, tiny_checkpoint, out, "data.num_shards=5", f"data.read_workers={workers}"))
        runs[workers] = published(out)
        assert m["output"]["shards"] == 5
    assert runs[1].height > 0 and runs[1].equals(runs[3])  # same rows in the same order, same scores


def _user_ids(reading) -> list[list]:
    with reading as r:
        return [r.take().seqs.batch.user_ids.to_pylist() for _ in range(r.num_shards)]


def test_several_readers_hand_out_shards_in_shard_order(events_dir, checkpoint, schema):
    one, three = (_user_ids(reader(events_dir, checkpoint, schema, 5, w)) for w in (1, 3))
    assert one == three and sum(map(len, one)) > 0


def test_readers_run_below_the_jobs_priority(events_dir, checkpoint, schema):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with reader(events_dir, checkpoint, schema, 3, 2, nice=5) as r:
        assert sum(len(r.take().seqs.batch) for _ in range(r.num_shards)) > 0
        pids = list(r._pool._processes)
        deadline = time.monotonic() + 120  # a reader that built no shard may still be importing (slow CI hosts)
        while {os.getpriority(os.PRIO_PROCESS, p) for p in pids} != {min(19, base + 5)} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(pids) == 2 and {os.getpriority(os.PRIO_PROCESS, p) for p in pids} == {min(19, base + 5)}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the job's own priority is unchanged


def test_reader_nice_is_validated(tmp_path, events_dir, tiny_checkpoint):
    assert config(events_dir, tiny_checkpoint, tmp_path).data.reader_nice == 10
    for bad in (-1, 20):
        with pytest.raises(ConfigError, match=rf"data\.reader_nice={bad} is invalid: expected an integer in \[0, 19\]"):
            config(events_dir, tiny_checkpoint, tmp_path, f"data.reader_nice={bad}")


def test_read_workers_is_validated_and_clamped(tmp_path, events_dir, tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"data\.read_workers=-1 is invalid: expected an integer >= 1"):
        config(events_dir, tiny_checkpoint, tmp_path, "data.read_workers=-1")
    assert config(events_dir, tiny_checkpoint, tmp_path).data.read_workers == 0  # auto by default
    assert reader_count(8, 3) == 3 and reader_count(2, 100) == 2  # never more readers than shards
    assert 1 <= reader_count(0, 100) <= 4 and reader_count(0, 1) == 1


def _threads() -> tuple[int, int]:
    time.sleep(0.2)  # lets the other readers take the next calls
    return os.getpid(), pl.thread_pool_size()


@pytest.mark.parametrize("budget, workers, share", [(None, 2, None), ("6", 3, 2)])
def test_each_reader_gets_its_share_of_polars_threads(events_dir, checkpoint, schema, monkeypatch, budget,
                                                      workers, share):
    if budget:  # POLARS_MAX_THREADS set for the job is the readers' budget, split between them
        monkeypatch.setenv("POLARS_MAX_THREADS", budget)
    else:
        monkeypatch.delenv("POLARS_MAX_THREADS", raising=False)
        share = max(1, len(os.sched_getaffinity(0)) // workers)
    with reader(events_dir, checkpoint, schema, 4, workers) as r:
        assert (r.workers, r.threads) == (workers, share)
        seen = [r._pool.submit(_threads).result() for _ in range(2 * workers)]
        [r.take() for _ in range(4)]
    assert {threads for _, threads in seen} == {share} and os.environ.get("POLARS_MAX_THREADS") == budget


def _after_go(go: Path) -> Path:
    deadline = time.monotonic() + 30
    while not go.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("a reader unpickled its inputs before the test said go")
        time.sleep(0.05)
    return go


class _Gate:
    """Unpickles only once the file ``go`` exists."""

    def __init__(self, go: Path):
        self.go = go

    def __reduce__(self):
        return _after_go, (self.go,)


class WaitsForGo(SequenceBuilder):
    """A builder whose unpickling stops at a gate, before 1 MiB of ballast: far beyond a pipe's buffer, as a
    1M-item vocabulary is."""

    def __init__(self, *args, go: Path):
        super().__init__(*args)
        self.gate, self.ballast = _Gate(go), bytes(1 << 20)


def test_sending_the_inputs_does_not_wait_for_the_readers_to_take_them(tmp_path, events_dir, checkpoint, schema):
    """begin() returns before any reader has its inputs; sent with each process, they made the caller wait for
    each reader in turn to import the job's modules (10-13 s of every job's start on an H100 host)."""
    def waited(*_) -> None:
        raise TimeoutError("sending the inputs waited for a reader to unpickle them")

    go = tmp_path / "go"
    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(15)  # the readers give up after 30 s; a test that hangs until then tells less
    try:
        with ShardReader(2, 3) as r, ShardFiles(scan_events(str(events_dir), schema, window=WINDOW), 3) as shards:
            r.begin(shards, WaitsForGo(checkpoint, schema, go=go))
            shards.write()
            signal.alarm(0)
            go.touch()  # only now can a reader unpickle its inputs
            assert sum(len(r.take().seqs.batch) for _ in range(3)) > 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_inputs_that_cannot_be_pickled_fail_in_begin_not_in_the_readers(events_dir, checkpoint, schema):
    builder = SequenceBuilder(checkpoint, schema)
    builder.encode = lambda rows: rows  # a lambda does not pickle
    with ShardReader(2, 2) as r, ShardFiles(scan_events(str(events_dir), schema, window=WINDOW), 2) as shards:
        with pytest.raises((AttributeError, pickle.PicklingError), match="lambda"):
            r.begin(shards, builder)


def _imported(pid: int) -> bool:
    """Whether process ``pid`` has loaded torch (the readers import it through the job's modules)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_the_readers_import_while_the_caller_works_and_take_their_inputs_later(events_dir, checkpoint, schema):
    """Entering starts the processes and returns at once; they import while the caller goes on (the job loads its
    checkpoint), and take their inputs (which need the checkpoint) when they come."""
    t0 = time.monotonic()
    with ShardReader(2, 3) as r:
        pids = list(r._pool._processes)
        assert len(pids) == 2 and all(map(_alive, pids)) and not any(map(_imported, pids))  # still starting
        assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 120
        while not all(map(_imported, pids)) and time.monotonic() < deadline:  # the caller's checkpoint load
            time.sleep(0.1)
        assert all(map(_imported, pids)) and all(map(_alive, pids))  # up, waiting for their inputs
        with ShardFiles(scan_events(str(events_dir), schema, window=WINDOW), 3) as shards:
            r.begin(shards, SequenceBuilder(checkpoint, schema))
            shards.write()
            assert sum(len(r.take().seqs.batch) for _ in range(3)) > 0
        assert list(r._pool._processes) == pids  # the same processes read the shards


@contextmanager
def _within(seconds: int, what: str) -> Iterator[None]:
    """Fails the block (TimeoutError) if it runs longer than ``seconds``."""
    def late(*_) -> None:
        raise TimeoutError(what)

    previous = signal.signal(signal.SIGALRM, late)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_begin_sends_inputs_once_and_for_the_shards_the_readers_expect(events_dir, checkpoint, schema):
    builder = SequenceBuilder(checkpoint, schema)
    with ShardReader(1, 2) as r, ShardFiles(scan_events(str(events_dir), schema, window=WINDOW), 3) as three:
        with pytest.raises(ValueError, match="the shard files have 3 shards, the readers expect 2"):
            r.begin(three, builder)
        with ShardFiles(three.source, 2) as two:
            r.begin(two, builder)
            with pytest.raises(RuntimeError, match=r"begin\(\) was already called"):
                r.begin(two, builder)
            two.write()
            assert sum(len(r.take().seqs.batch) for _ in range(2)) > 0


def _leave(pids: list[int], error: bool) -> None:
    with ShardReader(2, 4) as r:
        pids += r._pool._processes
        if error:
            raise InputError("no usable rows")


@pytest.mark.parametrize("error", [False, True])
def test_leaving_the_readers_before_begin_stops_them_promptly(error):
    """A job that fails before its inputs exist (bad checkpoint, no usable rows) leaves the block with its readers
    still importing or waiting for inputs: they must stop, not keep the job waiting for inputs that never come."""
    pids: list[int] = []
    try:
        with _within(60, "leaving the readers without begin() hung"):
            if error:
                with pytest.raises(InputError, match="no usable rows"):
                    _leave(pids, error)
            else:
                _leave(pids, error)
        assert len(pids) == 2 and not any(map(_alive, pids))
    finally:  # a hung shutdown leaves no readers behind on the test machine
        for pid in filter(_alive, pids):
            os.kill(pid, signal.SIGKILL)


def test_reading_before_begin_is_an_error():
    with ShardReader(1, 2) as r:
        for read in (r.start, r.take):
            with pytest.raises(RuntimeError, match=r"begin\(\) must send the readers their inputs"):
                read()
        r._queue.put(None)  # a reader that got no inputs (what leaving the block sends) cannot build a shard
        with pytest.raises(RuntimeError, match="never received its inputs"):
            r._pool.submit(_build, 0).result()


class FailsOnShard2(ShardFiles):
    def frame(self, shard: int) -> pl.LazyFrame:
        if shard == 2:
            raise InputError("shard 2: cannot be read")
        return super().frame(shard)


def test_a_reader_error_surfaces_unchanged_in_shard_order(events_dir, checkpoint, schema):
    with pytest.raises(InputError, match=r"^shard 2: cannot be read$"):
        with reader(events_dir, checkpoint, schema, 6, 3, FailsOnShard2) as r:
            assert [len(r.take().seqs.batch) > 0 for _ in range(2)] == [True, True]  # shards before it are fine
            r.take()


def test_a_file_corrupted_after_the_scan_fails_the_same_with_several_readers(events_dir, checkpoint, schema):
    readers = [reader(events_dir, checkpoint, schema, 4, w) for w in (1, 3)]  # scanned while the files are good
    next(events_dir.rglob("*.parquet")).write_bytes(b"PAR1garbagegarbage")
    messages = []
    for r in readers:
        with pytest.raises(InputError, match=r"part-0\.parquet: cannot be read") as info, r:
            r.take()
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig, when", [(signal.SIGKILL, "reader process(es)"), (signal.SIGKILL, " done ("),
                                       (signal.SIGTERM, " done (")])
def test_killed_job_leaves_no_reader_processes(tmp_path, sig, when):
    """Killed while its readers still start, before they have their inputs (they see the job gone once up), or
    while they build shards; the shard files go with them (SIGKILL: the orphaned readers, which have their inputs,
    remove them; SIGTERM: the job unwinds). Killed before the readers had their inputs, a job may leave its shard
    directory: the next job on the host removes it."""
    from tests._sample_job import job_args, job_env, sample_checkpoint

    temp = tmp_path / "shards"
    proc = start(job_args(sample_checkpoint(tmp_path), f"output.path={tmp_path / 'recs'}", "data.num_shards=24",
                          "data.read_workers=3", f"data.temp_dir={temp}"), env=job_env(tmp_path / "logs"))
    log = []
    for line in iter(proc.stdout.readline, ""):
        log.append(line)
        if when in line:
            break
    readers = _children(proc.pid)  # 3 readers and multiprocessing's resource tracker
    proc.send_signal(sig)
    try:
        log.append(proc.communicate(timeout=60)[0])  # returns once every holder of the job's stdout is gone
        assert proc.returncode != 0 and len(readers) >= 3, "".join(log)[-3000:]
        deadline = time.monotonic() + 15
        while any(map(_alive, readers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in readers if _alive(p)], "".join(log)[-3000:]
        if when == "reader process(es)" and temp.is_dir():  # killed before the readers had their inputs: a
            remove_stale(str(temp))  # shard directory left is the next job's to remove
        assert (temp.is_dir() or when == "reader process(es)") and not list(temp.glob("*")), "".join(log)[-3000:]
    finally:  # a failed check leaves no orphans behind on the test machine
        for pid in filter(_alive, readers):
            os.kill(pid, signal.SIGKILL)
    assert not list((tmp_path / "recs").rglob("*.parquet"))  # nothing published


def _spawned(pid: int) -> list[int]:
    """Processes that ``pid`` spawned with multiprocessing (not its resource tracker)."""
    return [p for p in _children(pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_the_job_starts_its_readers_before_it_loads_the_checkpoint(tmp_path, events_dir, tiny_checkpoint,
                                                                    monkeypatch):
    """Their imports overlap the load; a checkpoint that fails to load stops them (they never got inputs)."""
    import batch.run

    readers = []

    def unreadable(cfg):
        readers.extend(_spawned(os.getpid()))
        raise InputError("model.checkpoint: cannot be read")

    monkeypatch.setattr(batch.run, "open_checkpoint", unreadable)
    try:
        with _within(60, "a job that failed before its readers had inputs hung"), \
                pytest.raises(InputError, match="cannot be read"):
            run_job(config(events_dir, tiny_checkpoint, tmp_path / "out", "data.num_shards=4",
                           "data.read_workers=2"))
        assert len(readers) == 2 and not any(map(_alive, readers))
    finally:
        for pid in filter(_alive, readers):
            os.kill(pid, signal.SIGKILL)


# Starts the readers and waits, never sending their inputs: a job killed while it loads its checkpoint.
BEFORE_BEGIN = """
import time
from batch.reader import ShardReader
with ShardReader(2, 4) as r:
    print(*r._pool._processes, flush=True)
    time.sleep(300)
"""


@pytest.mark.parametrize("imported", [False, True])
def test_a_job_killed_before_it_sent_the_inputs_leaves_no_reader_processes(imported):
    """Killed while its readers import, or once they wait for their inputs (they watch for the job first)."""
    proc = start([sys.executable, "-c", BEFORE_BEGIN])
    readers = [int(pid) for pid in proc.stdout.readline().split()]
    try:
        deadline = time.monotonic() + 120
        while imported and not all(map(_imported, readers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(readers) == 2 and all(map(_imported if imported else _alive, readers))
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(map(_alive, readers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, readers))
    finally:
        proc.kill()
        for pid in filter(_alive, readers):
            os.kill(pid, signal.SIGKILL)
