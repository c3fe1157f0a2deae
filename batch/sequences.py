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


def in_window() -> pl.Expr:
    """The rows a shard reads: those inside the run window, clean or dirty (so skipped users can be counted)."""
    return pl.col(DROP_REASON).is_null() | (pl.col(DROP_REASON) != OUT_OF_WINDOW)


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
        self.items = checkpoint.items  # not the model: the builder is sent to the reader process
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

    def build(self, rows: pl.DataFrame) -> ShardSequences:
        """Sequences of the users in ``rows`` (a collected shard frame, any row order).

        Works on row numbers: the sort, the last-n cut and the per-user values only move indices, and each column
        the tokens need is gathered once, for the kept events only (NumPy / Polars kernels, no Python per row).
        """
        clean = rows.get_column(DROP_REASON).is_null()
        clean_rows = None if clean.all() else np.flatnonzero(clean.to_numpy())
        order, starts, times = self.row_order(rows, clean_rows)  # clean rows in time order, users' first rows
        ends = np.append(starts[1:], len(order)).astype(np.int64) if len(starts) else starts
        lo = np.maximum(starts, ends - self.max_events)  # the last n events of each user: order[lo:end]
        has_events = ends > lo
        lo, ends = lo[has_events], ends[has_events]
        counts = ends - lo
        if len(counts) == len(starts) and (counts == ends - starts).all():
            kept, kept_times = order, times  # nobody has more than n events
        else:
            cut = np.zeros(len(order) + 1, dtype=np.int8)  # +1 where a user's dropped events begin, -1 after
            np.add.at(cut, starts, 1)
            np.add.at(cut, np.maximum(starts, np.append(starts[1:], len(order)) - self.max_events), -1)
            keep = np.cumsum(cut[:-1], dtype=np.int8) == 0
            kept, kept_times = order[keep], times[keep]
            del cut, keep

        user_ids = _take(rows, "user_id", order[lo])
        users_in = len(starts)
        if clean_rows is not None:  # users whose rows are all dirty still count as users in the window
            dirty_users = rows.get_column("user_id").filter(~clean).drop_nulls()
            if len(dirty_users):
                users_in = pl.concat([_take(rows, "user_id", order[starts]), dirty_users]).n_unique()

        item_tokens = self.items.lookup(_gather_arrow(rows, "item_id", kept))
        last = order[ends - 1]  # the profile comes from each user's last event
        names = [p.name for p in self.layout.config.profile_features]
        profile = np.stack([_take(rows, p, last).fill_null(-1).to_numpy() for p in names], axis=1) \
            if names else None
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        tokens, offsets = self.layout.encode_codes(item_tokens, self.side_codes(rows, kept), kept_times, offsets,
                                                   profile)
        oov = int((item_tokens < self.layout.item_offset).sum())
        batch = UserBatch(user_ids=user_ids.to_arrow(), tokens=tokens, offsets=offsets)
        return ShardSequences(batch, users_in, users_in - len(counts), len(order), len(kept), oov)

    def side_codes(self, rows: pl.DataFrame, kept: np.ndarray) -> np.ndarray:
        """``TokenLayout.side_codes`` of the rows ``kept`` (flags, watch buckets). When most rows are kept, the
        codes of all rows are computed in row order and gathered as one array; else the inputs of the kept rows
        are gathered (four or more arrays, but few rows)."""
        flags = self.layout.config.action_flags
        if 2 * len(kept) >= rows.height:
            def column(name: str, fill, dtype=None) -> np.ndarray:
                values = rows.get_column(name)
                values = values.cast(dtype) if dtype is not None and values.dtype != dtype else values
                return (values.fill_null(fill) if values.null_count() else values).to_numpy()

            all_flags = np.empty((rows.height, len(flags)), dtype=bool)
            for j, f in enumerate(flags):
                all_flags[:, j] = column(f, False)
            codes = self.layout.side_codes(all_flags, column("watch_percentage", np.nan, pl.Float64),
                                           column("watch_duration", np.nan, pl.Float64))
            del all_flags
            return np.take(codes, kept)  # codes are narrow (TokenLayout.code_dtype): few bytes to gather
        kept_flags = np.empty((len(kept), len(flags)), dtype=bool)
        for j, f in enumerate(flags):
            kept_flags[:, j] = _gather(rows.get_column(f), kept, fill=False)
        return self.layout.side_codes(
            kept_flags, _gather(rows.get_column("watch_percentage"), kept, fill=np.nan, dtype=pl.Float64),
            _gather(rows.get_column("watch_duration"), kept, fill=np.nan, dtype=pl.Float64))

    def row_order(self, rows: pl.DataFrame, row_ids: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row numbers ``row_ids`` (default: all; user, timestamp and item must be non-null there) sorted by
        ``sort_keys``, the positions in that order where each user's rows begin, and the rows' timestamps
        (int64) in that order.

        One sort on (user, timestamp) packed with the row number into a single uint64 when the values fit (a
        plain ``np.sort``, several times faster than an argsort or a multi-column sort); then only rows that tie
        on (user, timestamp) are re-sorted by every key and put back into the same positions.
        """
        def keys(name: str) -> tuple[np.ndarray, int, int]:
            col = rows.get_column(name)
            if row_ids is None:
                return _order_key(col)
            if col.dtype.is_integer():  # NumPy's take is much faster than Polars' gather on a many-chunk column
                return _order_key(pl.Series(name, _gather(col, row_ids)))
            return _order_key(_take(rows, name, row_ids))

        user, user_bits, _ = keys("user_id")
        ts, ts_bits, ts_low = keys("timestamp")
        perm, new_user, ts = _sort_pairs(user, user_bits, ts, ts_bits)
        del user
        ids = perm if row_ids is None else row_ids[perm]
        starts = np.flatnonzero(new_user)
        same = np.flatnonzero(~new_user[1:] & (ts[1:] == ts[:-1]))  # position i + 1 ties with i on (user, time)
        del new_user
        if len(same):
            at = np.union1d(same, same + 1)  # the tied positions, a few in most shards
            run = np.cumsum(~np.isin(at - 1, same))  # tied runs (one begins where i does not tie with i - 1)
            sub = rows.select(pl.col(self.sort_keys[2:]).gather(ids[at])).with_columns(  # fast on many chunks
                pl.Series("_run", run), pl.Series("_row", ids[at]))
            ids[at] = sub.sort(["_run", *self.sort_keys[2:]], nulls_last=True)["_row"].to_numpy()
        if rows.schema["timestamp"].is_signed_integer():  # the keys back to the values (no gather)
            ts += np.uint64(ts_low & _MASK64)
            times = ts.view(np.int64)
        else:
            times = _gather(rows.get_column("timestamp"), ids).astype(np.int64)
        return ids, starts, times


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


# -- ordering helpers ----------------------------------------------------------------------------------------------

_PACKED_BITS = 64


def _order_key(values: pl.Series) -> tuple[np.ndarray, int, int]:
    """Non-null values -> (uint64 keys in the same order as Polars sorts the values, bits the keys need, the
    lowest value subtracted: an integer ``v`` has key ``v - low``, computed modulo 2**64)."""
    if values.dtype.is_integer():
        raw = values.to_numpy()
        raw = raw.astype(np.int64 if values.dtype.is_signed_integer() else np.uint64, copy=False)
    else:  # strings (and other sortable types): dense ranks from Polars' own order
        raw = values.rank("dense").to_numpy().astype(np.uint64)
    if len(raw) == 0:
        return raw.view(np.uint64), 0, 0
    low, high = int(raw.min()), int(raw.max())
    key = raw.view(np.uint64)
    # wraps to the right offset (high - low < 2**64); in place when the array is a copy of our own
    key = np.subtract(key, np.uint64(low & _MASK64), out=key if raw.flags.writeable and raw.flags.owndata else None)
    return key, (high - low).bit_length(), low


def _sort_pairs(a: np.ndarray, a_bits: int, b: np.ndarray, b_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort rows by (a, b) (uint64 keys of a_bits and b_bits bits); rows equal on both come in any order.
    Returns (the permutation, a bool per sorted row that is True where ``a`` changes (and at 0), ``b`` in sorted
    order).

    Packs the keys and the row number into one uint64 and sorts that (``np.sort``: SIMD, no argsort; the sorted
    keys come out of the packed values, no gather). When the three do not fit, rows are first grouped by ``a``
    (a, row number), then, only if ``b`` is out of order inside some group, sorted by (group number, b, row
    number): the group number (a dense rank of ``a``) needs far fewer bits than ``a`` (e.g. 13 for 7,500 users
    with 40-bit ids), and the groups keep their positions. If even that does not fit, by (group, b, position in
    the group), fewer bits still; a multi-column argsort is the last resort.
    """
    n = len(a)
    index_bits = _bits(n)
    b_in_order = n < 2 or bool((b[1:] >= b[:-1]).all())
    if a_bits + (0 if b_in_order else b_bits) + index_bits <= _PACKED_BITS:
        if b_in_order:  # e.g. a log written in time order: the row number keeps that order
            packed = _packed_sort([(a, a_bits)], index_bits)
            perm = (packed & _low_mask(index_bits)).view(np.int64)
            return perm, _changes(packed >> np.uint64(index_bits)), b[perm]
        packed = _packed_sort([(a, a_bits), (b, b_bits)], index_bits)
        return ((packed & _low_mask(index_bits)).view(np.int64), _changes(packed >> np.uint64(index_bits + b_bits)),
                (packed >> np.uint64(index_bits)) & _low_mask(b_bits))
    if a_bits > index_bits and a_bits + index_bits > _PACKED_BITS:
        distinct = np.unique(a)  # wide ids (hashes): rank them densely so that they fit after all
        a, a_bits = np.searchsorted(distinct, a).astype(np.uint64), _bits(len(distinct))
    if a_bits + index_bits <= _PACKED_BITS:
        grouped = _packed_sort([(a, a_bits)], index_bits)
        perm = (grouped & _low_mask(index_bits)).view(np.int64)
        grouped >>= np.uint64(index_bits)
        new_group = _changes(grouped)
        del grouped
        b = b[perm]
        if (new_group[1:] | (b[1:] >= b[:-1])).all():  # already in b order inside every group
            return perm, new_group, b
        starts = np.flatnonzero(new_group)
        lengths = np.diff(np.append(starts, n))
        group_bits, within_bits = _bits(len(starts)), _bits(int(lengths.max()))
        group = np.repeat(np.arange(len(starts), dtype=np.uint64), lengths)  # a dense rank of a
        if group_bits + b_bits + index_bits <= _PACKED_BITS:  # one sort by (rank, b, row number)
            packed = _packed_sort([(group, group_bits), (b, b_bits)], index_bits, low=perm.view(np.uint64))
            del group, b, perm
            return (packed & _low_mask(index_bits)).view(np.int64), new_group, \
                (packed >> np.uint64(index_bits)) & _low_mask(b_bits)
        if group_bits + b_bits + within_bits <= _PACKED_BITS:
            within = np.arange(n, dtype=np.uint64)
            within -= np.repeat(starts.astype(np.uint64), lengths)
            packed = _packed_sort([(group, group_bits), (b, b_bits)], within_bits, low=within)
            del group, b
            position = starts[(packed >> np.uint64(b_bits + within_bits)).view(np.int64)]
            position += (packed & _low_mask(within_bits)).view(np.int64)
            return perm[position], new_group, (packed >> np.uint64(within_bits)) & _low_mask(b_bits)
        del group
        restored = np.empty_like(b)
        restored[perm] = b  # back to the input order for the fallback
        b = restored
    frame = pl.DataFrame({"a": a, "b": b})
    perm = frame.select(pl.arg_sort_by("a", "b")).to_series().to_numpy().astype(np.int64)
    return perm, _changes(a[perm]), b[perm]


def _changes(values: np.ndarray) -> np.ndarray:
    """True at 0 and wherever ``values[i] != values[i - 1]``."""
    out = np.empty(len(values), dtype=bool)
    out[:1] = True
    np.not_equal(values[1:], values[:-1], out=out[1:])
    return out


def _bits(count: int) -> int:
    """Bits needed for the numbers 0 .. count - 1."""
    return max(count - 1, 0).bit_length()


def _low_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def _packed_sort(fields: list[tuple[np.ndarray, int]], low_bits: int, low: np.ndarray | None = None) -> np.ndarray:
    """Sorted uint64 values ``field_0 | ... | field_k | low`` (most significant first; ``low`` defaults to the
    row number, ``low_bits`` wide)."""
    n = len(fields[0][0])
    packed = np.arange(n, dtype=np.uint64) if low is None else low
    shift = low_bits
    for values, bits in reversed(fields):
        if bits:
            packed |= values << np.uint64(shift)
            shift += bits
    packed.sort()
    return packed


def _gather(values: pl.Series, rows: np.ndarray, fill=None, dtype: pl.DataType | None = None) -> np.ndarray:
    """``values[rows]`` (cast to ``dtype``, nulls replaced by ``fill``) as NumPy. Without ``fill``, ``rows``
    must not be null there (nulls elsewhere become 0 so that integers stay integers)."""
    if dtype is not None and values.dtype != dtype:
        values = values.cast(dtype)
    if values.null_count():  # filling the whole column is cheaper than Polars' gather on a many-chunk column
        values = values.fill_null((False if values.dtype == pl.Boolean else 0) if fill is None else fill)
    return np.take(values.to_numpy(), rows)


def _gather_arrow(frame: pl.DataFrame, column: str, rows: np.ndarray) -> pa.Array:
    """``frame[column][rows]`` as Arrow (non-null there); integers through NumPy, other types through Polars."""
    values = frame.get_column(column)
    if values.dtype.is_integer():
        return pa.array(_gather(values, rows))
    return _take(frame, column, rows).to_arrow()


def _take(frame: pl.DataFrame, column: str, rows: np.ndarray) -> pl.Series:
    """``frame[column][rows]``: a gather expression, much faster than ``Series.gather`` on a many-chunk column."""
    return frame.select(pl.col(column).gather(rows)).to_series()
