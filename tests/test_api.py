"""The in-process API gives the batch job's results for the same users."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from batch.api import infer_recommendations, infer_recommendations_batch
from batch.errors import InputError
from batch.run import run_job

from test_run import PARTITION, config


@pytest.fixture(scope="module")
def batch_output(tmp_path_factory, tiny_checkpoint, events_frame):
    from conftest import write_hive

    root = tmp_path_factory.mktemp("api")
    events = write_hive(events_frame, root / "events")
    run_job(config(events, tiny_checkpoint, root / "recs", "output.top_k=7", "data.num_shards=3"))
    return pl.read_parquet(root / "recs" / PARTITION / "part-0.parquet")


def behaviors(events_frame: pl.DataFrame, user: int) -> list[dict]:
    return events_frame.filter(pl.col("user_id") == user).drop("user_id").to_dicts()


def expected(batch_output: pl.DataFrame, user) -> list[dict]:
    rows = batch_output.filter(pl.col("user_id") == user).sort("rank")
    return rows.select("item_id", "score", "rank").to_dicts()


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [(r["item_id"], r["rank"]) for r in got] == [(r["item_id"], r["rank"]) for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], rtol=1e-5, atol=1e-5)


def test_one_user_equals_the_batch_job(tiny_checkpoint, events_frame, batch_output):
    got = infer_recommendations(5, behaviors(events_frame, 5), num_recommendations=7,
                                checkpoint=str(tiny_checkpoint))
    assert len(got) == 7 and set(got[0]) == {"item_id", "score", "rank"}
    assert_same(got, expected(batch_output, 5))


def test_several_users_equal_the_batch_job(tiny_checkpoint, events_frame, batch_output):
    users = [2, 9, 17, 30]
    got = infer_recommendations_batch({u: behaviors(events_frame, u) for u in users}, 7,
                                      checkpoint=str(tiny_checkpoint))
    assert list(got) == users
    for u in users:
        assert_same(got[u], expected(batch_output, u))


def test_string_user_ids_and_absent_optional_fields(tiny_checkpoint):
    ts = dt.datetime(2026, 11, 26, 9)
    history = [{"video_id": 1000 + i, "timestamp": ts + dt.timedelta(minutes=i)} for i in range(5)]
    got = infer_recommendations_batch({"alice": history, "bob": []}, 3, checkpoint=str(tiny_checkpoint))
    assert len(got["alice"]) == 3 and got["bob"] == []
    assert not {r["item_id"] for r in got["alice"]} & {1000 + i for i in range(5)}  # seen items excluded


def test_missing_item_key_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(InputError, match="every behaviour needs 'video_id'"):
        infer_recommendations(1, [{"timestamp": dt.datetime(2026, 11, 26)}], checkpoint=str(tiny_checkpoint))
    with pytest.raises(InputError, match="model.checkpoint: .*does not exist"):
        infer_recommendations(1, [], checkpoint="/no/such/checkpoint")
