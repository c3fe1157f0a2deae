"""Users -> shards -> time-ordered token sequences, one shard in memory at a time.

Users are assigned to shards by a stable hash of their id that we define here (a splitmix64 finaliser for
integers, a polynomial byte hash for strings), so the shard of a user never depends on the Polars version, the
file layout or the run. Per shard: filter -> collect -> sort -> keep each user's last events -> encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from batch.engines.base import UserBatch
from batch.errors import ConfigError
from batch.events import DROP_REASON, OUT_OF_WINDOW, EventSchema
from batch.model import Checkpoint, EventArrays, ItemVocab, TokenLayout

_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64 finaliser constants
_STRING_BASE = 0x100000001B3  # FNV-1 64-bit prime, used as polynomial base
_MASK64 = (1 << 64) - 1


# -- stable user hash ----------------------------------------------------------------------------------------------

def mix64(x: pl.Expr) -> pl.Expr:
    """splitmix64 finaliser on UInt64 (wrapping arithmetic), written as Polars expressions."""
    def shr(v: pl.Expr, bits: int) -> pl.Expr:  # Polars has no shift operator; // 2**bits is one on UInt64
        return v // pl.lit(1 << bits, dtype=pl.UInt64)

    x = x.xor(shr(x, 30)) * pl.lit(_M1, dtype=pl.UInt64)
    x = x.xor(shr(x, 27)) * pl.lit(_M2, dtype=pl.UInt64)
    return x.xor(shr(x, 31))


def string_hash64(values: pl.Series) -> pl.Series:
    """Stable 64-bit hash of each string: sum of byte_j * BASE**(n-1-j) mod 2**64, then mixed (nulls stay null)."""
    arr = pc.cast(values.to_arrow(), pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] else np.zeros(0, np.uint8)
    data = data[offsets[0]: offsets[-1]].astype(np.uint64)
    ends = offsets[1:] - offsets[0]
    lengths = np.diff(offsets)
    owner = np.repeat(np.arange(len(arr)), lengths)
    power = ends[owner] - 1 - np.arange(len(data))  # exponent of each byte
    max_len = int(lengths.max()) if len(lengths) else 0
    table = np.ones(max_len + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(1, max_len + 1):
            table[i] = table[i - 1] * np.uint64(_STRING_BASE)
        sums = np.zeros(len(arr), dtype=np.uint64)
        np.add.at(sums, owner, data * table[power])
        sums += lengths.astype(np.uint64)  # the empty string and "\0" must differ
    out = pl.Series(values.name, sums, dtype=pl.UInt64)
    return pl.select(mix64(pl.lit(out)).alias(values.name)).to_series().set(values.is_null(), None)


def shard_of(column: str, dtype: pl.DataType, num_shards: int) -> pl.Expr:
    """Shard id (UInt64 in [0, num_shards)) of each row's user; null for a null user id."""
    col = pl.col(column)
    if dtype.is_integer():
        hashed = mix64(col.cast(pl.Int64).cast(pl.UInt64, wrap_numerical=True))
    elif dtype == pl.String:
        hashed = col.map_batches(string_hash64, return_dtype=pl.UInt64, is_elementwise=True)
    else:
        raise TypeError(f"user ids of type {dtype} cannot be sharded (need integer or string)")
    return hashed % num_shards


# -- per-shard sequences -------------------------------------------------------------------------------------------

@dataclass
class ShardSequences:
    """One shard's users (sorted by id) as a jagged token batch, with counts for the manifest."""

    batch: UserBatch
    users_in: int  # users with at least one row in the window (clean or not)
    users_skipped: int  # users in the window whose rows were all dropped
    events_in: int  # clean events of the shard's users
    events_used: int  # events kept in the sequences (the rest are older than max_seq_len allows)
    events_oov: int  # kept events whose item is not in the checkpoint's vocabulary


class SequenceBuilder:
    """Builds the token sequences of a shard with the checkpoint's encoder and item vocabulary."""

    def __init__(self, checkpoint: Checkpoint, schema: EventSchema, max_seq_len: int | None = None):
        self.checkpoint = checkpoint
        self.schema = schema
        self.layout = checkpoint.layout
        model_max = checkpoint.config.max_seq_len
        if max_seq_len is not None and max_seq_len > model_max:
            raise ConfigError(f"data.max_seq_len={max_seq_len} is invalid: expected at most the checkpoint's "
                              f"max_seq_len {model_max} (or null)")
        self.max_seq_len = max_seq_len or model_max
        self.max_events = self.layout.max_events(self.max_seq_len)
        # A total order on rows: equal timestamps are broken by item id, then by every other field.
        self.sort_keys = ["user_id", "timestamp", "item_id", "watch_duration", "watch_percentage",
                          *schema.flags, *schema.profile]

    def shard_frame(self, frame: pl.LazyFrame, shard: int, num_shards: int) -> pl.LazyFrame:
        """Rows of one shard inside the window (clean and dirty, so skipped users can be counted)."""
        user_type = frame.collect_schema()["user_id"]
        return frame.filter(shard_of("user_id", user_type, num_shards) == shard,
                            pl.col(DROP_REASON).is_null() | (pl.col(DROP_REASON) != OUT_OF_WINDOW))

    def build(self, rows: pl.DataFrame) -> ShardSequences:
        """Sequences of the users in ``rows`` (a collected shard frame, any row order)."""
        users_in = rows["user_id"].drop_nulls().n_unique()
        clean = self.time_order(rows.filter(pl.col(DROP_REASON).is_null()).drop(DROP_REASON))
        n = self.max_events
        kept = clean.filter(pl.int_range(pl.len()).reverse().over("user_id") < n)  # the last n events
        per_user = kept.group_by("user_id", maintain_order=True).agg(
            pl.len().alias("n"), *(pl.col(p).last() for p in self.schema.profile))
        tokens, offsets, oov = self.encode(kept, per_user)
        batch = UserBatch(user_ids=per_user["user_id"].to_arrow(), tokens=tokens, offsets=offsets)
        return ShardSequences(batch, users_in, users_in - per_user.height, clean.height, kept.height, oov)

    def time_order(self, events: pl.DataFrame) -> pl.DataFrame:
        """Rows sorted by ``sort_keys``: a full sort on (user, time, item), then only rows that tie on all three
        are re-sorted by every key (a many-key sort of the whole shard costs ~5x more)."""
        head = self.sort_keys[:3]
        events = events.sort(head)
        same = [pl.all_horizontal(pl.col(k) == pl.col(k).shift(step) for k in head).fill_null(False)
                for step in (1, -1)]
        tied = np.flatnonzero(events.select(same[0] | same[1]).to_series().to_numpy())
        if len(tied) == 0:
            return events
        # Tied rows form runs that already sit in (user, time, item) order, so sorting just them by every
        # key and putting them back into the same positions gives the full sort.
        sub = events[tied].with_columns(pl.Series("_pos", tied)).sort(self.sort_keys, nulls_last=True)
        order = np.arange(events.height)
        order[tied] = sub["_pos"].to_numpy()
        return events[order]

    def encode(self, events: pl.DataFrame, per_user: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
        """Flat, user-sorted events -> (tokens, token offsets, number of OOV items)."""
        return encode_events(events, per_user, self.checkpoint.items, self.layout)


def encode_events(events: pl.DataFrame, per_user: pl.DataFrame, items: ItemVocab,
                  layout: TokenLayout) -> tuple[np.ndarray, np.ndarray, int]:
    """Token sequences of users whose events are flat and in time order, ``per_user["n"]`` events per user
    (profile values in ``per_user`` too): ``(tokens, token offsets, number of OOV items)``. Shared with training."""
    cfg = layout.config
    ev_offsets = np.zeros(per_user.height + 1, dtype=np.int64)
    ev_offsets[1:] = np.cumsum(per_user["n"].to_numpy())
    item_tokens = items.lookup(events["item_id"].to_arrow())
    flags = np.stack([events[f].fill_null(False).to_numpy() for f in cfg.action_flags], axis=1) \
        if cfg.action_flags else np.zeros((events.height, 0), dtype=bool)
    arrays = EventArrays(
        item_tokens=item_tokens,
        flags=flags,
        watch_percentage=events["watch_percentage"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
        watch_duration=events["watch_duration"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
        timestamp=events["timestamp"].to_numpy(),
        offsets=ev_offsets,
    )
    names = [p.name for p in cfg.profile_features]
    profile = per_user.select(names).fill_null(-1).to_numpy() if names else None
    tokens, offsets = layout.encode(arrays, profile)
    return tokens, offsets, int((item_tokens < layout.item_offset).sum())
