"""Where a vLLM engine pool's instances and the GPU spent the scoring window of one bench run.

    python bench/pool_timeline.py logs/vllm_new.log logs/vllm_new.samples.json --device "H100 80GB HBM3" \\
        --commit <the run's commit> [--results bench/results.jsonl] [--plot]

Reads the pool instances' log lines (``vllm: N users, T tokens: prompts .., generate .., results ..``, stamped with
the time they were written) and the run's GPU samples (``batch.bench`` writes both), and reports over the manifest's
scoring window: chunks and users per chunk, the share of the window an instance spends outside a chunk (waiting for
the others at a shard's end, or for the job to hand it the next shard), GPU busy over the whole window and over its
first second (the first shard's start, when every instance starts at once). ``--plot`` prints the window in 0.1 s
steps: instances inside ``generate`` against GPU busy. Numbers are printed and appended to ``--results``.
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
    """(instance, start, generate start, end, users) per chunk, Unix seconds; the log's times are UTC."""
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


def summarise(chunks: np.ndarray, samples: dict) -> dict[str, float]:
    start, end = samples["timeline"]["score"]["start"], samples["timeline"]["score"]["end"]
    inside = chunks[(chunks[:, 4] > start) & (chunks[:, 1] < end)]
    span = end - start
    idle = []
    for i in np.unique(inside[:, 0]):
        mine = inside[inside[:, 0] == i]
        busy = np.clip(mine[:, 4], start, end) - np.clip(mine[:, 1], start, end)
        idle.append(1 - busy.sum() / span)
    gpu = np.array(samples["gpu"])
    window = gpu[(gpu[:, 0] >= start) & (gpu[:, 0] <= end)]
    first = window[window[:, 0] <= start + 1.0]
    return {"chunks": float(len(inside)), "users_per_chunk": float(inside[:, 5].mean()),
            "instance_idle_share": float(np.mean(idle)), "instance_idle_share_max": float(np.max(idle)),
            "gpu_busy": float(window[:, 1].mean() / 100), "gpu_busy_first_second": float(first[:, 1].mean() / 100)}


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
    ap.add_argument("--plot", action="store_true")
    a = ap.parse_args()
    chunks, samples = read_chunks(a.log), json.loads(a.samples.read_text())
    if a.plot:
        plot(chunks, samples)
    found = summarise(chunks, samples)
    units = {"chunks": "chunks", "users_per_chunk": "users"}
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
