"""Read the behaviour log: find the files, check their schemas, scan them lazily and mark dirty rows.

The result is one Polars LazyFrame with the model's field names (``user_id, item_id, timestamp`` as epoch
seconds, ``watch_duration, watch_percentage`` as float, the checkpoint's action flags and profile features) and a
``drop_reason`` column: null for a clean row, else the first reason the row cannot be used. Nothing is dropped
silently: :func:`count_rows` tallies rows by reason and :mod:`batch.sequences` filters on the column.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from batch.errors import ConfigError, InputError
from batch.model import Checkpoint
from batch.output import fsspec_options

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
DROP_REASON = "drop_reason"
OUT_OF_WINDOW = "timestamp_out_of_window"
_DT_PART = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


@dataclass(frozen=True)
class EventSchema:
    """The input columns one run reads: model field -> input column, and the type each field needs."""

    columns: dict[str, str]  # model field -> input column, in read order
    flags: tuple[str, ...]  # action-flag fields (bool)
    profile: tuple[str, ...]  # profile-feature fields (int)
    item_is_string: bool  # the checkpoint's item ids are strings (else integers)

    @classmethod
    def for_checkpoint(cls, columns: dict[str, str], ckpt: Checkpoint) -> "EventSchema":
        """Fields ``ckpt`` needs; each reads its configured column (profile features default to their name)."""
        flags = list(ckpt.config.action_flags)
        profile = [p.name for p in ckpt.config.profile_features]
        fields = ["user_id", "item_id", "timestamp", "watch_duration", "watch_percentage", *flags, *profile]
        unused = sorted(set(columns) - set(fields) - {"session_id"})
        if unused:
            log.info("data.columns entries not used by this checkpoint: %s", unused)
        mapping = {f: columns.get(f) or f for f in fields}
        t = ckpt.items.item_ids.type
        return cls(mapping, tuple(flags), tuple(profile), pa.types.is_string(t) or pa.types.is_large_string(t))

    def expected(self, fieldname: str) -> str:
        """Human description of the types allowed for a field."""
        if fieldname == "user_id":
            return "integer or string"
        if fieldname == "item_id":
            return "string (the checkpoint's item ids are strings)" if self.item_is_string else \
                "integer (the checkpoint's item ids are integers)"
        if fieldname == "timestamp":
            return "timestamp or integer epoch seconds"
        if fieldname in ("watch_duration", "watch_percentage"):
            return "float or integer"
        return "boolean" if fieldname in self.flags else "integer"

    def accepts(self, fieldname: str, t: pa.DataType) -> bool:
        """Whether an input column of Arrow type ``t`` can feed ``fieldname``."""
        is_str = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
        if fieldname == "user_id":
            return pa.types.is_integer(t) or is_str
        if fieldname == "item_id":
            return is_str if self.item_is_string else pa.types.is_integer(t)
        if fieldname == "timestamp":
            return pa.types.is_timestamp(t) or pa.types.is_integer(t)
        if fieldname in ("watch_duration", "watch_percentage"):
            return pa.types.is_floating(t) or pa.types.is_integer(t)
        if fieldname in self.flags:
            return pa.types.is_boolean(t)
        return pa.types.is_integer(t)

    def check(self, schema: pa.Schema, where: str) -> None:
        """Raise InputError naming ``where`` and the column if a needed column is missing or mistyped."""
        for fieldname, column in self.columns.items():
            idx = schema.get_field_index(column)
            if idx < 0:
                raise InputError(f"{where}: missing column {column!r} (model field {fieldname}; "
                                 f"map it with data.columns.{fieldname}=<column>)")
            t = schema.field(idx).type
            if not self.accepts(fieldname, t):
                raise InputError(f"{where}: column {column!r} has type {t}, expected {self.expected(fieldname)}")


@dataclass
class EventSource:
    """The run's input: the files read (after partition pruning) and the normalised lazy frame."""

    files: list[str]  # as given to Polars (local paths or URLs)
    files_pruned: int
    frame: pl.LazyFrame
    window: tuple[dt.date, dt.date] | None
    columns: list[str] = field(default_factory=list)  # input columns read
    storage_options: dict[str, Any] | None = None

    def collect(self, lf: pl.LazyFrame) -> pl.DataFrame:
        """``lf.collect()``; a file that fails mid-read (e.g. a corrupt page) becomes an InputError naming it."""
        try:
            return lf.collect()
        except (pl.exceptions.ComputeError, OSError) as e:
            raise InputError(self._explain(e)) from None

    def _explain(self, error: Exception) -> str:
        for path in self.files:  # the failure path only: find the culprit by reading file by file
            try:
                pl.scan_parquet(path, storage_options=self.storage_options).select(self.columns).collect()
            except (pl.exceptions.ComputeError, OSError) as e:
                return f"{path}: cannot be read: {str(e).splitlines()[0]}"
        return f"reading the input failed: {str(error).splitlines()[0]}"


# -- finding files -------------------------------------------------------------------------------------------------

def list_files(path: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Parquet files under ``path`` (file, directory, glob or Hive tree; local or URL), sorted.

    Paths with a component starting with ``_`` or ``.`` below the given root (``_SUCCESS``, staging dirs) and,
    for directories, files without a Parquet suffix are skipped.
    """
    protocol = fsspec.utils.get_protocol(path)
    try:
        fs, root = fsspec.core.url_to_fs(path, **fsspec_options(protocol, storage_options))
    except ImportError as e:
        raise InputError(f"data.path {path!r}: no filesystem for {protocol}:// ({e})") from None
    try:
        if fs.isfile(root) and not fsspec.core.has_magic(root):
            return fs, [root]
        if fsspec.core.has_magic(root):
            base = re.split(r"[*?\[]", root, maxsplit=1)[0].rsplit("/", 1)[0]
            found = [p for p in fs.glob(root) if not fs.isdir(p)]
        elif fs.isdir(root):
            base = root.rstrip("/")
            found = [p for p in fs.find(root) if p.endswith(PARQUET_SUFFIXES)]
        else:
            raise InputError(f"data.path {path!r} does not exist")
    except (FileNotFoundError, PermissionError, OSError) as e:
        raise InputError(f"data.path {path!r} cannot be listed: {e}") from None
    files = sorted(p for p in found if not _hidden(p[len(base):]))
    return fs, files


def prune_partitions(files: list[str], start: dt.date, end: dt.date) -> list[str]:
    """Drop files whose Hive ``dt=YYYY-MM-DD`` partition lies outside ``[start, end)``; others are kept."""
    def in_window(path: str) -> bool:
        for part in path.split("/"):
            m = _DT_PART.match(part)
            if m:
                try:
                    return start <= dt.date.fromisoformat(m.group(1)) < end
                except ValueError:  # not a real date: keep the file, the timestamp filter decides
                    return True
        return True

    return [p for p in files if in_window(p)]


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


# -- schema checks -------------------------------------------------------------------------------------------------

def file_schema(fs: fsspec.AbstractFileSystem, path: str) -> pa.Schema:
    """Arrow schema from a Parquet footer (reads only the footer); InputError naming a corrupt file."""
    try:
        with fs.open(path, "rb") as f:
            return pq.read_schema(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{_display(fs, path)}: not a readable Parquet file ({e})") from None


def check_files(fs: fsspec.AbstractFileSystem, files: list[str], schema: EventSchema) -> None:
    """Check every file's footer schema; all files must give each needed column the same type."""
    with ThreadPoolExecutor(max_workers=1 if isinstance(fs, LocalFileSystem) else 16) as pool:
        schemas = list(pool.map(lambda p: file_schema(fs, p), files))
    first: dict[str, tuple[pa.DataType, str]] = {}
    for path, s in zip(files, schemas):
        schema.check(s, _display(fs, path))
        for column in schema.columns.values():
            t = s.field(column).type
            t0, p0 = first.setdefault(column, (t, path))
            if t != t0:
                raise InputError(f"column {column!r} is {t} in {_display(fs, path)} but {t0} in "
                                 f"{_display(fs, p0)}; all input files must agree")


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


# -- the lazy frame ------------------------------------------------------------------------------------------------

def scan_events(path: str, schema: EventSchema, *, storage_options: dict[str, Any] | None = None,
                window: tuple[dt.date, dt.date] | None = None, sql_filter: str | None = None) -> EventSource:
    """List, prune and check the input files, then scan them lazily into the normalised frame."""
    fs, files = list_files(path, storage_options)
    if not files:
        raise InputError(f"data.path {path!r}: no Parquet files found")
    kept = prune_partitions(files, *window) if window else files
    if not kept:
        raise InputError(f"data.path {path!r}: none of its {len(files)} files has a dt= partition in the run "
                         f"window [{window[0]}, {window[1]}) (check data.run_date and data.lookback_days)")
    check_files(fs, kept, schema)
    sources = kept if isinstance(fs, LocalFileSystem) else [fs.unstrip_protocol(p) for p in kept]
    options = None if isinstance(fs, LocalFileSystem) else (storage_options or None)
    lf = pl.scan_parquet(sources, hive_partitioning=True, extra_columns="ignore", storage_options=options)
    return EventSource(sources, len(files) - len(kept), normalize(lf, schema, window, sql_filter), window,
                       sorted(set(schema.columns.values())), options)


def normalize(lf: pl.LazyFrame, schema: EventSchema, window: tuple[dt.date, dt.date] | None = None,
              sql_filter: str | None = None) -> pl.LazyFrame:
    """Input columns -> model fields with uniform types, plus the ``drop_reason`` column."""
    if sql_filter:
        lf = lf.filter(pl.sql_expr(sql_filter))
        try:
            lf.collect_schema()
        except pl.exceptions.PolarsError as e:
            message = str(e).splitlines()[0]
            raise ConfigError(f"data.filter={sql_filter!r} cannot be applied to the input: {message}") from None
    c = schema.columns
    ts = pl.col(c["timestamp"])
    ts_type = lf.collect_schema()[c["timestamp"]]
    ts = ts.dt.epoch("s") if isinstance(ts_type, pl.Datetime) else ts.cast(pl.Int64)
    item_type = pl.String if schema.item_is_string else pl.Int64
    lf = lf.select(
        pl.col(c["user_id"]).alias("user_id"),
        pl.col(c["item_id"]).cast(item_type).alias("item_id"),
        ts.alias("timestamp"),
        pl.col(c["watch_duration"]).cast(pl.Float64).alias("watch_duration"),
        pl.col(c["watch_percentage"]).cast(pl.Float64).alias("watch_percentage"),
        *(pl.col(c[f]).alias(f) for f in schema.flags),
        *(pl.col(c[f]).cast(pl.Int64).alias(f) for f in schema.profile),
    )
    return lf.with_columns(drop_reason(window).alias(DROP_REASON))


def drop_reason(window: tuple[dt.date, dt.date] | None) -> pl.Expr:
    """The first reason a normalised row is unusable, or null for a clean row."""
    pct, dur, ts = pl.col("watch_percentage"), pl.col("watch_duration"), pl.col("timestamp")
    rules = [
        (pl.col("user_id").is_null(), "null_user_id"),
        (pl.col("item_id").is_null(), "null_item_id"),
        (ts.is_null(), "null_timestamp"),
    ]
    if window:
        start, end = (_epoch(d) for d in window)
        rules.append(((ts < start) | (ts >= end), OUT_OF_WINDOW))
    rules += [
        (dur.is_not_nan() & (dur < 0), "negative_watch_duration"),
        (pct.is_not_nan() & ((pct < 0) | (pct > 1)), "watch_percentage_out_of_range"),
    ]
    expr = pl.when(rules[0][0]).then(pl.lit(rules[0][1]))
    for cond, reason in rules[1:]:
        expr = expr.when(cond).then(pl.lit(reason))
    return expr.otherwise(pl.lit(None, dtype=pl.String))


def has_clean_rows(source: EventSource) -> bool:
    """Whether any row survives cleaning. Stops at the first such row (in the first row group read, as a rule);
    reads everything only when none does."""
    first = source.collect(source.frame.filter(pl.col(DROP_REASON).is_null()).select(DROP_REASON).head(1))
    return first.height > 0


def count_rows(source: EventSource | pl.LazyFrame, item_ids: pa.Array) -> dict[str, Any]:
    """One streaming pass: rows read, rows dropped by reason, clean rows and clean rows with unknown items."""
    frame = source.frame if isinstance(source, EventSource) else source
    known = pl.Series("known", item_ids)
    query = frame.group_by(DROP_REASON).agg(
        pl.len().alias("rows"), (~pl.col("item_id").is_in(known.implode())).sum().alias("unknown"))
    counts = source.collect(query) if isinstance(source, EventSource) else query.collect()
    dropped = {r: int(n) for r, n in zip(counts[DROP_REASON], counts["rows"]) if r is not None}
    clean = counts.filter(pl.col(DROP_REASON).is_null())
    return {
        "rows_read": int(counts["rows"].sum()),
        "rows_dropped": dict(sorted(dropped.items())),
        "rows_clean": int(clean["rows"].sum()),
        "rows_unknown_item": int(clean["unknown"].sum()),
    }


def _epoch(d: dt.date) -> int:
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp())
