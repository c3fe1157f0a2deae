"""Write top-K recommendations as one Parquet file per run date and publish it atomically.

Layout (``root`` = ``output.path``, local path or fsspec URL)::

    <root>/dt=YYYY-MM-DD/part-0.parquet              the data (the only file in the partition)
    <root>_manifests/dt=YYYY-MM-DD/manifest.json     the run manifest (a sibling tree, see below)

Publish protocol:

* Local filesystem: shards stream into ``<parent>/.<rootname>.staging/<run_id>/dt=.../part-0.parquet``,
  a hidden sibling of the root on the same filesystem. ``publish`` fsyncs it and moves it into place with
  one ``rename``/``os.replace`` (atomic on POSIX: readers see the old file or the new one, never a mix).
* Object stores (s3://, gs://, ...): shards stream straight to the final key through an fsspec file opened
  with ``autocommit=False`` (a multipart upload). The object appears only when ``publish`` completes the
  upload; an abandoned or aborted upload never becomes visible and the previous object stays readable.

Afterwards any other file left in the partition by an older writer is deleted, so a rerun replaces.

What readers see: before the publish the old run, after it the new run, never a partial or mixed partition
(one file, swapped whole). A query that is *running* while a rerun publishes the same date can fail, though:
Polars and DuckDB open a file's path more than once per query (footer, then pages) and the second open gets the
new file; they raise (Polars may panic) rather than return wrong rows, and a retry reads the new run. Unique file
names would not help: a listing would then briefly show both runs (duplicates) or neither.

Nothing is ever staged inside the root: Polars' and DuckDB's directory/glob scans pick up hidden staging
directories, and Polars refuses a directory holding non-Parquet files. That is also why the manifest lives
in the sibling ``<root>_manifests`` tree. The old manifest of the date is deleted just before the data is
published and the new one written just after, so a manifest that exists always describes published data.
The manifest is also embedded in the Parquet footer (key ``mtgr.manifest``).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

FILE_NAME = "part-0.parquet"
MANIFEST_NAME = "manifest.json"
MANIFEST_SUFFIX = "_manifests"
INPUT_COLUMNS = ("user_id", "rank", "item_id", "score")
META_PREFIX = "mtgr."

# object_store (Polars) spellings of common S3 options -> s3fs arguments, so that output.storage_options
# can be written like data.storage_options. Keys not listed are passed to fsspec unchanged.
_S3_TOP = {"aws_access_key_id": "key", "aws_secret_access_key": "secret", "aws_session_token": "token"}
_S3_CLIENT = {"aws_endpoint_url": "endpoint_url", "aws_endpoint": "endpoint_url", "endpoint_url": "endpoint_url",
              "aws_region": "region_name", "region": "region_name", "aws_default_region": "region_name"}
_S3_DROP = {"aws_allow_http", "allow_http"}  # s3fs takes the scheme from the endpoint URL


def fsspec_options(protocol: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Turn user storage options (Polars/object_store or fsspec spelling) into fsspec arguments."""
    opts = dict(storage_options or {})
    if protocol not in ("s3", "s3a"):
        return opts
    out: dict[str, Any] = {}
    client = dict(opts.pop("client_kwargs", None) or {})
    for key, value in opts.items():
        k = key.lower()
        if k in _S3_TOP:
            out[_S3_TOP[k]] = value
        elif k in _S3_CLIENT:
            client[_S3_CLIENT[k]] = value
        elif k in ("aws_skip_signature", "skip_signature"):
            out["anon"] = str(value).lower() == "true"
        elif k not in _S3_DROP:
            out[key] = value
    if client:
        out["client_kwargs"] = client
    return out


def _plain(value: Any) -> Any:
    """Enum -> its value; anything else unchanged."""
    return value.value if isinstance(value, enum.Enum) else value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (dt.date, dt.datetime)):
        return obj.isoformat()
    return str(obj)


def manifest_json(manifest: dict[str, Any]) -> str:
    """Serialise a manifest (numpy scalars, enums, dates and paths allowed)."""
    return json.dumps(manifest, indent=2, sort_keys=False, default=_json_default)


def _unlarge(t: pa.DataType) -> pa.DataType:
    """large_string -> string (Polars hands out large types); other types unchanged."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    return t


def output_schema(fmt: str, user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
    """Arrow schema of the published file for ``fmt`` ("long" or "nested")."""
    tail = [pa.field("model_version", pa.string(), nullable=False), pa.field("run_date", pa.date32(), nullable=False)]
    if fmt == "long":
        return pa.schema([pa.field("user_id", user_type, nullable=False), pa.field("rank", pa.int16(), nullable=False),
                          pa.field("item_id", item_type), pa.field("score", pa.float32()), *tail])
    rec = pa.struct([pa.field("item_id", item_type), pa.field("score", pa.float32()), pa.field("rank", pa.int16())])
    return pa.schema([pa.field("user_id", user_type, nullable=False), pa.field("recs", pa.list_(rec)), *tail])


def check_shard(shard: pa.Table, top_k: int) -> None:
    """Reject a shard without the input columns or with ranks outside 1..top_k (ValueError)."""
    missing = [c for c in INPUT_COLUMNS if c not in shard.column_names]
    if missing:
        raise ValueError(f"write_shard: table lacks column(s) {missing}; expected {list(INPUT_COLUMNS)}")
    lo, hi = pc.min_max(shard["rank"]).values()
    if shard["rank"].null_count or (lo.as_py() is not None and (lo.as_py() < 1 or hi.as_py() > top_k)):
        raise ValueError(f"write_shard: rank must be in 1..{top_k} (output.top_k), got {lo}..{hi} "
                         f"with {shard['rank'].null_count} nulls")


def to_output_table(shard: pa.Table, schema: pa.Schema, fmt: str, model_version: str, run_date: dt.date) -> pa.Table:
    """Convert one checked shard (user_id, rank, item_id, score rows) to the published ``schema``."""
    n_rows = shard.num_rows
    user = shard["user_id"].cast(schema.field("user_id").type)
    rank = shard["rank"].cast(pa.int16())
    item_type = schema.field("item_id").type if fmt == "long" else schema.field("recs").type.value_type["item_id"].type
    item = shard["item_id"].cast(item_type)
    score = shard["score"].cast(pa.float32())
    if fmt == "long":
        cols = [user, rank, item, score]
    else:
        order = pc.sort_indices(pa.table({"u": user, "r": rank}), sort_keys=[("u", "ascending"), ("r", "ascending")])
        user, rank, item, score = (pc.take(c, order).combine_chunks() for c in (user, rank, item, score))
        starts = np.flatnonzero(np.r_[True, pc.not_equal(user[1:], user[:-1]).to_numpy(zero_copy_only=False)]) \
            if n_rows else np.zeros(0, dtype=np.int64)
        offsets = pa.array(np.r_[starts, n_rows].astype(np.int32))
        recs = pa.StructArray.from_arrays([item, score, rank], fields=list(schema.field("recs").type.value_type))
        cols = [pc.take(user, pa.array(starts)), pa.ListArray.from_arrays(offsets, recs)]
        n_rows = len(starts)
    cols += [pa.repeat(pa.scalar(model_version, pa.string()), n_rows),
             pa.repeat(pa.scalar(run_date, pa.date32()), n_rows)]
    return pa.Table.from_arrays(cols, schema=schema)


class _LocalTarget:
    """Stage in a hidden sibling of the root, publish with one rename."""

    def __init__(self, root: Path, partition: str, run_id: str):
        self.root, self.partition = root, partition
        self.staging_root = root.parent / f".{root.name}.staging"
        self.staging = self.staging_root / run_id
        self.final = root / partition / FILE_NAME
        self.url = str(self.final)
        self.manifest = root.parent / f"{root.name}{MANIFEST_SUFFIX}" / partition / MANIFEST_NAME
        self._file = None

    def open(self):
        self.root.mkdir(parents=True, exist_ok=True)
        (self.staging / self.partition).mkdir(parents=True, exist_ok=False)
        if os.stat(self.staging).st_dev != os.stat(self.root).st_dev:
            raise OSError(f"staging dir {self.staging} is not on the filesystem of output.path {self.root}")
        self._file = open(self.staging / self.partition / FILE_NAME, "wb")
        return self._file

    def remove_manifest(self) -> None:
        self.manifest.unlink(missing_ok=True)

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        part_dir = self.root / self.partition
        staged_dir = self.staging / self.partition
        try:  # new partition: move the whole directory so it never appears empty
            os.rename(staged_dir, part_dir)
        except OSError:  # partition exists: replace the file inside it
            os.replace(staged_dir / FILE_NAME, self.final)
        _fsync_dir(part_dir)
        _fsync_dir(self.root)

    def remove_stale(self) -> list[str]:
        stale = [p for p in (self.root / self.partition).iterdir() if p.name != FILE_NAME]
        for p in stale:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return [str(p) for p in stale]

    def write_manifest(self, text: str) -> None:
        self.manifest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest.with_name(f".{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest)

    def abort(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        self.cleanup()

    def remove_superseded(self) -> None:
        """Drop files staged for this partition by killed runs: the new publish supersedes them."""
        for staged in self.staging_root.glob(f"*/{self.partition}"):
            shutil.rmtree(staged.parent, ignore_errors=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            self.staging_root.rmdir()  # only if no other run is staging
        except OSError:
            pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ObjectTarget:
    """Stream to the final key as an uncommitted upload; completing it is the publish."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, partition: str):
        self.fs, self.root, self.partition = fs, root, partition
        self.final = f"{root}/{partition}/{FILE_NAME}"
        self.url = fs.unstrip_protocol(self.final)
        self.manifest = f"{root}{MANIFEST_SUFFIX}/{partition}/{MANIFEST_NAME}"
        self._file = None

    def open(self):
        self._file = self.fs.open(self.final, "wb", autocommit=False)
        return self._file

    def remove_manifest(self) -> None:
        if self.fs.exists(self.manifest):
            self.fs.rm(self.manifest)

    def commit(self) -> None:
        self._file.close()  # uploads the last part; the object is still invisible
        self._file.commit()  # completes the upload: the object appears atomically

    def remove_stale(self) -> list[str]:
        part_dir = f"{self.root}/{self.partition}"
        self.fs.invalidate_cache(part_dir)
        stale = [p for p in self.fs.find(part_dir) if p.rstrip("/") != self.final]
        if stale:
            self.fs.rm(stale)
        return [self.fs.unstrip_protocol(p) for p in stale]

    def write_manifest(self, text: str) -> None:
        self.fs.pipe_file(self.manifest, text.encode())  # a single PUT: atomic per object

    def remove_superseded(self) -> None:
        """Abort multipart uploads to this key left by killed runs (invisible, but billed until aborted)."""
        call_s3 = getattr(self.fs, "call_s3", None)  # s3fs only; other stores expire unfinished uploads
        if call_s3 is None:
            return
        bucket, key = self.final.split("/", 1)
        for upload in call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", []):
            if upload["Key"] == key:
                self.fs.abort_mpu(bucket, key, upload["UploadId"])

    def abort(self) -> None:
        if self._file is None:
            return
        try:
            self._file.close()
        finally:
            self._file.discard()  # aborts the multipart upload

    def cleanup(self) -> None:
        pass


class OutputWriter:
    """Context manager that streams shards into one Parquet file and publishes it atomically.

    ``with OutputWriter(cfg, run_date, model_version, checkpoint_hash) as w: w.write_shard(t); w.publish(m)``.
    Leaving the block by an exception, or without ``publish``, makes nothing visible.
    """

    def __init__(self, output_cfg: Any, run_date: dt.date, model_version: str, checkpoint_hash: str):
        self.fmt = str(_plain(output_cfg.format)).lower()
        if self.fmt not in ("long", "nested"):
            raise ValueError(f"output.format: {self.fmt!r} is not one of [long, nested]")
        self.compression = str(_plain(getattr(output_cfg, "compression", "zstd")) or "none")
        self.top_k = int(output_cfg.top_k)
        if isinstance(run_date, str):
            run_date = dt.date.fromisoformat(run_date)
        if isinstance(run_date, dt.datetime):
            run_date = run_date.date()
        self.run_date = run_date
        self.model_version, self.checkpoint_hash = str(model_version), str(checkpoint_hash)
        self.run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        self.partition = f"dt={run_date.isoformat()}"

        path = str(output_cfg.path).rstrip("/")
        protocol = fsspec.utils.get_protocol(path)
        fs, root = fsspec.core.url_to_fs(path, **fsspec_options(protocol, getattr(output_cfg, "storage_options", None)))
        root = root.rstrip("/")
        if isinstance(fs, LocalFileSystem):
            self._target: _LocalTarget | _ObjectTarget = _LocalTarget(Path(root), self.partition, self.run_id)
        else:
            if "/" not in root:
                raise ValueError(f"output.path {path!r}: give a prefix inside the bucket, not the bucket itself")
            self._target = _ObjectTarget(fs, root, self.partition)
        self.root_url = root if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(root)

        self._writer: pq.ParquetWriter | None = None
        self._sink = None
        self.rows = 0
        self.users = 0
        self.shards = 0
        self.published = False
        self._t0 = 0.0

    # -- context manager -------------------------------------------------------------------------------
    def __enter__(self) -> "OutputWriter":
        self._t0 = time.perf_counter()
        self._sink = self._target.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.published:
            if exc_type is None:
                log.warning("OutputWriter closed without publish(); nothing was published")
            self._abort()
        return False

    # -- writing --------------------------------------------------------------------------------------
    def write_shard(self, table: pa.Table) -> None:
        """Append one shard's rows (user_id, rank, item_id, score) to the output file."""
        if self._sink is None or self.published:
            raise RuntimeError("write_shard() outside the `with OutputWriter(...)` block or after publish()")
        check_shard(table, self.top_k)
        if self._writer is None:
            self._open_writer(_unlarge(table.schema.field("user_id").type),
                              _unlarge(table.schema.field("item_id").type))
        out = to_output_table(table, self._writer.schema, self.fmt, self.model_version, self.run_date)
        self._writer.write_table(out)
        self.rows += table.num_rows
        self.users += out.num_rows if self.fmt == "nested" else _count_users(table)
        self.shards += 1

    def _open_writer(self, user_type: pa.DataType, item_type: pa.DataType) -> None:
        schema = output_schema(self.fmt, user_type, item_type)
        schema = schema.with_metadata({f"{META_PREFIX}{k}": v for k, v in self._base_metadata().items()})
        compression = None if self.compression.lower() in ("none", "uncompressed") else self.compression
        self._writer = pq.ParquetWriter(self._sink, schema, compression=compression)

    def _base_metadata(self) -> dict[str, str]:
        return {"model_version": self.model_version, "checkpoint_hash": self.checkpoint_hash,
                "run_date": self.run_date.isoformat(), "run_id": self.run_id, "format": self.fmt,
                "top_k": str(self.top_k)}

    # -- publishing -----------------------------------------------------------------------------------
    def publish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Finish the file, make it visible atomically, drop stale files, then write the manifest.

        Returns the manifest as written (the caller's dict plus a ``published`` section).
        """
        if self.published:
            raise RuntimeError("publish() called twice")
        if self._sink is None:
            raise RuntimeError("publish() outside the `with OutputWriter(...)` block")
        if self._writer is None:  # no shard: publish an empty, typed partition (a rerun still replaces)
            self._open_writer(pa.int64(), pa.int64())
        t0 = time.perf_counter()
        self._writer.add_key_value_metadata({f"{META_PREFIX}manifest": manifest_json(manifest)})
        self._writer.close()
        self._target.remove_manifest()  # never let an old manifest describe the new data
        self._target.commit()
        self.published = True
        try:
            stale = self._target.remove_stale()
            self._target.remove_superseded()
        finally:
            self._target.cleanup()
        published = {"path": self.root_url, "partition": self.partition, "file": self._target.url,
                     "format": self.fmt, "compression": self.compression, "rows": self.rows, "users": self.users,
                     "shards": self.shards, "run_id": self.run_id, "model_version": self.model_version,
                     "checkpoint_hash": self.checkpoint_hash, "run_date": self.run_date.isoformat(),
                     "stale_files_removed": stale, "publish_seconds": round(time.perf_counter() - t0, 3),
                     "write_seconds": round(time.perf_counter() - self._t0, 3),
                     "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "manifest": self.manifest_url}
        full = {**manifest, "published": published}
        self._target.write_manifest(manifest_json(full))
        log.info("published %s rows for %s users to %s", f"{self.rows:,}", f"{self.users:,}", self._target.url)
        return full

    @property
    def manifest_url(self) -> str:
        m = self._target.manifest
        return str(m) if isinstance(self._target, _LocalTarget) else self._target.fs.unstrip_protocol(m)

    def _abort(self) -> None:
        """Throw the unpublished file away; the previously published output is untouched."""
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:  # the sink may be what failed; the upload/staging is discarded anyway
            pass
        finally:
            self._writer = None
            self._target.abort()


def _count_users(table: pa.Table) -> int:
    """Distinct users in a shard; shards partition users, so these add up across shards."""
    return pc.count_distinct(table["user_id"]).as_py()
