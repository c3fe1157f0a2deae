"""Where a vLLM engine pool's instances and the GPU spent the scoring window of one bench run.

    python bench/pool_timeline.py logs/vllm_new.log logs/vllm_new.samples.json --device "H100 80GB HBM3" \\
        --commit <the run's commit> [--results bench/results.jsonl] [--plot]

Reads the pool instances' log lines (``vllm: N users, T tokens: prompts .., generate .., results ..``, stamped with
the time they were written) and the run's GPU samples (``batch.bench`` writes both), and reports over the manifest's
scoring window: chunks and users per chunk; the share of the window an instance spends outside a chunk, split into
turnarounds (the pool reading an answer and sending the next chunk) and shard ends (waiting for the others to finish
the shard, and for the job to hand over the next one); the median turnaround; each shard end's tail (from the first
instance done to the last); GPU busy over the whole window and over its first second (the first shard's start,
when every instance starts at once). ``--plot`` prints the window in 0.1 s steps: instances inside ``generate``
against GPU busy. Numbers are printed and appended to ``--results``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

LINE = re.compile(r"^(\S+ \S+),(\d+) INFO \[instance (\d+)\] .*vllm: (\d+) users, (\d+) tokens: prompts ([\d.]+)s, "
                  r"generate ([\d.]+)s, results ([\d.]+)s")


def read_chunks(log: Path) -> np.ndarray:
    """(instance, start, generate start, generate end, end, users) per chunk, in Unix seconds (the log's times
    are UTC)."""
    rows = []
    for line in log.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            end = dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp() \
                + int(m[2]) / 1000
            prompts, generate, results = float(m[6]), float(m[7]), float(m[8])
            start = end - prompts - generate - results
            rows.append((int(m[3]), start, start + prompts, end - results, end, int(m[4])))
    if not rows:
        raise SystemExit(f"{log}: no pool instance lines (a run with engine.instances > 1 writes them)")
    return np.array(rows)


def shard_ends(chunks: np.ndarray, shards: int) -> list[tuple[float, float]]:
    """(last chunk's end, next chunk's start) at each of the ``shards - 1`` hand-overs between shards, and (the
    last end, inf). A hand-over is where the fewest instances held a chunk: the chunks' running end comes closest to
    (or passes) the next chunk's start; within a shard, other instances hold chunks of ~50-200 ms. Chunk starts are
    reconstructed from the logged durations (to 10 ms before step 22, to 1 ms since), so a hand-over may show as an
    overlap of a few ms."""
    spans = sorted(zip(chunks[:, 1], chunks[:, 4]))
    reach = np.maximum.accumulate([b for _, b in spans])
    breaks = [(spans[j + 1][0] - reach[j], reach[j], spans[j + 1][0]) for j in range(len(spans) - 1)]
    chosen = sorted(sorted(breaks, reverse=True)[:shards - 1], key=lambda x: x[1])
    return [*((last, first) for _, last, first in chosen), (float(reach[-1]), np.inf)]


def summarise(chunks: np.ndarray, samples: dict, shards: int, tolerance: float = 0.02) -> dict[str, float]:
    """The run's figures over its scoring window (see the module's docstring)."""
    start, end = samples["timeline"]["score"]["start"], samples["timeline"]["score"]["end"]
    inside = chunks[(chunks[:, 4] > start) & (chunks[:, 1] < end)]
    instances = np.unique(inside[:, 0])
    span, n = end - start, len(instances)
    ends = shard_ends(inside, shards)
    idle, turnarounds, at_ends, tails = [], [], 0.0, []
    for i in instances:
        mine = inside[inside[:, 0] == i]
        mine = mine[np.argsort(mine[:, 1])]
        busy = np.clip(mine[:, 4], start, end) - np.clip(mine[:, 1], start, end)
        idle.append(1 - busy.sum() / span)
        at_ends += max(0.0, mine[0, 1] - start) + max(0.0, end - mine[-1, 4])
        for done, nxt in zip(mine[:-1, 4], mine[1:, 1]):  # between an answer and the next chunk's start
            if any(done <= last + tolerance and nxt >= first - tolerance for last, first in ends):
                at_ends += max(0.0, nxt - done)  # waiting for the others to finish the shard, and for the next
            else:
                turnarounds.append(nxt - done)  # the pool reading the answer and sending the next chunk
    previous = start
    for last, first in ends:  # each shard's end: from the first instance done to the last one
        done = [inside[(inside[:, 0] == i) & (inside[:, 4] > previous) & (inside[:, 4] <= last + tolerance), 4]
                for i in instances]
        tails.append(last - min(d.max() for d in done if len(d)))
        previous = first - tolerance
    gpu = np.array(samples["gpu"])
    window = gpu[(gpu[:, 0] >= start) & (gpu[:, 0] <= end)]
    first_second = window[window[:, 0] <= start + 1.0]
    return {"chunks": float(len(inside)), "users_per_chunk": float(inside[:, 5].mean()),
            "instance_idle_share": float(np.mean(idle)), "instance_idle_share_max": float(np.max(idle)),
            "idle_share_turnarounds": float(np.sum(turnarounds) / (n * span)),
            "idle_share_shard_ends": float(at_ends / (n * span)),
            "turnaround_ms_median": float(np.median(turnarounds) * 1000) if turnarounds else 0.0,
            "shard_end_tail_ms_mean": float(np.mean(tails) * 1000),
            "gpu_busy": float(window[:, 1].mean() / 100),
            "gpu_busy_first_second": float(first_second[:, 1].mean() / 100)}


def plot(chunks: np.ndarray, samples: dict) -> None:
    start, end = samples["timeline"]["score"]["start"], samples["timeline"]["score"]["end"]
    gpu = np.array(samples["gpu"])
    for t in np.arange(start, end, 0.1):
        generating = int(((chunks[:, 2] <= t) & (chunks[:, 3] > t)).sum())
        busy = float(np.interp(t, gpu[:, 0], gpu[:, 1]))
        print(f"{t - start:6.1f} s  generate {generating:3d}  GPU {busy:4.0f}%  {'#' * generating}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", type=Path)
    ap.add_argument("samples", type=Path)
    ap.add_argument("--device", required=True, help="the card the run used (results line)")
    ap.add_argument("--commit", required=True, help="the run's commit (results line)")
    ap.add_argument("--config", default="", help="what ran (results line), e.g. 'DLRMv3-like 60k, vLLM 12 x 64'")
    ap.add_argument("--results", default="bench/results.jsonl", help="append here; '' = print only")
    ap.add_argument("--shards", type=int, default=8, help="the run's data.num_shards")
    ap.add_argument("--plot", action="store_true")
    a = ap.parse_args()
    chunks, samples = read_chunks(a.log), json.loads(a.samples.read_text())
    if a.plot:
        plot(chunks, samples)
    found = summarise(chunks, samples, a.shards)
    units = {"chunks": "chunks", "users_per_chunk": "users", "turnaround_ms_median": "ms",
             "shard_end_tail_ms_mean": "ms"}
    command = shlex.join(["python", "bench/pool_timeline.py", *sys.argv[1:]])
    lines = []
    for metric, value in found.items():
        print(f"{metric:>26s}: {value:8.3f}")
        lines.append(dict(bench="pool_timeline", config=f"{a.config}; {a.log.name}".lstrip("; "), metric=metric,
                          value=round(value, 4), unit=units.get(metric, "fraction"), device=a.device,
                          commit=a.commit, command=command, date=dt.date.today().isoformat()))
    if a.results:
        with open(a.results, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
