"""Generate the synthetic sample behaviour log (seeded, deterministic).

Writes a Hive-partitioned Parquet tree ``<out>/dt=YYYY-MM-DD/part-0.parquet`` (zstd),
one partition per calendar day, in the behaviour-log schema. The data has learnable
structure: users have a sparse taste over item clusters (categories) correlated with
their age group, sessions mostly stay in one cluster and walk it in a fixed order
(video i is usually followed by video i+1 or i+2 of that cluster), and engagement is
higher for in-taste items. See README.md next to this file.

Usage: python data/samples/generate.py [--users 2000] [--seed 20261126] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

N_ITEMS = 1500
N_CLUSTERS = 30
N_AGE_GROUPS = 7
END_DAY = datetime(2026, 11, 26)  # last calendar day of the log (naive UTC)
N_DAYS = 14
DEFAULT_SEED = 20261126
DEFAULT_OUT = Path(__file__).resolve().parent / "events"

# Probabilities of one within-session step (cumulative thresholds below).
P_NEXT1, P_NEXT2, P_NEXT3 = 0.60, 0.20, 0.05  # move 1, 2 or 3 places along the cluster's chain
P_SAME_CLUSTER = 0.07  # popularity-weighted jump inside the current cluster
P_SWITCH = 0.04  # switch to another cluster drawn from the user's taste
# remaining 0.04: one-off global-popularity item (noise), the walk position is kept
P_SKIP_SEEN = 0.9  # a step landing on an already watched video moves on to the next unseen one
P_RESUME = 0.6  # a session in a cluster visited before resumes after the last video seen there

SCHEMA = {
    "user_id": pl.Int64,
    "session_id": pl.Int64,
    "video_id": pl.Int64,
    "timestamp": pl.Datetime("us", time_zone=None),
    "watch_duration": pl.Float64,
    "watch_percentage": pl.Float64,
    "is_liked": pl.Boolean,
    "is_favorited": pl.Boolean,
    "is_shared": pl.Boolean,
    "category": pl.Int32,
    "age_group": pl.Int8,
}


@dataclass
class Catalog:
    """Videos: cluster membership, chain order inside each cluster, popularity, length."""

    video_id: np.ndarray  # (N_ITEMS,) int64 raw id of item index i
    cluster: np.ndarray  # (N_ITEMS,) cluster of item index i
    chains: list[np.ndarray]  # per cluster: item indices in walk order
    pos: np.ndarray  # (N_ITEMS,) position of item i in its cluster's chain
    cluster_cdf: list[np.ndarray]  # per cluster: popularity CDF over its chain
    global_cdf: np.ndarray  # popularity CDF over all items
    length_s: np.ndarray  # (N_ITEMS,) video length in whole seconds, 10..600


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    return c / c[-1]


def _draw(cdf: np.ndarray, u: float) -> int:
    return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))


def make_catalog(rng: np.random.Generator) -> Catalog:
    """Assign items to clusters of equal size, a random chain order, Zipf popularity."""
    cluster = np.repeat(np.arange(N_CLUSTERS), N_ITEMS // N_CLUSTERS)
    rng.shuffle(cluster)
    chains = [rng.permutation(np.flatnonzero(cluster == c)) for c in range(N_CLUSTERS)]
    pos = np.empty(N_ITEMS, dtype=np.int64)
    for chain in chains:
        pos[chain] = np.arange(len(chain))
    # Popularity: Zipf over a random rank order (independent of the chain order).
    rank = rng.permutation(N_ITEMS)
    pop = 1.0 / (rank + 10.0) ** 1.1
    cluster_cdf = [_cdf(pop[chain]) for chain in chains]
    length_s = np.clip(np.round(rng.lognormal(np.log(60.0), 0.9, N_ITEMS)), 10, 600)
    video_id = 1000 + rng.permutation(N_ITEMS).astype(np.int64)
    return Catalog(video_id, cluster, chains, pos, cluster_cdf, _cdf(pop), length_s)


def user_profiles(rng: np.random.Generator, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Age groups and sparse Dirichlet tastes over clusters, centred on an age-group prior."""
    age_p = np.array([0.06, 0.18, 0.26, 0.21, 0.14, 0.09, 0.06])
    age = rng.choice(N_AGE_GROUPS, size=n_users, p=age_p).astype(np.int8)
    prior = 0.8 * rng.dirichlet(np.full(N_CLUSTERS, 0.4), size=N_AGE_GROUPS) + 0.2 / N_CLUSTERS
    taste = np.stack([rng.dirichlet(4.0 * prior[a] + 1e-3) for a in age])
    return age, taste


def simulate_user(rng: np.random.Generator, cat: Catalog, taste: np.ndarray, n_events: int,
                  window_s: float) -> dict[str, np.ndarray]:
    """One user's events: item indices, session numbers, times (s from window start), engagement."""
    taste_cdf = _cdf(taste)
    items = np.empty(n_events, dtype=np.int64)
    sess = np.empty(n_events, dtype=np.int64)
    seen: set[int] = set()
    last_pos: dict[int, int] = {}
    # Session sizes: 1 + Poisson(6), cut so that they sum to n_events.
    sizes: list[int] = []
    while sum(sizes) < n_events:
        sizes.append(1 + int(rng.poisson(6.0)))
    sizes[-1] -= sum(sizes) - n_events

    def land(c: int, p: int) -> tuple[int, int]:
        """Item at chain position p of cluster c, skipping seen videos with P_SKIP_SEEN."""
        chain = cat.chains[c]
        p %= len(chain)
        if int(chain[p]) in seen and rng.random() < P_SKIP_SEEN:
            for _ in range(len(chain)):
                p = (p + 1) % len(chain)
                if int(chain[p]) not in seen:
                    break
        return int(chain[p]), p

    k = 0
    for s, size in enumerate(sizes):
        c = _draw(taste_cdf, rng.random())
        if c in last_pos and rng.random() < P_RESUME:
            item, p = land(c, last_pos[c] + 1)
        else:
            item, p = land(c, _draw(cat.cluster_cdf[c], rng.random()))
        for j in range(size):
            if j > 0:
                u = rng.random()
                if u < P_NEXT1:
                    item, p = land(c, p + 1)
                elif u < P_NEXT1 + P_NEXT2:
                    item, p = land(c, p + 2)
                elif u < P_NEXT1 + P_NEXT2 + P_NEXT3:
                    item, p = land(c, p + 3)
                elif u < P_NEXT1 + P_NEXT2 + P_NEXT3 + P_SAME_CLUSTER:
                    item, p = land(c, _draw(cat.cluster_cdf[c], rng.random()))
                elif u < P_NEXT1 + P_NEXT2 + P_NEXT3 + P_SAME_CLUSTER + P_SWITCH:
                    c = _draw(taste_cdf, rng.random())
                    item, p = land(c, _draw(cat.cluster_cdf[c], rng.random()))
                else:  # one-off popular video from anywhere; the walk stays where it was
                    items[k], sess[k] = _draw(cat.global_cdf, rng.random()), s
                    seen.add(int(items[k]))
                    k += 1
                    continue
            items[k], sess[k] = item, s
            seen.add(item)
            last_pos[c] = p
            k += 1

    # Engagement: affinity = taste of the item's cluster relative to the user's top cluster.
    aff = taste[cat.cluster[items]] / taste.max()
    mean = 0.2 + 0.65 * aff
    wp = np.round(rng.beta(4.0 * mean, 4.0 * (1.0 - mean)), 3)
    liked = rng.random(n_events) < 1.0 / (1.0 + np.exp(-(-4.0 + 2.5 * aff + 2.5 * wp)))
    fav = liked & (rng.random(n_events) < 0.15 + 0.25 * aff)
    shared = rng.random(n_events) < 1.0 / (1.0 + np.exp(-(-5.5 + 2.0 * aff + 2.0 * wp)))
    duration = np.round(wp * cat.length_s[items], 3)

    # Times: within a session, the next event starts after the watch time plus a short
    # browse pause; sessions are separated by lognormal gaps (median 8 h, hours to days).
    step = duration + rng.exponential(8.0, n_events) + 1.0
    starts = np.flatnonzero(np.r_[True, sess[1:] != sess[:-1]])
    step[starts] = 0.0
    within = np.cumsum(step) - np.repeat(np.cumsum(step)[starts], np.diff(np.r_[starts, n_events]))
    span = within[np.r_[starts[1:], n_events] - 1]  # duration of each session
    gaps = rng.lognormal(np.log(8 * 3600.0), 1.0, len(starts))
    gaps[0] = 0.0
    budget = window_s - span.sum() - 60.0
    if gaps.sum() > budget:  # squeeze heavy users' gaps to fit in the window, keep >= 10 min
        gaps = 600.0 + (gaps - 600.0).clip(0) * max(budget - 600.0 * len(gaps), 0.0) / max(
            (gaps - 600.0).clip(0).sum(), 1e-9)
        gaps[0] = 0.0
    offsets = np.cumsum(gaps + np.r_[0.0, span[:-1]])
    origin = rng.uniform(0.0, max(window_s - 60.0 - offsets[-1] - span[-1], 0.0))
    t = origin + np.repeat(offsets, np.diff(np.r_[starts, n_events])) + within
    return {"item": items, "session": sess, "t": np.round(t, 3), "wp": wp, "duration": duration,
            "liked": liked, "fav": fav, "shared": shared}


def generate(n_users: int = 2000, seed: int = DEFAULT_SEED) -> pl.DataFrame:
    """Build the whole log as one DataFrame sorted by (user_id, timestamp)."""
    rng = np.random.default_rng(seed)
    cat = make_catalog(rng)
    age, taste = user_profiles(rng, n_users)
    lengths = np.clip(np.round(rng.lognormal(np.log(40.0), 0.75, n_users)), 5, 400).astype(int)
    user_ids = 1_000_000 + rng.permutation(n_users).astype(np.int64) * 7
    window_s = N_DAYS * 86400.0
    start = END_DAY - timedelta(days=N_DAYS - 1)
    parts = []
    next_session = 1
    for u in range(n_users):
        ev = simulate_user(rng, cat, taste[u], int(lengths[u]), window_s)
        n = len(ev["item"])
        parts.append({
            "user_id": np.full(n, user_ids[u]),
            "session_id": next_session + ev["session"],
            "video_id": cat.video_id[ev["item"]],
            "timestamp_us": np.round(ev["t"] * 1e6).astype(np.int64),
            "watch_duration": ev["duration"],
            "watch_percentage": ev["wp"],
            "is_liked": ev["liked"],
            "is_favorited": ev["fav"],
            "is_shared": ev["shared"],
            "category": cat.cluster[ev["item"]] + 1,
            "age_group": np.full(n, age[u]),
        })
        next_session += int(ev["session"][-1]) + 1
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    origin_us = int((start - datetime(1970, 1, 1)).total_seconds()) * 1_000_000
    cols["timestamp"] = cols.pop("timestamp_us") + origin_us
    df = pl.DataFrame({k: cols[k] for k in SCHEMA})
    df = df.with_columns(pl.col("timestamp").cast(pl.Datetime("us")))
    return df.cast(SCHEMA).sort("user_id", "timestamp", maintain_order=True)


def write_tree(df: pl.DataFrame, out: Path) -> list[Path]:
    """Write one zstd Parquet file per calendar day under out/dt=YYYY-MM-DD/ (replacing out)."""
    if out.exists():
        strays = [p.name for p in out.iterdir() if not p.name.startswith("dt=")]
        if strays:
            raise SystemExit(f"refusing to replace {out}: it holds non-partition entries {strays}")
        shutil.rmtree(out)
    files = []
    days = df.get_column("timestamp").dt.date()
    for day in sorted(days.unique().to_list()):
        path = out / f"dt={day.isoformat()}" / "part-0.parquet"
        path.parent.mkdir(parents=True)
        df.filter(days == day).write_parquet(path, compression="zstd", compression_level=9,
                                             statistics=True)
        files.append(path)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    df = generate(args.users, args.seed)
    files = write_tree(df, args.out)
    size = sum(f.stat().st_size for f in files)
    print(f"{df.height} events, {df['user_id'].n_unique()} users, {df['video_id'].n_unique()} videos, "
          f"{len(files)} partitions, {size / 1e6:.2f} MB -> {args.out}")


if __name__ == "__main__":
    main()
