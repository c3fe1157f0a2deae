"""Shared fixtures: a tiny random checkpoint and small behaviour logs written as Hive trees."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from batch.model import MTGR, ItemVocab, MTGRConfig, ProfileFeature, TokenLayout, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
RUN_DATE = dt.date(2026, 11, 27)  # the tiny log covers the three days before it
NUM_ITEMS = 64
ITEM_IDS = np.arange(1000, 1000 + NUM_ITEMS, dtype=np.int64)

EVENT_SCHEMA = {
    "user_id": pl.Int64, "session_id": pl.Int64, "video_id": pl.Int64, "timestamp": pl.Datetime("us"),
    "watch_duration": pl.Float64, "watch_percentage": pl.Float64, "is_liked": pl.Boolean,
    "is_favorited": pl.Boolean, "is_shared": pl.Boolean, "category": pl.Int32, "age_group": pl.Int8,
}


def tiny_config(**overrides) -> MTGRConfig:
    base = dict(d_model=16, num_layers=1, num_heads=2, max_seq_len=64, num_items=NUM_ITEMS, num_categories=4,
                feature_dim=4, rel_pos_buckets=8, profile_features=[ProfileFeature("age_group", 7)],
                model_version="tiny-test")
    return MTGRConfig(**{**base, **overrides})


def make_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A random-initialised checkpoint (weights scaled up so scores are well separated)."""
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    model = MTGR(cfg)
    with torch.no_grad():
        model.embed.item.weight.mul_(4.0)
    items = ItemVocab(pa.array(ITEM_IDS), np.arange(NUM_ITEMS) % 4, TokenLayout(cfg).item_offset)
    save_checkpoint(str(path), model, items)
    return path


def make_events(num_users: int = 30, seed: int = 1, days: int = 3, unknown_items: bool = True) -> pl.DataFrame:
    """A small clean log: users 1..num_users, a few events per day in the ``days`` before RUN_DATE."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, num_users + 1):
        n = int(rng.integers(2, 25))
        start = dt.datetime(RUN_DATE.year, RUN_DATE.month, RUN_DATE.day) - dt.timedelta(days=days)
        offsets = np.sort(rng.integers(0, days * 86400 - 1, size=n))
        pool = np.r_[ITEM_IDS, [9001, 9002]] if unknown_items else ITEM_IDS
        for t in offsets:
            rows.append(dict(
                user_id=user, session_id=user * 10, video_id=int(rng.choice(pool)),
                timestamp=start + dt.timedelta(seconds=int(t)), watch_duration=float(rng.integers(1, 300)),
                watch_percentage=float(rng.random()), is_liked=bool(rng.random() < 0.2),
                is_favorited=bool(rng.random() < 0.1), is_shared=bool(rng.random() < 0.05),
                category=int(rng.integers(0, 4)), age_group=int(user % 7)))
    return pl.DataFrame(rows, schema=EVENT_SCHEMA)


def write_hive(df: pl.DataFrame, root: Path) -> Path:
    """Write ``df`` as ``root/dt=YYYY-MM-DD/part-0.parquet`` by the day of its timestamp."""
    day = df["timestamp"].dt.date()
    for d in day.unique().sort():
        out = root / f"dt={d.isoformat()}"
        out.mkdir(parents=True, exist_ok=True)
        df.filter(day == d).write_parquet(out / "part-0.parquet")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def events_frame() -> pl.DataFrame:
    return make_events()


@pytest.fixture()
def events_dir(tmp_path, events_frame) -> Path:
    return write_hive(events_frame, tmp_path / "events")


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    """The CI machine has two cores; keep torch from oversubscribing them."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint):
    from batch.model import load_checkpoint

    return load_checkpoint(str(tiny_checkpoint))


@pytest.fixture(scope="session")
def schema(checkpoint):
    from batch.config import DEFAULT_COLUMNS
    from batch.events import EventSchema

    return EventSchema.for_checkpoint(dict(DEFAULT_COLUMNS), checkpoint)
