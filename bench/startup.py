"""Start-up costs of the job's host side, each in a fresh process: loading the checkpoint, and the job's start
(reader processes first, then the checkpoint) to the first shard built.

    python bench/startup.py --preset dlrmv3 --workers 4

On an H100 host (issue 6, step 20) the job spent 14-17 s in ``load_checkpoint`` and 10-13 s starting its
readers before the engine could start. This measures both without a GPU: ``load_checkpoint`` of a random-weight
checkpoint at the preset (cached in ``--work``), and, over a small synthetic log with that checkpoint's
vocabulary, the job's order of things, timed from the job's start: ShardReader entered (the processes start and
import), the checkpoint loaded, the readers' inputs sent, the shard files written, the first shard taken. The
readers' main module is this script, which imports torch and the job's modules as the job's does. Numbers are
printed and appended to ``--results``, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch  # noqa: F401  (the readers import what the job's main module imports)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch.bench import git_commit, preset_config, random_checkpoint  # noqa: E402
from batch.config import DEFAULT_COLUMNS, DataConfig, window  # noqa: E402
from batch.events import EventSchema, scan_events  # noqa: E402
from batch.model import load_checkpoint  # noqa: E402
from batch.reader import ShardFiles, ShardReader  # noqa: E402
from batch.sequences import SequenceBuilder  # noqa: E402
from batch.synth import LogSpec, write_log  # noqa: E402

RUN_DATE = "2026-11-01"


def measure_load(checkpoint: str) -> dict[str, float]:
    t0 = time.perf_counter()
    load_checkpoint(checkpoint)
    return {"load_checkpoint_s": time.perf_counter() - t0}


def measure_readers(checkpoint: str, events: str, workers: int, shards: int) -> dict[str, float]:
    """The job's start-up in its order, each figure from the job's start: the readers started, the checkpoint
    loaded, the inputs sent, the shard files written, the first shard taken."""
    t0 = time.perf_counter()
    with ShardReader(workers, shards) as reader:
        entered = time.perf_counter() - t0
        ckpt = load_checkpoint(checkpoint)
        loaded = time.perf_counter() - t0
        schema = EventSchema.for_checkpoint(dict(DEFAULT_COLUMNS), ckpt)
        source = scan_events(events, schema, window=window(DataConfig(path=events, run_date=RUN_DATE)))
        with ShardFiles(source, shards) as files:
            reader.begin(files, SequenceBuilder(ckpt, schema))
            files.write()
            written = time.perf_counter() - t0
            reader.start()
            reader.take()
            first = time.perf_counter() - t0
            for _ in range(1, shards):
                reader.take()
    # From the job's start, so not comparable with the partition_done_s and first_shard_s of earlier results,
    # which counted from the readers' start, made after the checkpoint's load.
    return {"reader_enter_s": entered, "checkpoint_loaded_s": loaded, "partition_done_from_start_s": written,
            "first_shard_from_start_s": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dlrmv3")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--work", default="/tmp/mtgr-startup")
    ap.add_argument("--results", default="bench/results.jsonl")
    ap.add_argument("--one", choices=["load", "readers"], help=argparse.SUPPRESS)  # child: measure, print JSON
    a = ap.parse_args()
    work = Path(a.work)
    checkpoint, events = str(work / f"checkpoint-{a.preset}"), str(work / "events")
    if a.one:
        out = measure_load(checkpoint) if a.one == "load" else \
            measure_readers(checkpoint, events, a.workers, a.shards)
        print(json.dumps(out))
        return
    cfg = preset_config(a.preset, {})
    random_checkpoint(Path(checkpoint), cfg, 0)
    write_log(LogSpec(users=a.users, events_median=1000, events_sigma=0.35, min_events=1, max_events=4000,
                      num_items=cfg.num_items, run_date=RUN_DATE, days=28), Path(events))
    base = [sys.executable, __file__, "--preset", a.preset, "--workers", str(a.workers), "--shards", str(a.shards),
            "--work", a.work]
    found = {}
    for one in ("load", "readers"):
        found.update(json.loads(subprocess.run([*base, "--one", one], check=True, capture_output=True,
                                               text=True).stdout.splitlines()[-1]))
    device = f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    config = (f"preset {a.preset} ({cfg.num_items:,} items), fp32 checkpoint; {a.workers} reader processes, "
              f"{a.shards} shards of a {a.users:,}-user synthetic log; each part in a fresh process")
    command = "python bench/startup.py " + " ".join(sys.argv[1:])
    commit = git_commit()
    with open(a.results, "a") as f:
        for metric, value in found.items():
            print(f"{metric:>26s}: {value:7.2f} s")
            f.write(json.dumps(dict(bench="startup", config=config, metric=metric, value=round(value, 3), unit="s",
                                    device=device, commit=commit, command=command,
                                    date=dt.date.today().isoformat())) + "\n")


if __name__ == "__main__":
    main()
