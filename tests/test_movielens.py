"""MovieLens-100k converter: size, ids and value ranges of the converted log."""

import polars as pl
import pytest

pytest.importorskip("recbole")

from batch.datasets.movielens import convert_ml100k  # noqa: E402


def test_convert_ml100k(tmp_path):
    df = pl.read_parquet(convert_ml100k(str(tmp_path / "ml-100k")))
    assert df.height == 100_000
    assert df["user_id"].n_unique() == 943
    assert df["video_id"].n_unique() == 1682
    assert df.schema["timestamp"] == pl.Datetime("us", time_zone=None)
    assert df.null_count().sum_horizontal().item() == 0
    r = df.select(
        wp_min=pl.col("watch_percentage").min(), wp_max=pl.col("watch_percentage").max(),
        wd_min=pl.col("watch_duration").min(), cat_min=pl.col("category").min(),
        cat_max=pl.col("category").max(), age_min=pl.col("age_group").min(),
        age_max=pl.col("age_group").max(), shared=pl.col("is_shared").any(),
        fav_not_liked=(pl.col("is_favorited") & ~pl.col("is_liked")).any(),
        t_min=pl.col("timestamp").min().dt.year(), t_max=pl.col("timestamp").max().dt.year(),
    ).row(0, named=True)
    assert r["wp_min"] >= 0.2 and r["wp_max"] == 1.0 and r["wd_min"] > 0
    assert 0 <= r["cat_min"] and r["cat_max"] <= 18
    assert 0 <= r["age_min"] and r["age_max"] <= 6
    assert not r["shared"] and not r["fav_not_liked"]
    assert (r["t_min"], r["t_max"]) == (1997, 1998)
    # one session per user and day, numbered over the whole log
    per_user = df.group_by("session_id").agg(pl.col("user_id").n_unique())
    assert per_user["user_id"].max() == 1
    assert df["session_id"].is_sorted()
