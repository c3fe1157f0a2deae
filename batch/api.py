"""In-process scoring for ad-hoc use, with the batch job's model, sequence building and engine.

    >>> from batch.api import infer_recommendations
    >>> infer_recommendations(42, [{"video_id": 1017, "timestamp": datetime(2026, 11, 26, 20, 15),
    ...                             "watch_duration": 31.0, "watch_percentage": 0.8, "is_liked": True}],
    ...                       num_recommendations=5, checkpoint="data/samples/checkpoint")
    [{'item_id': 1342, 'score': 7.1, 'rank': 1}, ...]

Behaviour dicts use the input column names (``video_id``, ``timestamp``, ...; see ``columns``). The item and the
timestamp are required; a missing watch or flag field counts as missing, like a null in the log. Rows the batch
job would drop (negative duration, watch percentage outside [0, 1], null ids) are dropped here too; there is no
run window, every behaviour given is used. The loaded checkpoint is cached per (path, device, dtype).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from batch.config import DEFAULT_COLUMNS, Device, DType, ModelConfig, TorchEngineConfig
from batch.engines.base import recommendations_table
from batch.engines.torch_engine import TorchEngine
from batch.errors import InputError
from batch.events import EventSchema, normalize
from batch.model import Checkpoint
from batch.preset import open_checkpoint
from batch.sequences import SequenceBuilder

DEFAULT_CHECKPOINT = "data/samples/checkpoint"
REQUIRED = ("item_id", "timestamp")


def infer_recommendations(user_id: Any, behaviors: Sequence[Mapping[str, Any]], num_recommendations: int = 10, *,
                          checkpoint: str = DEFAULT_CHECKPOINT, exclude_seen: bool = True,
                          columns: Mapping[str, str] | None = None, max_seq_len: int | None = None,
                          device: str = "cpu") -> list[dict[str, Any]]:
    """Top recommendations ``[{"item_id", "score", "rank"}, ...]`` (best first) for one user's behaviours."""
    result = infer_recommendations_batch({user_id: behaviors}, num_recommendations, checkpoint=checkpoint,
                                         exclude_seen=exclude_seen, columns=columns, max_seq_len=max_seq_len,
                                         device=device)
    return result[user_id]


def infer_recommendations_batch(behaviors_by_user: Mapping[Any, Sequence[Mapping[str, Any]]],
                                num_recommendations: int = 10, *, checkpoint: str = DEFAULT_CHECKPOINT,
                                exclude_seen: bool = True, columns: Mapping[str, str] | None = None,
                                max_seq_len: int | None = None, device: str = "cpu") -> dict[Any, list[dict]]:
    """Recommendations of several users at once: ``{user_id: [{"item_id", "score", "rank"}, ...]}``.

    A user without a usable behaviour gets an empty list.
    """
    if num_recommendations < 1:
        raise ValueError(f"num_recommendations={num_recommendations} is invalid: expected an integer >= 1")
    scorer = _scorer(os.path.abspath(checkpoint), device)
    schema = EventSchema.for_checkpoint({**DEFAULT_COLUMNS, **(columns or {})}, scorer.checkpoint)
    frame = behaviors_frame(behaviors_by_user, schema)
    builder = SequenceBuilder(scorer.checkpoint, schema, max_seq_len)
    seqs = builder.build(normalize(frame.lazy(), schema).collect())
    top = scorer.engine.score(seqs.batch, num_recommendations, exclude_seen)
    table = pl.from_arrow(recommendations_table(seqs.batch.user_ids, top, scorer.checkpoint.items.item_ids))
    result: dict[Any, list[dict]] = {user: [] for user in behaviors_by_user}
    for row in table.sort("user_id", "rank").iter_rows(named=True):
        result[row["user_id"]].append({"item_id": row["item_id"], "score": row["score"], "rank": row["rank"]})
    return result


def behaviors_frame(behaviors_by_user: Mapping[Any, Sequence[Mapping[str, Any]]], schema: EventSchema) -> pl.DataFrame:
    """One row per behaviour in the input column names, user id added, absent optional fields as nulls."""
    user_col = schema.columns["user_id"]
    rows = [{**b, user_col: user} for user, behaviors in behaviors_by_user.items() for b in behaviors]
    frame = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame({user_col: []})
    for fieldname in REQUIRED:
        if schema.columns[fieldname] not in frame.columns:
            raise InputError(f"behaviors: every behaviour needs {schema.columns[fieldname]!r} (model field "
                             f"{fieldname}); got keys {sorted(c for c in frame.columns if c != user_col)}")
    absent = {f: c for f, c in schema.columns.items() if c not in frame.columns or frame[c].dtype == pl.Null}
    frame = frame.with_columns(pl.lit(None, dtype=_null_type(f, schema)).alias(c) for f, c in absent.items())
    schema.check(frame.to_arrow().schema, "behaviors")
    return frame


def clear_cache() -> None:
    """Forget loaded checkpoints (e.g. after a checkpoint directory was replaced in place)."""
    _scorer.cache_clear()


@dataclass
class _Scorer:
    checkpoint: Checkpoint
    engine: TorchEngine


@functools.lru_cache(maxsize=4)
def _scorer(checkpoint: str, device: str) -> _Scorer:
    ckpt = open_checkpoint(ModelConfig(checkpoint=checkpoint))
    return _Scorer(ckpt, TorchEngine(TorchEngineConfig(device=Device(device), dtype=DType.float32), ckpt))


def _null_type(fieldname: str, schema: EventSchema) -> pl.DataType:
    if fieldname in schema.flags:
        return pl.Boolean
    if fieldname in ("watch_duration", "watch_percentage"):
        return pl.Float64
    return pl.Int64
