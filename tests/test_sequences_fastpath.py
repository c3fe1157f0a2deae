"""SequenceBuilder.build (row-number sort, last-n cut, one gather per column) against a straightforward
reference: a full Polars sort on every key, a window rank, a group_by and the plain encoder, on random shards
with many ties, nulls, NaNs and dirty rows."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import batch.model.tokens as tokens
import batch.sequences as sequences
from batch.events import DROP_REASON, EventSchema
from batch.model import EventArrays, ItemVocab, TokenLayout
from batch.model.tokens import OOV_ITEM
from batch.sequences import SequenceBuilder


def reference_encode(layout: TokenLayout, ev: EventArrays, profile) -> tuple[np.ndarray, np.ndarray]:
    """The encoder written event by event."""
    cfg = layout.config

    def bucket(v, bounds):
        return 0 if np.isnan(v) else 1 + sum(b <= v for b in bounds)

    tokens, offsets = [], [0]
    for u in range(len(ev.offsets) - 1):
        if layout.prefix_len:
            tokens += list(layout.profile_tokens(np.asarray(profile[u:u + 1])).ravel())
        for i in range(ev.offsets[u], ev.offsets[u + 1]):
            bits = sum(int(ev.flags[i, j]) << j for j in range(ev.flags.shape[1]))
            gap = np.nan if i == ev.offsets[u] else float(ev.timestamp[i] - ev.timestamp[i - 1])
            code = bits * layout.pct_radix + bucket(ev.watch_percentage[i], cfg.watch_percentage_boundaries)
            code = code * layout.dur_radix + bucket(ev.watch_duration[i], cfg.watch_duration_boundaries)
            code = code * layout.gap_radix + bucket(gap, cfg.time_gap_boundaries)
            tokens += [ev.item_tokens[i], layout.action_offset + code]
        offsets.append(len(tokens))
    return np.asarray(tokens, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def reference_build(builder: SequenceBuilder, rows: pl.DataFrame):
    """What build computes, the obvious way."""
    schema, layout, items = builder.schema, builder.layout, builder.items
    users_in = rows["user_id"].drop_nulls().n_unique()
    clean = rows.filter(pl.col(DROP_REASON).is_null()).drop(DROP_REASON).sort(builder.sort_keys, nulls_last=True)
    kept = clean.filter(pl.int_range(pl.len()).reverse().over("user_id") < builder.max_events)
    per_user = kept.group_by("user_id", maintain_order=True).agg(
        pl.len().alias("n"), *(pl.col(p).last() for p in schema.profile))
    offsets = np.zeros(per_user.height + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(per_user["n"].to_numpy())
    index = dict(zip(items.item_ids.to_pylist(), range(len(items))))
    item_tokens = np.asarray([OOV_ITEM if x not in index else items.item_offset + index[x]
                              for x in kept["item_id"].to_list()], dtype=np.int64)
    ev = EventArrays(
        item_tokens=item_tokens,
        flags=np.stack([kept[f].fill_null(False).to_numpy() for f in schema.flags], axis=1).reshape(-1, len(schema.flags)),
        watch_percentage=kept["watch_percentage"].fill_null(np.nan).to_numpy(),
        watch_duration=kept["watch_duration"].fill_null(np.nan).to_numpy(),
        timestamp=kept["timestamp"].to_numpy(), offsets=offsets)
    profile = per_user.select(schema.profile).fill_null(-1).to_numpy() if schema.profile else None
    tokens, tok_off = reference_encode(layout, ev, profile)
    oov = int((item_tokens == OOV_ITEM).sum())
    return per_user["user_id"].to_list(), tokens, tok_off, (users_in, users_in - per_user.height, clean.height,
                                                           kept.height, oov)


def random_rows(schema: EventSchema, n: int, seed: int, users: str, items: list, ts_sorted: bool) -> pl.DataFrame:
    """A collected shard frame: few users, instants and items (many ties), nulls and NaNs, ~10% dirty rows."""
    rng = np.random.default_rng(seed)
    pool = {"small": np.arange(-3, 9), "wide": rng.integers(-2**63, 2**63 - 1, 12, dtype=np.int64),
            # 41-bit ids around 0 (as batch.synth's 40-bit ids): grouped first, then one sort by (rank, time, row)
            "spread": rng.integers(-2**40, 2**40, 12, dtype=np.int64),
            "unsigned": np.concatenate([[2**64 - 1, 2**63, 2**63 - 1, 0], rng.integers(0, 2**64 - 1, 8,
                                                                                    dtype=np.uint64)]),
            "string": np.asarray(["", "a", "b", "ab", "ä", "zz", "a\0", "B", "user-10", "user-9"])}[users]
    user = pl.Series("user_id", pool[rng.integers(0, len(pool), n)])
    ts = 1_764_000_000 + rng.integers(0, 40, n) * rng.choice([1, 1000], n)
    frame = pl.DataFrame([
        user,
        pl.Series("item_id", [items[i] for i in rng.integers(0, len(items), n)]),
        pl.Series("timestamp", np.sort(ts) if ts_sorted else ts, dtype=pl.Int64),
        pl.Series("watch_duration", np.where(rng.random(n) < 0.1, np.nan, rng.integers(0, 3, n) * 20.0)),
        pl.Series("watch_percentage", np.where(rng.random(n) < 0.1, np.nan, rng.integers(0, 3, n) / 2)),
        *(pl.Series(f, rng.random(n) < 0.5) for f in schema.flags),
        *(pl.Series(p, rng.integers(-1, 9, n), dtype=pl.Int64) for p in schema.profile),
    ])
    nulls = [c for c in frame.columns if c not in ("user_id", "item_id", "timestamp")]
    frame = frame.with_columns(pl.when(pl.Series(rng.random(n) < 0.05)).then(None).otherwise(pl.col(c)).alias(c)
                               for c in nulls)
    dirty = pl.Series(rng.random(n) < 0.1)
    only_dirty_user = user == user[0]  # a user all of whose rows are dirty (counted, then skipped)
    frame = frame.with_columns(pl.when(dirty | only_dirty_user).then(pl.lit("some_reason")).alias(DROP_REASON))
    for c in ("user_id", "item_id", "timestamp"):  # dirty rows may have nulls where clean rows never do
        frame = frame.with_columns(pl.when(dirty & pl.Series(rng.random(n) < 0.3)).then(None)
                                   .otherwise(pl.col(c)).alias(c))
    return frame


def assert_same(builder: SequenceBuilder, rows: pl.DataFrame) -> None:
    got = builder.build(rows)
    users, tokens, offsets, counts = reference_build(builder, rows)
    assert got.batch.user_ids.to_pylist() == users
    assert got.batch.user_ids.type == rows["user_id"].to_arrow().type
    assert np.array_equal(got.batch.offsets, offsets) and np.array_equal(got.batch.tokens, tokens)
    assert (got.users_in, got.users_skipped, got.events_in, got.events_used, got.events_oov) == counts
    assert got.batch.tokens.dtype == np.int64 and got.batch.offsets.dtype == np.int64


def string_item_checkpoint(checkpoint):
    layout = checkpoint.layout
    ids = [f"item-{i}" for i in range(len(checkpoint.items))]
    return SimpleNamespace(config=checkpoint.config, layout=layout,
                           items=ItemVocab(pa.array(ids), np.zeros(len(ids), np.int64), layout.item_offset))


@pytest.mark.parametrize("users", ["small", "wide", "spread", "unsigned", "string"])
@pytest.mark.parametrize("ts_sorted", [False, True])
@pytest.mark.parametrize("max_seq_len", [None, 9, 1])
@pytest.mark.parametrize("packed_bits", [64, 28, 20, 0])
def test_build_equals_reference(checkpoint, schema, monkeypatch, users, ts_sorted, max_seq_len, packed_bits):
    # 64: (user, time, row) packed in one key, or for spread ids grouped by user first, then sorted by (group,
    # time, row); 28: too narrow for either, so grouped, then sorted by (group, time, position); 20: grouped,
    # then the multi-column argsort; 0: that argsort straight away
    monkeypatch.setattr(sequences, "_PACKED_BITS", packed_bits)
    items = [int(x) for x in checkpoint.items.item_ids.to_numpy()[:5]] + [777777, 5]  # 2 unknown items
    builder = SequenceBuilder(checkpoint, schema, max_seq_len)
    for seed in range(3):
        assert_same(builder, random_rows(schema, 600, seed, users, items, ts_sorted))


def test_build_with_string_items_equals_reference(checkpoint):
    from batch.config import DEFAULT_COLUMNS

    ckpt = string_item_checkpoint(checkpoint)
    schema = EventSchema.for_checkpoint(dict(DEFAULT_COLUMNS), ckpt)
    builder = SequenceBuilder(ckpt, schema, 15)
    for users in ("small", "string"):
        assert_same(builder, random_rows(schema, 500, 4, users, ["item-0", "item-3", "item-10", "zz", ""], False))


def test_build_of_empty_and_all_dirty_shards(checkpoint, schema):
    builder = SequenceBuilder(checkpoint, schema)
    rows = random_rows(schema, 50, 1, "small", [1000, 1001], False)
    for frame in (rows.head(0), rows.with_columns(pl.lit("x").alias(DROP_REASON))):
        assert_same(builder, frame)
        got = builder.build(frame)
        assert len(got.batch) == 0 and len(got.batch.tokens) == 0 and got.batch.offsets.tolist() == [0]


@pytest.mark.parametrize("variant", ["default", "many_boundaries", "huge"])
def test_encoder_equals_event_by_event_reference(checkpoint, variant):
    rng = np.random.default_rng(3)
    layout = checkpoint.layout
    if variant == "many_boundaries":  # past _MAX_COMPARED: binary search, and side codes too wide for int16
        cfg = dataclasses.replace(layout.config, watch_percentage_boundaries=list(np.linspace(0.01, 0.99, 99)),
                                  watch_duration_boundaries=list(np.geomspace(1.0, 3600.0, 90)))
        layout = TokenLayout(cfg)
        assert (layout.code_dtype, layout.action_dtype) == (np.int32, np.int32)
    elif variant == "huge":  # 2**8 * 3002**2 side codes: codes and action tokens past int32, in int64
        cfg = dataclasses.replace(layout.config, action_flags=[f"f{j}" for j in range(8)],
                                  watch_percentage_boundaries=list(np.linspace(0.0, 1.0, 3000)),
                                  watch_duration_boundaries=list(np.geomspace(1.0, 3600.0, 3000)))
        layout = TokenLayout(cfg)
        assert (layout.code_dtype, layout.action_dtype) == (np.int64, np.int64)
    else:
        assert (layout.code_dtype, layout.action_dtype) == (np.int16, np.int32)
    lengths = [0, 1, 5, 0, 17, 40]
    n = sum(lengths)
    cfg = layout.config
    on_bounds = lambda bounds: np.asarray(bounds)[rng.integers(0, len(bounds), n)]  # noqa: E731 (values = a bound)
    ev = EventArrays(item_tokens=rng.integers(0, layout.vocab_size, n),
                     flags=rng.random((n, len(cfg.action_flags))) < 0.5,
                     watch_percentage=np.where(rng.random(n) < 0.2, np.nan, np.where(
                         rng.random(n) < 0.3, on_bounds(cfg.watch_percentage_boundaries), rng.random(n) * 1.2)),
                     watch_duration=np.where(rng.random(n) < 0.2, np.nan, np.where(
                         rng.random(n) < 0.3, on_bounds(cfg.watch_duration_boundaries), rng.exponential(60, n))),
                     timestamp=np.cumsum(rng.integers(0, 5000, n)) * rng.choice([1, 100], n).cumprod().clip(1, 10**6),
                     offsets=np.cumsum([0, *lengths]))
    profile = rng.integers(-2, 10, (len(lengths), layout.prefix_len))
    got = layout.encode(ev, profile)
    want = reference_encode(layout, ev, profile)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
@pytest.mark.parametrize("compare", [True, False])
def test_bucketize_equals_a_binary_search(monkeypatch, dtype, compare):
    """Summed comparisons (few boundaries) and np.searchsorted give the same buckets, in float64 as before:
    values on a boundary, just around it, infinities, NaN (0), float32 values near a float64 boundary."""
    if not compare:
        monkeypatch.setattr(tokens, "_MAX_COMPARED", 0)
    bounds = [-1.5, 0.0, 0.1, 0.25, 1 / 3, 0.7, 10.0, 2592000.0]  # float32(0.7) < 0.7
    rng = np.random.default_rng(1)
    values = np.concatenate([bounds, np.nextafter(bounds, np.inf), np.nextafter(bounds, -np.inf),
                             [np.nan, -np.inf, np.inf, -2.0, 2592001.0], rng.normal(0, 5, 300)])
    if dtype == np.int64:
        values = np.round(values[np.isfinite(values)])
    values = values.astype(dtype)
    v64 = values.astype(np.float64)
    want = np.where(np.isnan(v64), 0, 1 + np.searchsorted(np.asarray(bounds), v64, side="right"))
    assert np.array_equal(tokens._bucketize(values, bounds), want)


@pytest.mark.parametrize("vocab_ids", [np.arange(1000, 1064), np.array([5, -3, 2**40, 7, -2**62]),
                                       np.array([0, 2, 4, 9, 60000])])
def test_item_lookup_equals_a_dictionary(vocab_ids):
    """The dense-table lookup (compact integer ids) and the hash lookup (anything else) agree with a dict."""
    vocab = ItemVocab(pa.array(vocab_ids.astype(np.int64)), np.zeros(len(vocab_ids)), item_offset=100)
    rng = np.random.default_rng(0)
    raw = np.concatenate([vocab_ids, rng.choice(vocab_ids, 200), rng.integers(-70000, 70000, 200),
                          [2**63 - 1, -2**63, int(vocab_ids.min()) - 1, int(vocab_ids.max()) + 1]]).astype(np.int64)
    index = {int(v): i for i, v in enumerate(vocab_ids)}
    want = [100 + index[int(v)] if int(v) in index else OOV_ITEM for v in raw]
    assert vocab.lookup(pa.array(raw)).tolist() == want
    assert vocab.lookup(pa.chunked_array([raw[:7], raw[7:]])).tolist() == want
    assert vocab.lookup(pa.array(raw.astype(np.int32).tolist()[:5] + [None])).tolist()[-1] == OOV_ITEM
    assert vocab.lookup(pa.array(raw[:0])).tolist() == []
