"""Shard files: one pass over the input writes each shard's rows; the sequences are those of filtering the input."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from batch.errors import ConfigError
from batch.events import EventSource, normalize
from batch.reader import TEMP_PREFIX, ShardFiles
from batch.run import run_job
from batch.sequences import SequenceBuilder, in_window, shard_of

from conftest import RUN_DATE, make_events
from test_run import assert_same_recs, config, published

WINDOW = (RUN_DATE - dt.timedelta(days=2), RUN_DATE)  # the log's first day falls outside


def dirty_events(user_type: pl.DataType) -> pl.DataFrame:
    """make_events with dirty rows: a null user, negative durations, one user whose rows are all dirty."""
    df = make_events(num_users=40)
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()) % 97 == 5).then(None).otherwise(pl.col("user_id")).alias("user_id"),
        pl.when((pl.int_range(pl.len()) % 13 == 0) | (pl.col("user_id") == 7)).then(-1.0)
        .otherwise(pl.col("watch_duration")).alias("watch_duration"))
    return df.with_columns(pl.col("user_id").cast(user_type))


def source_of(df: pl.DataFrame, schema) -> EventSource:
    return EventSource([], 0, normalize(df.lazy(), schema, WINDOW), WINDOW)


def same(a, b) -> bool:
    return (a.batch.user_ids.equals(b.batch.user_ids) and np.array_equal(a.batch.tokens, b.batch.tokens)
            and np.array_equal(a.batch.offsets, b.batch.offsets)
            and [getattr(a, f.name) for f in dataclasses.fields(a)][1:]
            == [getattr(b, f.name) for f in dataclasses.fields(b)][1:])


def filtered_shard(frame: pl.LazyFrame, shard: int, num_shards: int) -> pl.LazyFrame:
    """The reference: a shard's rows by filtering the whole input (what every shard did before ShardFiles)."""
    return frame.filter(shard_of("user_id", frame.collect_schema()["user_id"], num_shards) == shard, in_window())


@pytest.mark.parametrize("user_type", [pl.Int64, pl.String])
@pytest.mark.parametrize("num_shards", [1, 3, 64])  # 64 shards for 40 users: some are empty
def test_shard_files_give_the_sequences_of_filtering_the_input(tmp_path, checkpoint, schema, user_type,
                                                               num_shards):
    source = source_of(dirty_events(user_type), schema)
    builder = SequenceBuilder(checkpoint, schema, 24)  # cuts the longer histories
    with ShardFiles(source, num_shards, str(tmp_path)) as shards:
        shards.write()
        users = 0
        for shard in range(num_shards):
            got = builder.build(source.collect(shards.frame(shard)))
            want = builder.build(filtered_shard(source.frame, shard, num_shards).collect())
            assert same(got, want), shard
            users += got.users_in
    assert users == dirty_events(user_type).filter(pl.col("timestamp") >= pl.datetime(*WINDOW[0].timetuple()[:3])) \
        .get_column("user_id").drop_nulls().n_unique()
    assert not list(tmp_path.iterdir())  # removed on exit


def test_shard_files_are_removed_on_error(tmp_path, checkpoint, schema):
    source = source_of(dirty_events(pl.Int64), schema)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardFiles(source, 4, str(tmp_path)) as shards:
            shards.write()
            assert len(list(Path(shards.path).glob("shard-*.arrow"))) == 4
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())


def test_directories_of_dead_jobs_are_removed(tmp_path, checkpoint, schema):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    left = [tmp_path / f"{TEMP_PREFIX}{host}-{dead}-abc", tmp_path / f"{TEMP_PREFIX}{host}-{os.getpid()}-def",
            tmp_path / f"{TEMP_PREFIX}other-host-{dead}-ghi", tmp_path / "unrelated"]
    for d in left:
        d.mkdir()
        (d / "shard-00000-00000.arrow").write_bytes(b"x")
    with ShardFiles(source_of(dirty_events(pl.Int64), schema), 2, str(tmp_path)):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in left[1:])


def test_job_results_do_not_depend_on_shards_and_leave_no_files(tmp_path, events_dir, tiny_checkpoint):
    temp = tmp_path / "shards"
    runs = []
    for n in (1, 4):
        out = tmp_path / f"s{n}"
        run_job(config(events_dir, tiny_checkpoint, out, f"data.num_shards={n}", f"data.temp_dir={temp}"))
        runs.append(published(out))
    # Other shards are other batch shapes: on some CPUs a score differs in its last bit; items and order may not.
    assert runs[0].height > 0
    assert_same_recs(runs[0], runs[1])
    assert temp.is_dir() and not list(temp.iterdir())


def test_temp_dir_must_be_local(tmp_path, events_dir, tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"data\.temp_dir='s3://bucket/tmp' is invalid"):
        config(events_dir, tiny_checkpoint, tmp_path, "data.temp_dir=s3://bucket/tmp")


def test_readers_started_before_the_files_are_written_read_them(tmp_path, checkpoint, schema):
    """The job sends the readers their inputs before it partitions the input; they only read once start() is
    called, and a shard with no rows (64 shards, 40 users) still has the files' columns."""
    from batch.reader import ShardReader

    source = source_of(dirty_events(pl.Int64), schema)
    builder = SequenceBuilder(checkpoint, schema, 24)
    with ShardReader(2, 64) as reader, ShardFiles(source, 64, str(tmp_path)) as shards:
        reader.begin(shards, builder)
        shards.write()
        reader.start()
        for shard in range(64):
            want = builder.build(filtered_shard(source.frame, shard, 64).collect())
            assert same(reader.take().seqs, want), shard


def test_an_engine_that_fails_to_start_leaves_no_files(tmp_path, events_dir, tiny_checkpoint, monkeypatch):
    """The input is partitioned while the engine starts; if the engine fails, the job waits for the pass to end
    and then removes the files and stops the readers, and raises the engine's error."""
    import batch.run

    def broken_engine(cfg, ckpt):
        raise ConfigError("engine.x=1 is invalid: expected 0")

    monkeypatch.setattr(batch.run, "build_engine", broken_engine)
    temp = tmp_path / "shards"
    with pytest.raises(ConfigError, match="engine.x=1"):
        run_job(config(events_dir, tiny_checkpoint, tmp_path / "out", "data.num_shards=4", f"data.temp_dir={temp}"))
    assert temp.is_dir() and not list(temp.iterdir())
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.parquet"))
