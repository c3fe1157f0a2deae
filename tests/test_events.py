"""The data stage: finding files, per-file schema checks, partition pruning and counted dirty rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from batch.errors import InputError
from batch.events import count_rows, has_clean_rows, list_files, normalize, prune_partitions, scan_events

from conftest import RUN_DATE, make_events, write_hive

WINDOW = (RUN_DATE - dt.timedelta(days=7), RUN_DATE)


def scan(path, schema, **kw):
    return scan_events(str(path), schema, window=kw.pop("window", WINDOW), **kw)


def test_reads_file_directory_glob_hive_tree_and_file_url(events_dir, schema, checkpoint):
    single = next(events_dir.rglob("*.parquet"))
    expected = pl.read_parquet(events_dir).height
    for path, rows in [(events_dir, expected), (f"{events_dir}/dt=*/*.parquet", expected),
                       (f"file://{events_dir}", expected), (single, pl.read_parquet(single).height)]:
        source = scan(path, schema)
        assert count_rows(source.frame, checkpoint.items.item_ids)["rows_read"] == rows, path


def test_skips_hidden_and_underscore_paths(events_dir):
    (events_dir / "_SUCCESS").write_text("")
    staging = events_dir / "_staging" / "dt=2026-11-26"
    staging.mkdir(parents=True)
    (staging / "part-0.parquet").write_bytes(b"not parquet")
    (events_dir / ".tmp-part.parquet").write_bytes(b"not parquet")
    _, files = list_files(str(events_dir))
    assert len(files) == 3 and all("_staging" not in f and "/." not in f for f in files)


def test_partition_pruning_keeps_window_days_only(events_dir, schema):
    files = list_files(str(events_dir))[1]
    kept = prune_partitions(files, dt.date(2026, 11, 25), dt.date(2026, 11, 26))
    assert [Path(f).parent.name for f in kept] == ["dt=2026-11-25"]
    odd = ["root/dt=2026-02-30/a.parquet", "root/day=1/b.parquet"]  # not a date / not dt=: kept
    assert prune_partitions(odd, dt.date(2026, 11, 25), dt.date(2026, 11, 26)) == odd
    source = scan(events_dir, schema, window=(dt.date(2026, 11, 25), RUN_DATE))
    assert len(source.files) == 2 and source.files_pruned == 1


def test_window_outside_every_partition_fails_clearly(events_dir, schema):
    with pytest.raises(InputError, match="run window"):
        scan(events_dir, schema, window=(dt.date(2020, 1, 1), dt.date(2020, 1, 2)))


def test_missing_path_and_empty_directory_fail_clearly(tmp_path, schema):
    with pytest.raises(InputError, match="does not exist"):
        scan(tmp_path / "nope", schema)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet files"):
        scan(tmp_path / "empty", schema)


def test_missing_column_names_file_and_column(tmp_path, schema, events_frame):
    root = write_hive(events_frame, tmp_path / "ev")
    bad = root / "dt=2026-11-26" / "part-0.parquet"
    pl.read_parquet(bad).drop("watch_percentage").write_parquet(bad)
    with pytest.raises(InputError, match=r"dt=2026-11-26/part-0\.parquet: missing column 'watch_percentage'"):
        scan(root, schema)


@pytest.mark.parametrize("column, dtype, expected", [
    ("video_id", pl.String, "integer"), ("is_liked", pl.Int8, "boolean"), ("timestamp", pl.String, "timestamp"),
    ("user_id", pl.Float64, "integer or string"), ("age_group", pl.Float32, "integer"),
])
def test_wrong_type_names_file_column_and_expected(tmp_path, schema, events_frame, column, dtype, expected):
    root = write_hive(events_frame, tmp_path / "ev")
    for f in root.rglob("*.parquet"):
        pl.read_parquet(f).with_columns(pl.col(column).cast(dtype)).write_parquet(f)
    with pytest.raises(InputError, match=rf"part-0\.parquet: column '{column}' has type .*expected {expected}"):
        scan(root, schema)


def test_files_that_disagree_on_a_type_are_named(tmp_path, schema, events_frame):
    root = write_hive(events_frame, tmp_path / "ev")
    bad = root / "dt=2026-11-26" / "part-0.parquet"
    pl.read_parquet(bad).with_columns(pl.col("video_id").cast(pl.Int32)).write_parquet(bad)
    with pytest.raises(InputError, match=r"column 'video_id' is int32 in .*dt=2026-11-26.* but int64 in"):
        scan(root, schema)


def test_corrupt_parquet_file_is_named(tmp_path, schema, events_frame):
    root = write_hive(events_frame, tmp_path / "ev")
    (root / "dt=2026-11-25" / "part-1.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(InputError, match=r"dt=2026-11-25/part-1\.parquet: not a readable Parquet file"):
        scan(root, schema)


def test_dirty_rows_are_counted_by_first_reason(schema, checkpoint):
    base = make_events(num_users=3, unknown_items=False).head(9)
    ts = dt.datetime(2026, 11, 26, 12)
    dirty = base.with_columns(
        user_id=pl.Series([None, 2, 3, 1, 2, 3, 1, 2, 3], dtype=pl.Int64),
        video_id=pl.Series([1000, None, 1001, 1002, 1003, 9999, 1004, 1005, 1006], dtype=pl.Int64),
        timestamp=pl.Series([ts, ts, None, ts - dt.timedelta(days=30), ts, ts, ts, ts, ts]),
        watch_duration=pl.Series([1.0, 1, 1, 1, -5.0, 1, 1, None, float("nan")]),
        watch_percentage=pl.Series([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.5, -0.1, float("nan")]),
    )
    counts = count_rows(normalize(dirty.lazy(), schema, WINDOW), checkpoint.items.item_ids)
    assert counts["rows_read"] == 9
    assert counts["rows_dropped"] == {"null_user_id": 1, "null_item_id": 1, "null_timestamp": 1,
                                      "timestamp_out_of_window": 1, "negative_watch_duration": 1,
                                      "watch_percentage_out_of_range": 2}
    assert counts["rows_clean"] == 2  # video 9999 (unknown) and the NaN/null-feature row are kept
    assert counts["rows_unknown_item"] == 1


def test_has_clean_rows_finds_one_usable_row_in_the_last_file(tmp_path, schema, checkpoint):
    events = make_events(num_users=3, unknown_items=False)
    day = events["timestamp"].dt.date()
    last = day.max()
    dirty = events.with_columns(pl.lit(-1.0).alias("watch_duration"))  # every row: negative_watch_duration
    assert not has_clean_rows(scan(write_hive(dirty, tmp_path / "dirty"), schema))
    one_clean = dirty.with_columns(
        watch_duration=pl.when((day == last) & (pl.int_range(pl.len()) == pl.len() - 1))
        .then(1.0).otherwise(pl.col("watch_duration")))
    source = scan(write_hive(one_clean, tmp_path / "one"), schema)
    assert has_clean_rows(source)
    assert count_rows(source, checkpoint.items.item_ids)["rows_clean"] == 1


def test_sql_filter_and_column_mapping(tmp_path, checkpoint, events_frame):
    from batch.config import DEFAULT_COLUMNS
    from batch.events import EventSchema

    renamed = events_frame.rename({"video_id": "movie", "age_group": "age"})
    root = write_hive(renamed, tmp_path / "ev")
    schema = EventSchema.for_checkpoint({**DEFAULT_COLUMNS, "item_id": "movie", "age_group": "age"}, checkpoint)
    source = scan(root, schema, sql_filter="category != 3 AND dt >= DATE '2026-11-25'")
    got = count_rows(source.frame, checkpoint.items.item_ids)["rows_read"]
    day = renamed["timestamp"].dt.date()
    assert got == renamed.filter((pl.col("category") != 3) & (day >= dt.date(2026, 11, 25))).height


def test_integer_epoch_timestamps_equal_datetimes(schema, events_frame):
    as_int = events_frame.with_columns(pl.col("timestamp").dt.epoch("s"))
    a = normalize(events_frame.lazy(), schema, WINDOW).collect()
    b = normalize(as_int.lazy(), schema, WINDOW).collect()
    assert a.equals(b)


def test_filter_that_cannot_apply_is_a_config_error(events_dir, schema):
    from batch.errors import ConfigError

    with pytest.raises(ConfigError, match="data.filter"):
        scan(events_dir, schema, sql_filter="no_such_column > 3")


def test_file_corrupt_past_its_footer_is_named_when_read(tmp_path, schema, checkpoint):
    root = write_hive(make_events(num_users=200, days=2), tmp_path / "ev")
    bad = root / "dt=2026-11-26" / "part-0.parquet"
    data = bytearray(bad.read_bytes())
    for i in range(8, len(data) // 2):  # the footer (schema) stays intact, the data pages do not
        data[i] ^= 0x5A
    bad.write_bytes(bytes(data))
    source = scan(root, schema)  # footers are fine
    with pytest.raises(InputError, match=r"dt=2026-11-26/part-0\.parquet: cannot be read"):
        count_rows(source, checkpoint.items.item_ids)
