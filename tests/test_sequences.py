"""Sharding by a stable hash, per-user time order with a total tie-break, truncation and tokenisation."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from batch.events import normalize
from batch.model.tokens import OOV_ITEM
from batch.sequences import SequenceBuilder, mix64, shard_of, string_hash64

from conftest import RUN_DATE, make_events

MASK = (1 << 64) - 1
WINDOW = (RUN_DATE - dt.timedelta(days=7), RUN_DATE)


def ref_mix64(x: int) -> int:
    x &= MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def ref_string_hash(s: str) -> int:
    h = 0
    for byte in s.encode():
        h = (h * 0x100000001B3 + byte) & MASK
    return ref_mix64((h + len(s.encode())) & MASK)


def build(checkpoint, schema, frame: pl.DataFrame, max_seq_len=None, window=WINDOW):
    builder = SequenceBuilder(checkpoint, schema, max_seq_len)
    return builder, builder.build(normalize(frame.lazy(), schema, window).collect())


def test_integer_hash_matches_reference_and_is_pinned():
    values = [0, 1, 2, -1, 12345678901, 2**62]
    got = pl.select(mix64(pl.lit(pl.Series(values)).cast(pl.UInt64, wrap_numerical=True))).to_series().to_list()
    assert got == [ref_mix64(v) for v in values]
    assert got[1] == 6238072747940578789  # pinned: shard ids must not change between releases


def test_string_hash_matches_reference_and_keeps_nulls():
    values = ["a", "", "user-0042", "ünïcode", "\0", None]
    got = string_hash64(pl.Series(values)).to_list()
    assert got[:-1] == [ref_string_hash(v) for v in values[:-1]] and got[-1] is None
    sliced = string_hash64(pl.Series(values)[2:4])  # arrays with an offset into their buffers
    assert sliced.to_list() == got[2:4]


@pytest.mark.parametrize("dtype", [pl.Int64, pl.Int32, pl.String])
def test_shards_partition_users(dtype):
    users = pl.DataFrame({"user_id": pl.Series(range(1000)).cast(dtype)})
    shard = users.select(shard_of("user_id", users.schema["user_id"], 7)).to_series()
    counts = shard.value_counts()["count"].to_list()
    assert shard.min() >= 0 and shard.max() <= 6 and len(counts) == 7 and min(counts) > 100  # all used, balanced


def test_time_order_with_total_tie_break_is_input_order_independent(checkpoint, schema):
    frame = make_events(num_users=5, unknown_items=False)
    ts = frame["timestamp"][0]  # every event at the same instant: order falls to item id, then the rest
    tied = frame.with_columns(pl.lit(ts).alias("timestamp"))
    _, a = build(checkpoint, schema, tied)
    _, b = build(checkpoint, schema, tied.sample(fraction=1.0, shuffle=True, seed=3))
    assert np.array_equal(a.batch.tokens, b.batch.tokens) and np.array_equal(a.batch.offsets, b.batch.offsets)
    items = a.batch.tokens[a.batch.offsets[0] + 1: a.batch.offsets[1]: 2] - checkpoint.layout.item_offset
    raw = checkpoint.items.raw_ids(items).to_pylist()
    assert raw == sorted(raw)


def test_users_sorted_and_each_keeps_its_last_events(checkpoint, schema):
    frame = make_events(num_users=6, unknown_items=False)
    builder, seqs = build(checkpoint, schema, frame, max_seq_len=11)  # 1 profile token + 5 events
    assert seqs.batch.user_ids.to_pylist() == list(range(1, 7))
    assert builder.max_events == 5 and seqs.batch.lengths.max() == 11
    counts = frame.group_by("user_id").len().sort("user_id")["len"].to_numpy()
    assert np.array_equal(seqs.batch.lengths, 1 + 2 * np.minimum(counts, 5))
    assert seqs.events_in == frame.height and seqs.events_used == int(np.minimum(counts, 5).sum())
    last = frame.filter(pl.col("user_id") == 1).sort("timestamp", "video_id").tail(5)["video_id"].to_list()
    u1 = seqs.batch.tokens[seqs.batch.offsets[0] + 1: seqs.batch.offsets[1]: 2] - checkpoint.layout.item_offset
    assert checkpoint.items.raw_ids(u1).to_pylist() == last


def test_profile_from_last_event_and_null_is_unknown(checkpoint, schema):
    frame = make_events(num_users=2, unknown_items=False).sort("timestamp")
    frame = frame.with_columns(age_group=pl.when(pl.col("user_id") == 1).then(pl.int_range(pl.len()) % 7)
                               .otherwise(None).cast(pl.Int8))
    _, seqs = build(checkpoint, schema, frame)
    layout = checkpoint.layout
    last_age = frame.filter(pl.col("user_id") == 1)["age_group"][-1]
    assert seqs.batch.tokens[0] == layout.profile_tokens(np.array([[last_age]]))[0, 0]
    assert seqs.batch.tokens[seqs.batch.offsets[1]] == layout.profile_bases[0]  # slot 0 = unknown


def test_unknown_items_become_oov_and_are_counted(checkpoint, schema):
    frame = make_events(num_users=3, unknown_items=False).with_columns(
        video_id=pl.when(pl.int_range(pl.len()) % 4 == 0).then(777777).otherwise(pl.col("video_id")))
    _, seqs = build(checkpoint, schema, frame)
    assert seqs.events_oov == frame.filter(pl.col("video_id") == 777777).height > 0
    assert (seqs.batch.tokens == OOV_ITEM).sum() == seqs.events_oov


def test_users_whose_rows_are_all_dirty_are_skipped_and_counted(checkpoint, schema):
    frame = make_events(num_users=4, unknown_items=False).with_columns(
        watch_percentage=pl.when(pl.col("user_id") == 2).then(7.0).otherwise(pl.col("watch_percentage")))
    _, seqs = build(checkpoint, schema, frame)
    assert seqs.users_in == 4 and seqs.users_skipped == 1 and 2 not in seqs.batch.user_ids.to_pylist()


def test_same_tokens_as_the_training_reader(tmp_path, checkpoint, schema):
    """The batch job and batch.dataset (training/eval) must build identical sequences."""
    from batch.dataset import encode, read_user_sequences

    frame = make_events(num_users=8)
    frame.write_parquet(tmp_path / "events.parquet")
    train_tokens, train_offsets = encode(read_user_sequences(str(tmp_path / "events.parquet"), checkpoint.config),
                                         checkpoint.items, checkpoint.layout)
    _, seqs = build(checkpoint, schema, frame, window=None)
    assert np.array_equal(seqs.batch.offsets, train_offsets) and np.array_equal(seqs.batch.tokens, train_tokens)


def test_max_seq_len_above_the_checkpoints_is_refused(checkpoint, schema):
    from batch.errors import ConfigError

    with pytest.raises(ConfigError, match="data.max_seq_len"):
        SequenceBuilder(checkpoint, schema, checkpoint.config.max_seq_len + 1)


def test_row_order_equals_a_full_sort_on_every_key(checkpoint, schema):
    rng = np.random.default_rng(7)
    n = 3000  # few users, instants and items: most rows tie on (user, time, item)
    frame = make_events(num_users=1, unknown_items=False).head(1).sample(n, with_replacement=True, seed=1)
    frame = frame.with_columns(
        user_id=pl.Series(rng.integers(0, 5, n)), video_id=pl.Series(rng.integers(1000, 1003, n)),
        timestamp=pl.lit(dt.datetime(2026, 11, 26)) + pl.duration(seconds=pl.Series(rng.integers(0, 3, n))),
        watch_duration=pl.Series(rng.integers(0, 4, n).astype(float)), is_liked=pl.Series(rng.random(n) < 0.5),
        watch_percentage=pl.Series(np.where(rng.random(n) < 0.1, np.nan, rng.integers(0, 3, n) / 2)))
    builder = SequenceBuilder(checkpoint, schema)
    events = normalize(frame.lazy(), schema).collect().drop("drop_reason")
    order = builder.row_order(events)[0]
    assert events.select(pl.all().gather(order)).equals(events.sort(builder.sort_keys, nulls_last=True))
