"""OutputWriter: layout, schema, the four analyst readers, atomic publish and rerun semantics (local FS)."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from batch.config import OutputConfig, OutputFormat
from batch.output import OutputWriter, fsspec_options, manifest_json

DAY = dt.date(2026, 11, 26)
K = 3


def shard(users: list, id_type: str, k: int = K, seed: int = 0) -> pa.Table:
    """Top-k rows of ``users`` in engine order (per user, rank 1..k), ids as int64 or string."""
    rng = np.random.default_rng(seed)
    n = len(users)
    user = np.repeat(users, k)
    item = rng.integers(0, 1000, n * k)
    score = np.sort(rng.random((n, k)), axis=1)[:, ::-1].ravel()
    if id_type == "str":
        user, item = pa.array([f"u{u}" for u in user], pa.string()), pa.array([f"v{i}" for i in item], pa.string())
    else:
        user, item = pa.array(user, pa.int64()), pa.array(item, pa.int64())
    return pa.table({"user_id": user, "rank": np.tile(np.arange(1, k + 1), n).astype(np.int16),
                     "item_id": item, "score": score.astype(np.float32)})


def cfg(root: Path, fmt: str = "long") -> OutputConfig:
    return OutputConfig(path=str(root), top_k=K, format=OutputFormat(fmt))


def write(root: Path, shards: list[pa.Table], fmt: str = "long", day: dt.date = DAY, version: str = "v1") -> dict:
    with OutputWriter(cfg(root, fmt), day, version, "hash123") as w:
        for t in shards:
            w.write_shard(t)
        return w.publish({"rows_in": 123, "timings": {"score": 1.5}, "n": np.int64(7)})


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.mark.parametrize("id_type", ["int", "str"])
@pytest.mark.parametrize("fmt", ["long", "nested"])
def test_four_readers(tmp_path: Path, fmt: str, id_type: str) -> None:
    root = tmp_path / "recs"
    shards = [shard([3, 1, 2], id_type, seed=1), shard([10, 11], id_type, seed=2)]
    expected = pl.from_arrow(pa.concat_tables(shards)).sort("user_id", "rank")
    write(root, shards, fmt)
    write(root, [shard([5], id_type)], fmt, day=DAY - dt.timedelta(days=1))  # a second date partition

    id_pl = pl.Int64 if id_type == "int" else pl.String
    today = pl.col("dt") == DAY
    # Polars, directory scan (the manifest tree and the staging dir are siblings, so they do not interfere).
    lf = pl.scan_parquet(root)
    assert lf.collect_schema()["dt"] == pl.Date
    assert lf.collect_schema()["user_id"] == id_pl
    got = lf.filter(today).collect()
    if fmt == "nested":
        assert got.height == 5 and got["recs"].list.len().to_list() == [K] * 5
        got = got.explode("recs").unnest("recs")
    assert got.schema["rank"] == pl.Int16 and got.schema["score"] == pl.Float32
    assert got.schema["run_date"] == pl.Date and got.schema["model_version"] == pl.String
    assert (got["run_date"] == DAY).all() and (got["model_version"] == "v1").all()
    assert got.sort("user_id", "rank").select(expected.columns).equals(expected)
    assert pl.scan_parquet(root).select(pl.len()).collect().item() == (18 if fmt == "long" else 6)

    # pandas (pyarrow engine, hive partition inferred from the directory names)
    pdf = pd.read_parquet(root)
    pdf = pdf[pdf["dt"].astype(str) == DAY.isoformat()]
    assert len(pdf) == (15 if fmt == "long" else 5)
    if fmt == "nested":
        assert {tuple(sorted(r)) for r in pdf["recs"].iloc[0]} == {("item_id", "rank", "score")}

    # pyarrow.dataset
    table = ds.dataset(root, partitioning="hive").to_table(filter=ds.field("dt") == DAY.isoformat())
    assert table.num_rows == (15 if fmt == "long" else 5)
    assert pa.types.is_int64(table.schema.field("user_id").type) == (id_type == "int")

    # DuckDB, recursive glob with hive partitioning
    q = f"read_parquet('{root}/**/*.parquet', hive_partitioning=true)"
    n_today = duckdb.execute(f"select count(*) from {q} where dt = DATE '{DAY}'").fetchone()[0]
    assert n_today == (15 if fmt == "long" else 5)
    if fmt == "nested":
        top1 = duckdb.execute(f"select count(*) from (select unnest(recs) as r from {q}) where r.rank = 1").fetchone()
        assert top1[0] == 6
    else:
        assert duckdb.execute(f"select count(*) from {q} where rank = 1").fetchone()[0] == 6


def test_layout_metadata_and_manifest(tmp_path: Path) -> None:
    root = tmp_path / "recs"
    result = write(root, [shard([1, 2], "int"), shard([3], "int")])
    assert files_under(root) == ["dt=2026-11-26/part-0.parquet"]
    assert not (tmp_path / ".recs.staging").exists()
    manifest_path = tmp_path / "recs_manifests" / "dt=2026-11-26" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest == json.loads(manifest_json(result))
    assert manifest["rows_in"] == 123 and manifest["n"] == 7
    pub = manifest["published"]
    assert (pub["rows"], pub["users"], pub["shards"], pub["format"]) == (9, 3, 2, "long")
    assert pub["file"] == str(root / "dt=2026-11-26" / "part-0.parquet")

    meta = pq.read_metadata(root / "dt=2026-11-26" / "part-0.parquet")
    kv = {k.decode(): v.decode() for k, v in meta.metadata.items()}
    assert kv["mtgr.model_version"] == "v1" and kv["mtgr.checkpoint_hash"] == "hash123"
    assert kv["mtgr.run_date"] == "2026-11-26" and kv["mtgr.top_k"] == str(K)
    assert json.loads(kv["mtgr.manifest"])["timings"] == {"score": 1.5}
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert meta.num_row_groups == 2  # each shard streamed out as its own row group, nothing accumulated


def test_rerun_replaces_and_removes_stale_files(tmp_path: Path) -> None:
    root = tmp_path / "recs"
    write(root, [shard([1, 2, 3], "int")])
    stale = root / "dt=2026-11-26" / "part-00001-old-writer.parquet"
    pq.write_table(shard([99], "int"), stale)
    result = write(root, [shard([7], "int", seed=5)], version="v2")
    df = pl.read_parquet(root)
    assert df["user_id"].unique().to_list() == [7] and (df["model_version"] == "v2").all()
    assert not stale.exists() and result["published"]["stale_files_removed"] == [str(stale)]
    # a rerun may even switch the format: the partition is replaced, not appended to
    write(root, [shard([8], "int")], fmt="nested")
    assert pl.read_parquet(root).columns[:2] == ["user_id", "recs"]


def test_exception_keeps_previous_output(tmp_path: Path) -> None:
    root = tmp_path / "recs"
    write(root, [shard([1, 2], "int")])
    before = (root / "dt=2026-11-26" / "part-0.parquet").read_bytes()
    manifest = (tmp_path / "recs_manifests" / "dt=2026-11-26" / "manifest.json").read_text()
    with pytest.raises(RuntimeError, match="engine exploded"):
        with OutputWriter(cfg(root), DAY, "v2", "h") as w:
            w.write_shard(shard([5, 6], "int"))
            staged = files_under(tmp_path / ".recs.staging")
            assert len(staged) == 1 and staged[0].endswith("dt=2026-11-26/part-0.parquet")
            assert files_under(root) == ["dt=2026-11-26/part-0.parquet"]  # nothing new inside the root
            raise RuntimeError("engine exploded")
    assert (root / "dt=2026-11-26" / "part-0.parquet").read_bytes() == before
    assert (tmp_path / "recs_manifests" / "dt=2026-11-26" / "manifest.json").read_text() == manifest
    assert not (tmp_path / ".recs.staging").exists()


def test_no_publish_and_first_run_failure_leave_nothing(tmp_path: Path, caplog) -> None:
    root = tmp_path / "recs"
    with OutputWriter(cfg(root), DAY, "v1", "h") as w:
        w.write_shard(shard([1], "int"))
    assert "without publish" in caplog.text
    with pytest.raises(KeyError):
        with OutputWriter(cfg(root), DAY, "v1", "h") as w:
            w.write_shard(shard([1], "int"))
            raise KeyError("boom")
    assert files_under(root) == [] and not (tmp_path / "recs_manifests").exists()
    assert os.listdir(tmp_path) == ["recs"]  # no staging left behind either


def test_bad_shard_is_rejected_and_nothing_published(tmp_path: Path) -> None:
    root = tmp_path / "recs"
    with pytest.raises(ValueError, match="lacks column"):
        with OutputWriter(cfg(root), DAY, "v1", "h") as w:
            w.write_shard(shard([1], "int").drop_columns(["score"]))
    assert files_under(root) == []


def test_empty_run_publishes_empty_partition(tmp_path: Path) -> None:
    root = tmp_path / "recs"
    write(root, [shard([1, 2], "str")])
    write(root, [shard([], "str")])  # an empty but typed shard keeps the id types
    df = pl.read_parquet(root)
    assert df.height == 0 and df.schema["user_id"] == pl.String
    write(root, [], fmt="nested")
    assert pl.read_parquet(root).height == 0


def test_large_string_input_and_url_path(tmp_path: Path) -> None:
    root = tmp_path / "recs"
    t = pl.from_arrow(shard([1, 2], "str")).to_arrow()  # Polars hands out large_string
    assert pa.types.is_large_string(t.schema.field("user_id").type)
    with OutputWriter(replace(cfg(root), path=f"file://{root}/"), "2026-11-26", "v1", "h") as w:
        w.write_shard(t)
        w.publish({})
    assert pq.read_schema(root / "dt=2026-11-26" / "part-0.parquet").field("user_id").type == pa.string()


def test_storage_options_translation() -> None:
    polars_style = {"aws_endpoint_url": "http://127.0.0.1:9", "aws_allow_http": "true", "aws_region": "eu-west-1",
                    "aws_access_key_id": "k", "aws_secret_access_key": "s"}
    assert fsspec_options("s3", polars_style) == {
        "key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}}
    native = {"key": "k", "client_kwargs": {"endpoint_url": "http://x"}}
    assert fsspec_options("s3", native) == native
    assert fsspec_options("gs", {"token": "anon"}) == {"token": "anon"}


@pytest.mark.parametrize("bad_rank", [0, K + 1])
def test_rank_outside_top_k_is_rejected(tmp_path: Path, bad_rank: int) -> None:
    t = shard([1, 2], "int")
    t = t.set_column(1, "rank", pa.array([bad_rank] + t["rank"].to_pylist()[1:], pa.int16()))
    with pytest.raises(ValueError, match="rank must be in 1..3"):
        with OutputWriter(cfg(tmp_path / "recs"), DAY, "v1", "h") as w:
            w.write_shard(t)
    assert files_under(tmp_path / "recs") == []


def test_concurrent_readers_get_one_complete_run_or_an_error(tmp_path: Path) -> None:
    """Readers scanning the root in a loop while reruns publish the same date never get a partial or mixed result.

    A query that straddles a publish may fail instead: Polars and DuckDB read a file's footer and its pages in
    separate opens of the same path, and the path now names the new file. Observed as ComputeError / a Rust
    panic in Polars and "bytes outside file" in DuckDB, a few times per hundred reads; pyarrow.dataset keeps one
    open file and did not fail. Retrying the query reads the new run.
    """
    import threading

    root = tmp_path / "recs"
    sizes = {"v0": 400, "v1": 1500, "v2": 200, "v3": 900, "v4": 50}
    write(root, [shard(list(range(sizes["v0"])), "int")], version="v0")
    seen, errors, stop = [], [], threading.Event()

    def read_loop(name, reader) -> None:
        while not stop.is_set():
            try:
                seen.append((name, reader()))
            except BaseException as e:  # Polars may even panic (PanicException is a BaseException)
                errors.append((name, repr(e)[:120]))

    q = f"select model_version, count(*) from read_parquet('{root}/**/*.parquet') group by all"
    readers = {
        "polars": lambda: tuple(pl.scan_parquet(root).group_by("model_version").len().collect().rows()),
        "duckdb": lambda: tuple(duckdb.connect().execute(q).fetchall()),
        "pyarrow": lambda: tuple((d["values"], d["counts"]) for d in pc.value_counts(
            ds.dataset(root, partitioning="hive").to_table(columns=["model_version"])["model_version"]).to_pylist()),
    }
    threads = [threading.Thread(target=read_loop, args=item) for item in readers.items()]
    for t in threads:
        t.start()
    for version in ("v1", "v2", "v3", "v4"):
        for _ in range(3):
            write(root, [shard(list(range(sizes[version] // 2)), "int"),
                         shard(list(range(sizes[version] // 2, sizes[version])), "int")], version=version)
    stop.set()
    for t in threads:
        t.join()
    assert len(seen) > 10 and len(errors) < len(seen), errors[:5]
    for name, observed in seen:  # exactly one run, with all of its rows
        assert len(observed) == 1 and observed[0][1] == sizes[observed[0][0]] * K, (name, observed)
