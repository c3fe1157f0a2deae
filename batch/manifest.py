"""Counts and stage timings of one run, and the manifest that describes it."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import platform
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from omegaconf import OmegaConf

from batch.config import JobConfig, window
from batch.events import EventSource
from batch.model import Checkpoint
from batch.sequences import ShardSequences

PACKAGES = ("torch", "polars", "pyarrow", "numpy", "hydra-core", "omegaconf", "fsspec", "safetensors")
_PUBLIC_STORAGE_KEYS = ("endpoint", "region", "allow_http", "anon", "skip_signature")


class RunStats:
    """Counters (rows, users, events), seconds per stage summed over shards, and each stage's span in wall-clock
    time (first start, last end; Unix seconds). Thread-safe: the job's stages run in several threads."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self.spans: dict[str, list[float]] = {}
        self.rows_dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0, wall0 = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self.add_stage(name, wall0, time.time(), time.perf_counter() - t0)

    def add_stage(self, name: str, start: float, end: float, seconds: float) -> None:
        """Account ``seconds`` of stage ``name`` that ran from ``start`` to ``end`` (Unix seconds), e.g. in
        another process."""
        with self._lock:
            self.seconds[name] += seconds
            span = self.spans.setdefault(name, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)

    def add_rows(self, row_counts: dict[str, Any]) -> None:
        """Counts from :func:`batch.events.count_rows`."""
        with self._lock:
            self.rows_dropped = dict(row_counts["rows_dropped"])
            self.counts.update({k: v for k, v in row_counts.items() if isinstance(v, int)})

    def add_shard(self, seqs: ShardSequences, rows_out: int) -> None:
        with self._lock:
            self.counts.update(users_in=seqs.users_in, users_scored=len(seqs.batch), users_skipped=seqs.users_skipped,
                           events_used=seqs.events_used, events_truncated=seqs.events_in - seqs.events_used,
                               events_oov=seqs.events_oov, rows_out=rows_out, shards=1)


def build_manifest(cfg: JobConfig, ckpt: Checkpoint, source: EventSource, stats: RunStats) -> dict[str, Any]:
    """Everything needed to audit or reproduce the run (secrets in storage options are redacted)."""
    c = stats.counts
    start, end = window(cfg.data)
    return {
        "run_date": cfg.data.run_date,
        "window": {"start": start.isoformat(), "end_exclusive": end.isoformat()},
        "model": {"checkpoint": ckpt.path, "model_version": ckpt.model_version, "identity": ckpt.identity,
                  "checkpoint_hash": ckpt.content_hash, "preset": cfg.model.name},
        "input": {"path": cfg.data.path, "files_read": len(source.files), "files_pruned": source.files_pruned,
                  "rows_read": c["rows_read"], "rows_clean": c["rows_clean"], "rows_dropped": stats.rows_dropped,
                  "rows_unknown_item": c["rows_unknown_item"]},
        "users": {"in": c["users_in"], "scored": c["users_scored"],
                  "skipped": {"all_rows_dropped": c["users_skipped"]}},
        "events": {"used": c["events_used"], "truncated_by_max_seq_len": c["events_truncated"],
                   "oov_items": c["events_oov"]},
        "output": {"rows": c["rows_out"], "top_k": cfg.output.top_k, "format": cfg.output.format.value,
                   "shards": c["shards"]},
        # Seconds per stage, summed over shards; stages overlap (see batch.run), so they add up to more than the
        # wall time. "wait_for_data" is how long the engine sat idle waiting for the reader.
        "timings_seconds": {k: round(v, 3) for k, v in stats.seconds.items()},
        "timeline": {k: {"start": round(a, 3), "end": round(b, 3)} for k, (a, b) in stats.spans.items()},
        "config": resolved_config(cfg),
        "versions": package_versions(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def resolved_config(cfg: JobConfig) -> dict[str, Any]:
    """The job config as plain data, with storage option values other than endpoints/regions redacted."""
    plain = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    for group in ("data", "output"):
        opts = plain[group].get("storage_options") or {}
        for key in opts:
            if not any(p in key.lower() for p in _PUBLIC_STORAGE_KEYS):
                opts[key] = "***"
    return plain


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
