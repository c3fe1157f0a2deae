"""The nightly batch job: ``python -m batch.run [key=value ...]`` (see ``--help``).

read (Polars, lazy) -> per-shard user sequences -> engine top-K -> Parquet, shard by shard, the stages overlapped.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from batch.config import JobConfig, to_job_config, window
from batch.engines import Engine, build_engine
from batch.engines.base import TopK, recommendations_table
from batch.errors import BatchError, InputError
from batch.events import EventSchema, EventSource, count_rows, has_clean_rows, scan_events
from batch.manifest import RunStats, build_manifest
from batch.output import OutputWriter
from batch.model import Checkpoint
from batch.preset import open_checkpoint
from batch.progress import ProgressLog
from batch.reader import ShardFiles, ShardReader
from batch.sequences import SequenceBuilder, ShardSequences

log = logging.getLogger("batch.run")


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Score every user in the run window and publish the recommendations; returns the manifest.

    Shards flow through three stages at once: while the engine scores shard i, ``data.read_workers`` reader
    processes build shards i+1, i+2, ... (``batch.reader``) and a writer thread writes shard i-1, so the device does
    not wait on Polars or Parquet. At most read_workers + 2 shards' sequences are in memory (being built or waiting,
    scored, written): memory grows with read_workers. Shards are still scored and written in order, so the output
    does not depend on the overlap or the number of readers. The shards' rows are read from the input once, in a
    pass that writes each shard's rows to temporary files under ``data.temp_dir`` (``batch.reader.ShardFiles``);
    that pass and the first shards' reading run while the engine starts, the row count after the pass. The reader
    processes start first of all, so that their imports overlap the checkpoint's load, and get their inputs (the
    shard files, the sequence builder) once those exist.
    """
    stats = RunStats()
    # Started after the checkpoint's load, beside the partitioning pass, 4 readers took ~5.4 s to spawn and import
    # on an H100 host (60,000 users, 8 shards) and the torch engine waited 5.5 s for its first shard, a third of the
    # job. A job that fails before reader.begin() (bad checkpoint or input) stops the waiting readers on its way out.
    with ShardReader(cfg.data.read_workers, cfg.data.num_shards, cfg.data.reader_nice) as reader:
        log.info("%d reader process(es), %d Polars threads each, nice +%d", reader.workers, reader.threads,
                 cfg.data.reader_nice)
        with stats.stage("load_checkpoint"):
            ckpt = open_checkpoint(cfg.model)
        schema = EventSchema.for_checkpoint(cfg.data.columns, ckpt)
        with stats.stage("scan"):
            source = scan_events(cfg.data.path, schema, storage_options=cfg.data.storage_options,
                                 window=window(cfg.data), sql_filter=cfg.data.filter)
            if not has_clean_rows(source):  # fail before the engine starts; the full count says why
                stats.add_rows(count_rows(source, ckpt.items.item_ids))
                raise InputError(f"no usable rows in {cfg.data.path!r} for the window ending {cfg.data.run_date} "
                                 f"({stats.counts['rows_read']} read, dropped: {stats.rows_dropped or 'none'})")
        builder = SequenceBuilder(ckpt, schema, cfg.data.max_seq_len)
        # The files go before the readers stop: after an error, a shard still being built may fail, unread.
        with ShardFiles(source, cfg.data.num_shards, cfg.data.temp_dir) as shards:
            reader.begin(shards, builder)  # the readers unpickle them while the input is partitioned
            return _pipeline(cfg, ckpt, source, shards, reader, stats)


def _pipeline(cfg: JobConfig, ckpt: Checkpoint, source: EventSource, shards: ShardFiles, reader: ShardReader,
              stats: RunStats) -> dict[str, Any]:
    """Partition the input and start the readers while the engine starts, then score (:func:`_score`)."""

    def prepare() -> None:  # one more pass (each shard's rows to its files), then the readers start
        with stats.stage("partition"):
            shards.write()
        reader.start()

    def count() -> None:  # the manifest's row counts, needed only when the output is published
        if preparing.exception() is None:
            with stats.stage("count"):
                stats.add_rows(count_rows(source, ckpt.items.item_ids))

    # While the engine starts, the input is partitioned and the first shards are built; the rows are counted
    # after the pass, while the readers build, so the first shard does not wait for the count (the readers
    # left most CPUs idle then: 17% busy on a 16-core H100 host). Polars runs on its own threads and the
    # readers in their own processes, so neither waits for the other.
    prep = ThreadPoolExecutor(1, thread_name_prefix="mtgr-prepare")
    preparing = prep.submit(prepare)
    counting = prep.submit(count)  # on the same thread, after prepare
    prep.shutdown(wait=False)  # its thread ends with the count
    try:
        with stats.stage("engine_start"):
            engine = build_engine(cfg.engine, ckpt)
    except BaseException:
        counting.cancel()
        wait([preparing, counting])  # the files and readers are cleaned up after the pass, not under it
        raise
    try:
        with stats.stage("wait_for_data"):  # the engine was ready before the pass was done
            preparing.result()
        return _score(cfg, ckpt, source, reader, engine, stats, counting)
    finally:
        engine.close()
        wait([counting])


def _score(cfg: JobConfig, ckpt: Checkpoint, source: EventSource, reader: ShardReader, engine: Engine,
           stats: RunStats, counting: Future[None]) -> dict[str, Any]:
    """Read, score and write the shards (overlapped) and publish once ``counting`` is done; returns the
    manifest."""
    num_shards = reader.num_shards
    last_written = time.perf_counter()

    def save(shard: int, seqs: ShardSequences, top: TopK) -> None:  # writer thread
        nonlocal last_written
        with stats.stage("write"):
            recs = recommendations_table(seqs.batch.user_ids, top, ckpt.items.item_ids)
            writer.write_shard(recs)
        stats.add_shard(seqs, recs.num_rows)
        now = time.perf_counter()  # shards overlap in the stages: a shard's time is the job's pace, write to write
        progress.shard_done(shard, len(seqs.batch), seqs.events_used, now - last_written)
        last_written = now

    # Exit order matters: the writer thread finishes before the output is published or aborted.
    with OutputWriter(cfg.output, run_date=cfg.data.run_date, model_version=ckpt.identity,
                      checkpoint_hash=ckpt.content_hash) as writer, ProgressLog(num_shards) as progress, \
            ThreadPoolExecutor(1, thread_name_prefix="mtgr-write") as writes:
        written = None
        for shard in range(num_shards):
            with stats.stage("wait_for_data"):
                built = reader.take()
            stats.add_stage("read", *built.read)
            stats.add_stage("sequences", *built.sequences)
            with stats.stage("score"):
                top = engine.score(built.seqs.batch, cfg.output.top_k, cfg.output.exclude_seen)
            if written is not None:
                written.result()  # one shard in the writer at a time, and its errors surface here
            written = writes.submit(save, shard, built.seqs, top)
        written.result()
        counting.result()
        return writer.publish(build_manifest(cfg, ckpt, source, stats))


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """Resolve local relative paths against the directory the job was started from."""
    for group, key in ((cfg.data, "path"), (cfg.data, "temp_dir"), (cfg.model, "checkpoint"), (cfg.output, "path")):
        value = getattr(group, key)
        if value is not None and "://" not in value:
            setattr(group, key, to_absolute_path(value))
    return cfg


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """Schedulers stop jobs with SIGTERM: unwind like an error, so the writer drops its staged file at once."""
    log.error("stopped by signal %d; nothing was published, the previous output is intact", signum)
    raise SystemExit(128 + signum)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        manifest = run_job(absolute_paths(to_job_config(raw)))
    except BatchError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", e)
        sys.exit(1)
    pub = manifest["published"]
    log.info("wrote %s rows for %s users to %s", f"{pub['rows']:,}", f"{pub['users']:,}", pub["file"])


if __name__ == "__main__":
    main()
