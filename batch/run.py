"""The nightly batch job: ``python -m batch.run [key=value ...]`` (see ``--help``).

read (Polars, lazy) -> per-shard user sequences -> engine top-K -> Parquet, one shard in memory at a time.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from batch.config import JobConfig, to_job_config, window
from batch.engines import build_engine
from batch.engines.base import recommendations_table
from batch.errors import BatchError, InputError
from batch.events import EventSchema, count_rows, scan_events
from batch.manifest import RunStats, build_manifest
from batch.output import OutputWriter
from batch.preset import open_checkpoint
from batch.progress import ProgressLog
from batch.sequences import SequenceBuilder

log = logging.getLogger("batch.run")


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Score every user in the run window and publish the recommendations; returns the manifest."""
    stats = RunStats()
    with stats.stage("load_checkpoint"):
        ckpt = open_checkpoint(cfg.model)
    schema = EventSchema.for_checkpoint(cfg.data.columns, ckpt)
    with stats.stage("scan"):
        source = scan_events(cfg.data.path, schema, storage_options=cfg.data.storage_options,
                             window=window(cfg.data), sql_filter=cfg.data.filter)
        stats.add_rows(count_rows(source, ckpt.items.item_ids))
    if stats.counts["rows_clean"] == 0:
        raise InputError(f"no usable rows in {cfg.data.path!r} for the window ending {cfg.data.run_date} "
                         f"({stats.counts['rows_read']} read, dropped: {stats.rows_dropped or 'none'})")
    builder = SequenceBuilder(ckpt, schema, cfg.data.max_seq_len)
    engine = build_engine(cfg.engine, ckpt)
    num_shards = cfg.data.num_shards
    try:
        with OutputWriter(cfg.output, run_date=cfg.data.run_date, model_version=ckpt.identity,
                          checkpoint_hash=ckpt.content_hash) as writer, ProgressLog(num_shards) as progress:
            for shard in range(num_shards):
                t0 = time.perf_counter()
                with stats.stage("read"):
                    rows = source.collect(builder.shard_frame(source.frame, shard, num_shards))
                with stats.stage("sequences"):
                    seqs = builder.build(rows)
                    del rows  # keep at most one shard's rows in memory
                with stats.stage("score"):
                    top = engine.score(seqs.batch, cfg.output.top_k, cfg.output.exclude_seen)
                with stats.stage("write"):
                    recs = recommendations_table(seqs.batch.user_ids, top, ckpt.items.item_ids)
                    writer.write_shard(recs)
                stats.add_shard(seqs, recs.num_rows)
                progress.shard_done(shard, len(seqs.batch), seqs.events_used, time.perf_counter() - t0)
            return writer.publish(build_manifest(cfg, ckpt, source, stats))
    finally:
        engine.close()


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """Resolve local relative paths against the directory the job was started from."""
    for group, key in ((cfg.data, "path"), (cfg.model, "checkpoint"), (cfg.output, "path")):
        value = getattr(group, key)
        if "://" not in value:
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
