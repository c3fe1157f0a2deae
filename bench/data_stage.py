"""Benchmark of the data stage: scan + validate the behaviour log, then build token sequences shard by shard.

    python bench/data_stage.py [--events 20000000] [--users 1000000] [--shards 1 8] [--data-dir DIR]
    python bench/data_stage.py --log synth --users 60000 --vocab-items 1000000 --max-seq-len 2048 --shards 8

1. Generates (once, cached in ``--data-dir``, default a folder in the system temp dir, outside the repo) a
   synthetic log in the input schema. ``--log days`` (default): one Hive ``dt=`` partition per day, one Parquet
   file each, 256k-row row groups, rows in time order, written chunk by chunk so the generator's memory stays
   bounded; skewed users and items, ~0.1% dirty rows, ~5% items outside the vocabulary. ``--log synth``: the log
   ``python -m batch.bench`` scores on the GPU (``batch.synth``: ``--users`` users with log-normal history
   lengths, median ``--events-median``, rows unsorted, items drawn from the ``--vocab-items`` vocabulary).
2. Writes a small random-weight checkpoint whose ItemVocab has ``--vocab-items`` items (default 190,000) and
   whose ``max_seq_len`` is ``--max-seq-len`` tokens (default 256); weights are irrelevant here.
3. For each ``num_shards`` runs a fresh subprocess that does what the job's data stage does —
   ``scan_events`` (list, prune, footer checks, lazy scan) with its look for one usable row (``has_clean_rows``;
   scan_probe), ``count_rows`` (drop reasons, one pass; count) and one
   pass that writes each shard's rows to its temporary files (``ShardFiles.write``; all three: scan_validate;
   before 2026-11-27 each shard scanned the whole input in shard_read instead), then per
   shard ``ShardFiles.frame(k)`` collected (shard_read) + ``build`` (sort, last-N, tokenise: sequences) — and
   reports wall time, CPU time (user + system, all threads) and ``ru_maxrss``, with the
   1-minute load average around it.
4. Appends one JSON line per number to ``--results`` (default bench/results.jsonl). Numbers are printed, never
   asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `python bench/data_stage.py`
RESULTS = REPO / "bench" / "results.jsonl"
RUN_DATE = dt.date(2026, 11, 27)
DAYS = 8
NUM_USERS = 1_000_000
NUM_ITEMS = 200_000
VOCAB_ITEMS = 190_000  # items >= this id are unknown to the checkpoint (OOV)
ROW_GROUP = 256 * 1024
CHUNK = 1_000_000
MAX_SEQ_LEN = 256  # tokens: 1 profile token + 2 per event -> the last 127 events of a user
SYNTH_DAYS = 28  # --log synth: the window batch.bench uses


# -- synthetic input -----------------------------------------------------------------------------------------------

def generate(data_dir: Path, events: int, seed: int = 7) -> Path:
    """Write the synthetic log under ``data_dir/events`` unless a matching one is already there (``NUM_USERS``
    users: the default gives ~20 events per user, ``--users 20000`` ~1000, where most events are cut off)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = data_dir / "events"
    marker = data_dir / "events.json"
    spec = {"events": events, "days": DAYS, "users": NUM_USERS, "items": NUM_ITEMS, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return out
    rng = np.random.default_rng(seed)
    per_day = -(-events // DAYS)
    t0 = time.perf_counter()
    for d in range(DAYS):
        day = RUN_DATE - dt.timedelta(days=DAYS - d)
        path = out / f"dt={day.isoformat()}" / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        start_us = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp()) * 10**6
        writer = None
        for lo in range(0, per_day, CHUNK):
            table = _chunk(rng, min(CHUNK, per_day - lo), start_us, session_base=(d * per_day + lo))
            writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=ROW_GROUP)
        writer.close()
        print(f"  wrote {path.relative_to(data_dir)} ({per_day:,} events, {time.perf_counter() - t0:.0f}s)",
              flush=True)
    marker.write_text(json.dumps(spec))
    return out


def generate_synth(data_dir: Path, users: int, events_median: float, num_items: int) -> Path:
    """The log ``python -m batch.bench`` writes (``batch.synth``), under ``data_dir/synth-events`` (cached)."""
    from batch.synth import LogSpec, write_log

    out = data_dir / "synth-events"
    spec = LogSpec(users=users, events_median=events_median, events_sigma=0.35, min_events=20, max_events=4000,
                   num_items=num_items, run_date=RUN_DATE.isoformat(), days=SYNTH_DAYS)
    t0 = time.perf_counter()
    lengths = write_log(spec, out)
    print(f"  {out.name}: {len(lengths):,} users, {int(lengths.sum()):,} events ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    return out


def _chunk(rng: np.random.Generator, n: int, start_us: int, session_base: int):
    """``n`` events of one day: skewed users (u**2) and items (u**3), some dirty rows and OOV items."""
    import pyarrow as pa

    user = (NUM_USERS * rng.random(n) ** 2).astype(np.int64)
    item = (NUM_ITEMS * rng.random(n) ** 3).astype(np.int64)
    duration = rng.exponential(40.0, n)
    duration[rng.random(n) < 0.001] = -1.0  # dirty: negative watch duration
    pct = rng.random(n)
    pct[rng.random(n) < 0.01] = np.nan  # missing
    ts = start_us + np.sort(rng.integers(0, 86_400 * 10**6, n))
    return pa.table({
        "user_id": pa.array(user),
        "session_id": pa.array(session_base + np.arange(n, dtype=np.int64) // 8),
        "video_id": pa.array(item),
        "timestamp": pa.array(ts.astype("datetime64[us]")),
        "watch_duration": pa.array(duration),
        "watch_percentage": pa.array(pct, from_pandas=True),
        "is_liked": pa.array(rng.random(n) < 0.05),
        "is_favorited": pa.array(rng.random(n) < 0.02),
        "is_shared": pa.array(rng.random(n) < 0.01),
        "category": pa.array((item % 50).astype(np.int32)),
        "age_group": pa.array((user % 7).astype(np.int64)),
    })


def make_checkpoint(data_dir: Path, vocab_items: int = VOCAB_ITEMS, max_seq_len: int = MAX_SEQ_LEN) -> Path:
    """A tiny random-weight checkpoint with a ``vocab_items``-item vocabulary (ids 0 .. vocab_items - 1),
    ``max_seq_len`` tokens and an age_group profile feature."""
    import pyarrow as pa
    import torch

    from batch.model import MTGR, ItemVocab, MTGRConfig, ProfileFeature, save_checkpoint

    default = (vocab_items, max_seq_len) == (VOCAB_ITEMS, MAX_SEQ_LEN)
    path = data_dir / ("checkpoint" if default else f"checkpoint-{vocab_items}-{max_seq_len}")
    if (path / "items.parquet").exists():
        return path
    torch.manual_seed(0)
    cfg = MTGRConfig(d_model=16, num_layers=1, num_heads=2, max_seq_len=max_seq_len, num_items=vocab_items,
                     num_categories=50, profile_features=[ProfileFeature("age_group", 8)],
                     model_version="bench-data-stage")
    model = MTGR(cfg)
    items = ItemVocab(pa.array(np.arange(vocab_items, dtype=np.int64)), np.arange(vocab_items) % 50,
                      model.embed.layout.item_offset)
    save_checkpoint(str(path), model, items)
    return path


# -- one measurement (runs in a fresh subprocess) ------------------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process used so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(events_dir: Path, checkpoint: Path, num_shards: int) -> dict:
    """The data stage as ``batch.run.run_job`` runs it, with ``num_shards`` shards; counts, timings, memory."""
    from batch.config import DEFAULT_COLUMNS, DataConfig, window
    from batch.events import EventSchema, count_rows, has_clean_rows, scan_events
    from batch.model import load_checkpoint
    from batch.reader import ShardFiles
    from batch.sequences import SequenceBuilder

    ckpt = load_checkpoint(str(checkpoint))
    schema = EventSchema.for_checkpoint(dict(DEFAULT_COLUMNS), ckpt)
    win = window(DataConfig(path=str(events_dir), run_date=RUN_DATE.isoformat(), lookback_days=28))
    rss_setup = _rss_mb()

    t0, c0 = time.perf_counter(), _cpu_s()
    source = scan_events(str(events_dir), schema, window=win)
    if not has_clean_rows(source):
        raise SystemExit(f"no usable rows in {events_dir}")
    tp = time.perf_counter()
    counts = count_rows(source, ckpt.items.item_ids)
    tc = time.perf_counter()
    with ShardFiles(source, num_shards) as shards:
        shards.write()
        t1, c1 = time.perf_counter(), _cpu_s()
        files_mb = sum(p.stat().st_size for p in Path(shards.path).iterdir()) / 2**20 if shards.path else 0.0
        builder = SequenceBuilder(ckpt, schema)
        users = tokens = used = 0
        digest = hashlib.sha256()  # of every shard's users, tokens and counts: equal output, equal digest
        read_s = build_s = read_cpu = build_cpu = 0.0
        for shard in range(num_shards):
            ta, ca = time.perf_counter(), _cpu_s()
            rows = source.collect(shards.frame(shard))
            tb, cb = time.perf_counter(), _cpu_s()
            seq = builder.build(rows)
            read_s, build_s = read_s + tb - ta, build_s + time.perf_counter() - tb
            read_cpu, build_cpu = read_cpu + cb - ca, build_cpu + _cpu_s() - cb
            users += len(seq.batch.user_ids)
            tokens += len(seq.batch.tokens)
            for part in (seq.batch.user_ids.to_numpy(), seq.batch.tokens, seq.batch.offsets,
                         np.array([seq.users_in, seq.users_skipped, seq.events_in, seq.events_used, seq.events_oov])):
                digest.update(np.ascontiguousarray(part).tobytes())
            used += seq.events_used
            del rows, seq
    t2 = time.perf_counter()
    return {"rows_read": counts["rows_read"], "rows_clean": counts["rows_clean"], "users": users,
            "events_used": used, "tokens": tokens, "digest": digest.hexdigest()[:16],
            "scan_validate_s": t1 - t0, "scan_probe_s": tp - t0, "count_s": tc - tp, "shard_read_s": read_s,
            "sequences_s": build_s, "wall_s": t2 - t0, "scan_validate_cpu_s": c1 - c0,
            "shard_read_cpu_s": read_cpu, "sequences_cpu_s": build_cpu, "shard_files_mb": files_mb,
            "rss_after_setup_mb": rss_setup,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# -- driver --------------------------------------------------------------------------------------------------------

def device() -> str:
    text = Path("/proc/cpuinfo").read_text()
    models = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    return f"{models[0] if models else 'unknown CPU'}, {len(models) or os.cpu_count()} cores"


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "batch", "bench/data_stage.py"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()  # the code measured
    return head + ("-dirty" if dirty else "")


def main() -> None:
    global NUM_USERS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000_000)
    ap.add_argument("--users", type=int, default=NUM_USERS, help="user id range of the generated log (skewed)")
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "mtgr-bench-data-stage")
    ap.add_argument("--log", choices=["days", "synth"], default="days",
                    help="days: --events events in day partitions, time order; synth: batch.bench's log of --users "
                         "users, --events-median events each (log-normal), unsorted")
    ap.add_argument("--events-median", type=float, default=1000.0, help="--log synth: median events per user")
    ap.add_argument("--vocab-items", type=int, default=VOCAB_ITEMS, help="items in the checkpoint's vocabulary")
    ap.add_argument("--max-seq-len", type=int, default=MAX_SEQ_LEN, help="the checkpoint's max_seq_len (tokens)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON lines are appended here")
    ap.add_argument("--no-record", action="store_true", help="print only, do not append to --results")
    ap.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # internal: one measurement, JSON to stdout
    ap.add_argument("--events-dir", type=Path, help=argparse.SUPPRESS)  # internal, with --measure
    ap.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)  # internal, with --measure
    args = ap.parse_args()

    if args.measure is not None:
        result = measure(args.events_dir, args.checkpoint, args.measure)
        print(json.dumps(result))
        return

    NUM_USERS = args.users
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if args.log == "synth":
        print(f"generating {args.users:,} users, median {args.events_median:,.0f} events, in {args.data_dir} "
              f"(cached)", flush=True)
        events_dir = generate_synth(args.data_dir, args.users, args.events_median, args.vocab_items)
    else:
        print(f"generating {args.events:,} events of up to {args.users:,} users in {args.data_dir} (cached)",
              flush=True)
        events_dir = generate(args.data_dir, args.events)
    checkpoint = make_checkpoint(args.data_dir, args.vocab_items, args.max_seq_len)
    size_mb = sum(p.stat().st_size for p in events_dir.rglob("*.parquet")) / 2**20
    files = len(list(events_dir.rglob("*.parquet")))
    command = " ".join(["python bench/data_stage.py", *(shlex.quote(a) for a in sys.argv[1:])])
    common = {"bench": "data_stage", "device": device(), "commit": git_commit(), "command": command,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    lines = []
    for n in args.shards:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        load_before = os.getloadavg()[0]  # other work on the box slows events/s, not peak RSS
        proc = subprocess.run([sys.executable, __file__, "--measure", str(n), "--events-dir", str(events_dir),
                               "--checkpoint", str(checkpoint)],
                              capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode:
            sys.exit(f"measurement with num_shards={n} failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        config = {"num_shards": n, "events": r["rows_read"], "users": r["users"], "user_id_range": args.users,
                  "log": args.log, "files": files, "input_mb": round(size_mb, 1), "vocab_items": args.vocab_items,
                  "max_seq_len": args.max_seq_len, "row_group_rows": ROW_GROUP if args.log == "days" else 1 << 20,
                  "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2)}
        metrics = [("events_per_s", r["rows_read"] / r["wall_s"], "events/s"), ("wall", r["wall_s"], "s"),
                   ("scan_validate", r["scan_validate_s"], "s"), ("scan_probe", r["scan_probe_s"], "s"),
                   ("count", r["count_s"], "s"), ("shard_read", r["shard_read_s"], "s"),
                   ("sequences", r["sequences_s"], "s"), ("scan_validate_cpu", r["scan_validate_cpu_s"], "s"),
                   ("shard_read_cpu", r["shard_read_cpu_s"], "s"), ("sequences_cpu", r["sequences_cpu_s"], "s"),
                   ("shard_files", r["shard_files_mb"], "MiB"), ("peak_rss", r["peak_rss_mb"], "MiB"),
                   ("rss_after_setup", r["rss_after_setup_mb"], "MiB")]
        print(f"num_shards={n}: {r['rows_read']:,} events, {r['users']:,} users, {r['tokens']:,} tokens, "
              f"digest {r['digest']} | "
              + ", ".join(f"{m} {v:,.1f} {u}" for m, v, u in metrics), flush=True)
        lines += [{**common, "config": config, "metric": m, "value": round(v, 3), "unit": u} for m, v, u in metrics]
    if not args.no_record:
        with open(args.results, "a") as f:
            for line in lines:
                f.write(json.dumps({k: line[k] for k in ("bench", "config", "metric", "value", "unit", "device",
                                                         "commit", "command", "date")}) + "\n")
        print(f"appended {len(lines)} lines to {args.results}")


if __name__ == "__main__":
    main()
