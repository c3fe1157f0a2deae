"""Synthetic behaviour logs at any scale, in the job's input schema, for benchmarks.

History lengths are log-normal (a few heavy users, a long tail of light ones), item popularity is a power law
(``item = floor(num_items * u**3)``: the top 1% of items draw ~21% of events), timestamps are uniform over the
window and rows are not sorted, as in a real log. Files are written in parallel, each from its own seeded
generator, so the log is the same for the same spec on any machine.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class LogSpec:
    """What to generate. Events per user ~ round(lognormal(log(events_median), events_sigma)), clipped."""

    users: int
    events_median: float
    events_sigma: float
    min_events: int
    max_events: int
    num_items: int
    run_date: str  # the log covers [run_date - days, run_date)
    days: int
    seed: int = 0
    users_per_file: int = 4096


def history_lengths(spec: LogSpec) -> np.ndarray:
    """Events per user, (users,) int64, in user order."""
    rng = np.random.default_rng([spec.seed, 0])
    n = np.round(rng.lognormal(np.log(spec.events_median), spec.events_sigma, spec.users))
    return np.clip(n, spec.min_events, spec.max_events).astype(np.int64)


def user_ids(num_users: int) -> np.ndarray:
    """Distinct, unordered-looking int64 ids (an odd multiplier permutes them modulo 2**40)."""
    return (np.arange(num_users, dtype=np.int64) * 0x9E3779B1) % (1 << 40)


def write_log(spec: LogSpec, out: Path, threads: int = 8) -> np.ndarray:
    """Write the log as ``out/part-NNNNN.parquet`` (skipped if ``out`` already holds this spec); returns the
    events per user."""
    lengths = history_lengths(spec)
    marker = out / "_spec.json"
    text = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    if marker.exists() and marker.read_text() == text:
        return lengths
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    marker.unlink(missing_ok=True)
    ids = user_ids(spec.users)
    starts = range(0, spec.users, spec.users_per_file)

    def one(index: int) -> None:
        lo = starts[index]
        hi = min(lo + spec.users_per_file, spec.users)
        table = _events(np.random.default_rng([spec.seed, 1, index]), ids[lo:hi], lengths[lo:hi], spec)
        pq.write_table(table, out / f"part-{index:05d}.parquet", compression="zstd", row_group_size=1 << 20)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(starts))))
    marker.write_text(text)
    return lengths


def _events(rng: np.random.Generator, ids: np.ndarray, lengths: np.ndarray, spec: LogSpec) -> pa.Table:
    """The rows of some users, in random order."""
    total = int(lengths.sum())
    owner = np.repeat(np.arange(len(ids)), lengths)
    order = rng.permutation(total)
    owner = owner[order]
    end = dt.datetime.fromisoformat(spec.run_date).replace(tzinfo=dt.timezone.utc)
    start_us = int((end - dt.timedelta(days=spec.days)).timestamp()) * 10**6
    items = np.minimum((spec.num_items * rng.random(total) ** 3).astype(np.int64), spec.num_items - 1)
    return pa.table({
        "user_id": pa.array(ids[owner]),
        "session_id": pa.array(owner.astype(np.int64) * 1000 + rng.integers(0, 50, total)),
        "video_id": pa.array(items),
        "timestamp": pa.array(start_us + rng.integers(0, spec.days * 86_400 * 10**6, total), pa.timestamp("us")),
        "watch_duration": pa.array(rng.lognormal(3.0, 1.2, total)),
        "watch_percentage": pa.array(rng.random(total)),
        "is_liked": pa.array(rng.random(total) < 0.05),
        "is_favorited": pa.array(rng.random(total) < 0.02),
        "is_shared": pa.array(rng.random(total) < 0.01),
        "category": pa.array((items % 1000 + 1).astype(np.int32)),
        "age_group": pa.array(rng.integers(0, 7, len(ids)).astype(np.int8)[owner]),
    })


def token_batch(layout, num_items: int, events: np.ndarray, seed: int):
    """Token sequences ready for an engine, one per entry of ``events`` (events per user, already capped to the
    model's length): [profile tokens] + [item, action] per event, items drawn as in the log (power law).

    For engine-level benchmarks that skip the Polars stage; returns a ``batch.engines.base.UserBatch``."""
    from batch.engines.base import UserBatch

    rng = np.random.default_rng([seed, 2])
    p = layout.prefix_len
    lengths = p + 2 * np.asarray(events, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    slot = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], lengths)  # position inside the user
    is_profile = slot < p
    n_ev = int((~is_profile).sum())
    tokens = np.empty(len(slot), dtype=np.int64)
    tokens[is_profile] = layout.profile_offset + rng.integers(0, max(layout.num_profile_tokens_total, 1),
                                                              int(is_profile.sum()))
    items = np.minimum((num_items * rng.random(n_ev) ** 3).astype(np.int64), num_items - 1)
    tokens[~is_profile] = np.where((slot[~is_profile] - p) % 2 == 0, layout.item_offset + items,
                                   layout.action_offset + rng.integers(0, layout.num_action_tokens, n_ev))
    return UserBatch(pa.array(np.arange(len(lengths), dtype=np.int64)), tokens, offsets)
