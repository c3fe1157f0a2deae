"""Object storage for real: a moto S3 server on 127.0.0.1, written through s3fs and read back with Polars."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from batch.config import OutputConfig, OutputFormat
from batch.output import OutputWriter

DAY = dt.date(2026, 11, 26)
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3() -> Iterator[dict]:
    """A moto S3 server with dummy credentials; yields Polars-style storage options and an s3fs client."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDS.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {"aws_endpoint_url": endpoint, "aws_allow_http": "true", "aws_region": "us-east-1",
                   "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
        try:
            yield {"options": options, "fs": fs, "endpoint": endpoint}
        finally:
            server.stop()


@pytest.fixture
def bucket(s3: dict, request: pytest.FixtureRequest) -> str:
    name = request.node.name.lower().replace("_", "-")[:50]
    s3["fs"].mkdir(name)
    return name


def recs(users: list[int], k: int = 3, seed: int = 0, items: int = 1000) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(users)
    return pa.table({"user_id": pa.array(np.repeat(users, k), pa.int64()),
                     "rank": pa.array(np.tile(np.arange(1, k + 1), n), pa.int16()),
                     "item_id": pa.array(rng.integers(0, items, n * k), pa.int64()),
                     "score": pa.array(rng.random(n * k), pa.float32())})


def out_cfg(root: str, options: dict, fmt: str = "long") -> OutputConfig:
    return OutputConfig(path=root, storage_options=options, top_k=3, format=OutputFormat(fmt))


def read(root: str, options: dict) -> pl.DataFrame:
    return pl.scan_parquet(f"{root}/", storage_options=options).collect()


def in_flight_uploads(fs: s3fs.S3FileSystem, bucket: str) -> list:
    return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def test_publish_is_the_upload_completion(s3: dict, bucket: str) -> None:
    fs, opts = s3["fs"], s3["options"]
    root = f"s3://{bucket}/recs"
    key = f"{bucket}/recs/dt=2026-11-26/part-0.parquet"
    # 5 MiB parts, so that a ~10 MB file goes up as a real multipart upload
    cfg = out_cfg(root, {**opts, "default_block_size": 5 * 2**20})
    big = recs(list(range(400_000)), items=10**9, seed=1)
    with OutputWriter(cfg, DAY, "v1", "h") as w:
        w.write_shard(big)
        w.write_shard(recs([10**7], seed=2))
        fs.invalidate_cache()
        assert len(in_flight_uploads(fs, bucket)) == 1  # parts are uploaded ...
        assert not fs.exists(key)  # ... but the object does not exist yet
        manifest = w.publish({"rows_out": big.num_rows + 3})
    fs.invalidate_cache()
    assert fs.info(key)["size"] > 5 * 2**20 and in_flight_uploads(fs, bucket) == []
    df = read(root, opts)
    assert df.height == big.num_rows + 3 and df["dt"].unique().to_list() == [DAY]
    assert fs.ls(f"{bucket}/recs/dt=2026-11-26") == [key]
    stored = json.loads(fs.cat(f"{bucket}/recs_manifests/dt=2026-11-26/manifest.json"))
    assert stored["rows_out"] == big.num_rows + 3 and stored["published"]["file"] == f"s3://{key}"
    assert manifest["published"]["manifest"] == f"s3://{bucket}/recs_manifests/dt=2026-11-26/manifest.json"


def test_failure_keeps_previous_object_and_rerun_replaces(s3: dict, bucket: str) -> None:
    fs, opts = s3["fs"], s3["options"]
    root = f"s3://{bucket}/recs"
    with OutputWriter(out_cfg(root, opts), DAY, "v1", "h") as w:
        w.write_shard(recs([1, 2]))
        w.publish({"run": 1})
    fs.pipe(f"{bucket}/recs/dt=2026-11-26/part-00007-from-spark.parquet", b"stale")
    fs.invalidate_cache()
    manifest_key = f"{bucket}/recs_manifests/dt=2026-11-26/manifest.json"
    with pytest.raises(RuntimeError):
        with OutputWriter(out_cfg(root, opts), DAY, "v2", "h") as w:
            w.write_shard(recs([5, 6, 7]))
            raise RuntimeError("scoring failed")
    fs.invalidate_cache()
    assert in_flight_uploads(fs, bucket) == []  # the multipart upload was aborted
    assert json.loads(fs.cat(manifest_key))["run"] == 1
    first = pl.read_parquet(f"s3://{bucket}/recs/dt=2026-11-26/part-0.parquet", storage_options=opts)
    assert sorted(first["user_id"].unique()) == [1, 2] and (first["model_version"] == "v1").all()

    with OutputWriter(out_cfg(root, opts, fmt="nested"), DAY, "v2", "h") as w:
        w.write_shard(recs([5, 6, 7]))
        w.publish({"run": 2})
    fs.invalidate_cache()
    assert fs.ls(f"{bucket}/recs/dt=2026-11-26") == [f"{bucket}/recs/dt=2026-11-26/part-0.parquet"]
    df = read(root, opts)
    assert sorted(df["user_id"]) == [5, 6, 7] and df["recs"].list.len().to_list() == [3, 3, 3]
    assert json.loads(fs.cat(manifest_key))["run"] == 2


def test_bucket_root_is_rejected(s3: dict) -> None:
    with pytest.raises(ValueError, match="prefix inside the bucket"):
        OutputWriter(out_cfg("s3://some-bucket", s3["options"]), DAY, "v1", "h")


def test_publish_aborts_uploads_left_by_killed_runs(s3: dict, bucket: str) -> None:
    fs, opts = s3["fs"], s3["options"]
    key = "recs/dt=2026-11-26/part-0.parquet"
    fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)  # what a SIGKILLed run leaves behind
    fs.call_s3("create_multipart_upload", Bucket=bucket, Key="recs/dt=2026-11-25/part-0.parquet")
    with OutputWriter(out_cfg(f"s3://{bucket}/recs", opts), DAY, "v1", "h") as w:
        w.write_shard(recs([1]))
        w.publish({})
    assert [u["Key"] for u in in_flight_uploads(fs, bucket)] == ["recs/dt=2026-11-25/part-0.parquet"]


def test_real_job_reads_from_and_publishes_to_s3(s3: dict, bucket: str, tmp_path) -> None:
    """`python -m batch.run` with data.path and output.path on s3://, the same code path users get."""
    from tests._sample_job import SAMPLE_EVENTS, run_job, sample_checkpoint

    fs = s3["fs"]
    fs.put(str(SAMPLE_EVENTS), f"{bucket}/logs/events", recursive=True)
    assert len(fs.find(f"{bucket}/logs/events")) == len(list(SAMPLE_EVENTS.rglob("*.parquet")))
    ckpt, logs = sample_checkpoint(tmp_path), tmp_path / "logs"
    # endpoint and region in storage_options, dummy credentials from the environment (CREDS)
    opts = f"{{aws_endpoint_url: '{s3['endpoint']}', aws_allow_http: 'true', aws_region: us-east-1}}"
    run_job(ckpt, logs, f"data.path=s3://{bucket}/logs/events", f"data.storage_options={opts}",
            f"output.path=s3://{bucket}/recs", f"output.storage_options={opts}", "data.num_shards=2", **CREDS)

    got = pl.scan_parquet(f"s3://{bucket}/recs/", storage_options=s3["options"]).collect()
    fs.invalidate_cache()
    assert fs.find(f"{bucket}/recs") == [f"{bucket}/recs/dt=2026-11-27/part-0.parquet"]
    manifest = json.loads(fs.cat(f"{bucket}/recs_manifests/dt=2026-11-27/manifest.json"))
    assert manifest["input"]["path"] == f"s3://{bucket}/logs/events" and manifest["input"]["files_read"] > 0
    assert manifest["published"]["file"] == f"s3://{bucket}/recs/dt=2026-11-27/part-0.parquet"
    assert got["dt"].unique().to_list() == [dt.date(2026, 11, 27)] and got.height == manifest["output"]["rows"]

    run_job(ckpt, logs, f"output.path={tmp_path / 'recs'}", "data.num_shards=2")  # the same run, all local
    local = pl.read_parquet(tmp_path / "recs")
    cols = ["user_id", "rank", "item_id"]
    assert got.select(cols).sort(cols).equals(local.select(cols).sort(cols))
