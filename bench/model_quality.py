"""Model quality under the leave-last-event-out protocol: MTGR vs popularity, recorded in bench/results.jsonl.

    python bench/model_quality.py sample                      # the committed sample checkpoint on data/samples
    python bench/model_quality.py ml-100k --preset tiny epochs=20 model.arch.dropout=0.2

``sample`` evaluates data/samples/checkpoint (python -m batch.evaluate). ``ml-100k`` converts MovieLens-100k from the
recbole wheel (never committed), trains ``--preset`` with batch.train (extra arguments are Hydra overrides for it) into a
scratch directory and records the metrics batch.train prints after its held-out evaluation.
Appends one JSON line per metric (bench, config, metric, value, unit, device, commit, command, date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ML_DIR = REPO / "data" / "movielens" / "ml-100k"


def run_json(args: list[str]) -> dict:
    """Run ``python <args>`` in the repo and parse the JSON line it ends with."""
    out = subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def device() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu}"
    return f"{card}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=["sample", "ml-100k"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--results", default=str(REPO / "bench" / "results.jsonl"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for batch.train, e.g. epochs=20")
    a = ap.parse_intermixed_args()

    if a.dataset == "sample":
        args = ["-m", "batch.evaluate"]
        config = "sample log, committed tiny checkpoint (data/samples/checkpoint)"
    else:
        if not (ML_DIR / "events.parquet").exists():
            subprocess.run([sys.executable, "-m", "batch.datasets.movielens", "--out", str(ML_DIR)], cwd=REPO,
                           check=True)
        scratch = tempfile.mkdtemp(prefix="mtgr-ml100k-")
        args = ["-m", "batch.train", f"model={a.preset}", f"data_path={ML_DIR / 'events.parquet'}",
                f"out={scratch}/checkpoint", f"model_version=ml100k-{a.preset}", f"hydra.run.dir={scratch}/logs",
                *a.overrides]
        config = f"MovieLens-100k, preset {a.preset}" + (f", {' '.join(a.overrides)}" if a.overrides else "")
    commit = subprocess.run(["git", "rev-parse", "--short=8", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()  # the code that runs, not what HEAD is when it ends
    result = run_json(args)
    command = "python bench/model_quality.py " + " ".join(sys.argv[1:])
    rows = [dict(bench="model_quality", config=f"{config}; {result['users']} users", metric=f"{who}.{metric}",
                 value=value, unit="fraction", device=device(), commit=commit, command=command,
                 date=dt.date.today().isoformat())
            for who in ("model", "popularity") for metric, value in sorted(result[who].items())]
    with open(a.results, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows:
        print(f"{row['metric']:22s} {row['value']:.4f}")


if __name__ == "__main__":
    main()
