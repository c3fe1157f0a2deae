"""Per-user event sequences for training and evaluation, with the leave-last-event-out split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from batch.config import DEFAULT_COLUMNS as JOB_COLUMNS
from batch.model import ItemVocab, MTGRConfig, TokenLayout
from batch.sequences import encode_events

DEFAULT_COLUMNS = {**JOB_COLUMNS, "category": "category"}  # the job's mapping + the item attribute


@dataclass
class UserSequences:
    """One row per user (sorted by user id): list columns of events in time order, plus profile values."""

    frame: pl.DataFrame  # user_id, item_id, timestamp, watch_*, flags..., category, profile features

    def __len__(self) -> int:
        return self.frame.height

    def split_last(self) -> tuple["UserSequences", pl.Series]:
        """(history without each user's last event, the held-out last item ids); users need >= 2 events."""
        f = self.frame.filter(pl.col("item_id").list.len() >= 2)
        lists = [c for c, t in f.schema.items() if isinstance(t, pl.List)]
        history = f.with_columns(pl.col(c).list.head(pl.col(c).list.len() - 1) for c in lists)
        return UserSequences(history), f["item_id"].list.last()


def read_user_sequences(path: str, config: MTGRConfig, columns: dict[str, str] | None = None) -> UserSequences:
    """Read a behaviour log (file, dir, glob or Hive tree) into time-ordered per-user sequences."""
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    profile = [p.name for p in config.profile_features]
    fields = ["item_id", "timestamp", "watch_duration", "watch_percentage", "category", *config.action_flags]
    lf = pl.scan_parquet(path, hive_partitioning=True)
    lf = lf.select(pl.col(cols["user_id"]).alias("user_id"),
                   *(pl.col(cols.get(f, f)).alias(f) for f in fields),
                   *(pl.col(cols.get(p, p)).alias(p) for p in profile))
    lf = lf.with_columns(pl.col("timestamp").cast(pl.Datetime("us")).dt.epoch("s")
                         if lf.collect_schema()["timestamp"] != pl.Int64 else pl.col("timestamp"))
    lf = lf.drop_nulls(["user_id", "item_id", "timestamp"]).sort(["user_id", "timestamp", "item_id"])
    frame = lf.group_by("user_id", maintain_order=True).agg(
        *(pl.col(f) for f in fields), *(pl.col(p).last() for p in profile)).collect()
    return UserSequences(frame)


def build_item_vocab(seqs: UserSequences, layout: TokenLayout) -> ItemVocab:
    """Items seen in ``seqs``, ordered by raw id, with each item's most frequent category."""
    ev = seqs.frame.select("item_id", "category").explode(["item_id", "category"])
    items = (ev.group_by("item_id").agg(pl.col("category").drop_nulls().mode().min().fill_null(0))
             .sort("item_id"))
    return ItemVocab(items["item_id"].to_arrow(), items["category"].to_numpy(), layout.item_offset)


def encode(seqs: UserSequences, vocab: ItemVocab, layout: TokenLayout,
           max_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences ``(tokens, offsets)`` of every user, keeping each user's last events that fit."""
    keep = layout.max_events(max_seq_len or layout.config.max_seq_len)
    f = seqs.frame
    lists = [c for c, t in f.schema.items() if isinstance(t, pl.List)]
    f = f.with_columns(pl.col(c).list.tail(keep) for c in lists).with_columns(n=pl.col("item_id").list.len())
    tokens, offsets, _ = encode_events(f.select(lists).explode(lists), f, vocab, layout)
    return tokens, offsets


def item_index(vocab: ItemVocab, raw_ids: pa.Array | pl.Series) -> np.ndarray:
    """Item index (token - item_offset) of raw ids; -1 for items outside the vocabulary."""
    raw = raw_ids.to_arrow() if isinstance(raw_ids, pl.Series) else raw_ids
    tokens = vocab.lookup(raw)
    return np.where(tokens >= vocab.item_offset, tokens - vocab.item_offset, -1)
