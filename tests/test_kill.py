"""Kill a writing process with a real signal: nothing partial becomes visible and a rerun publishes everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
DAY = "2026-11-26"

# Writes `n` shards of 100 users through OutputWriter, announcing each, sleeping `pause` s between shards.
SLOW_WRITER = """
import sys, time, numpy as np, pyarrow as pa
from batch.config import OutputConfig
from batch.output import OutputWriter
root, n, pause, version = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
with OutputWriter(OutputConfig(path=root, top_k=5), "2026-11-26", version, "hash") as w:
    for s in range(n):
        users = np.arange(s * 100, (s + 1) * 100)
        w.write_shard(pa.table({"user_id": np.repeat(users, 5), "rank": np.tile(np.arange(1, 6, dtype=np.int16), 100),
                                "item_id": np.repeat(users, 5) * 7, "score": np.ones(500, np.float32)}))
        print("shard", s, flush=True)
        time.sleep(pause)
    w.publish({"shards": n, "version": version})
print("published", flush=True)
"""


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    env = env or {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def kill_after(proc: subprocess.Popen, marker: str, times: int, sig: signal.Signals) -> str:
    """Read the child's output until `marker` was seen `times` times, then send `sig`; return the output."""
    seen, lines = 0, []
    for line in proc.stdout:
        lines.append(line)
        seen += marker in line
        if seen >= times:
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, "".join(lines) + rest
    assert seen >= times, "the child ended before reaching the kill point:\n" + "".join(lines) + rest
    return "".join(lines) + rest


def visible_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_writer_leaves_previous_output(tmp_path: Path, sig: signal.Signals) -> None:
    root = tmp_path / "recs"
    writer = [sys.executable, "-c", SLOW_WRITER, str(root)]
    assert start([*writer, "2", "0", "v1"]).wait(timeout=120) == 0
    published = (root / f"dt={DAY}" / "part-0.parquet").read_bytes()
    manifest = tmp_path / "recs_manifests" / f"dt={DAY}" / "manifest.json"
    assert json.loads(manifest.read_text())["version"] == "v1"

    kill_after(start([*writer, "6", "0.3", "v2"]), "shard", 3, sig)  # dies mid-way, after 3 of 6 shards
    assert visible_files(root) == [f"dt={DAY}/part-0.parquet"]
    assert (root / f"dt={DAY}" / "part-0.parquet").read_bytes() == published
    assert json.loads(manifest.read_text())["version"] == "v1"
    assert pl.scan_parquet(root).select(pl.len()).collect().item() == 1000

    assert start([*writer, "6", "0", "v3"]).wait(timeout=120) == 0  # the rerun publishes everything
    df = pl.read_parquet(root)
    assert df.height == 3000 and df["user_id"].n_unique() == 600 and (df["model_version"] == "v3").all()
    assert visible_files(root) == [f"dt={DAY}/part-0.parquet"]
    assert json.loads(manifest.read_text())["version"] == "v3"
    assert not (tmp_path / ".recs.staging").exists()  # the killed run's staging was cleared by the rerun


def test_killed_job_leaves_previous_output_and_rerun_publishes_all(tmp_path: Path) -> None:
    """The real `python -m batch.run` on the sample log, killed by SIGKILL and by SIGTERM half-way."""
    from tests._sample_job import job_args, job_env, run_job, sample_checkpoint

    ckpt, logs, root = sample_checkpoint(tmp_path), tmp_path / "logs", tmp_path / "recs"
    part = root / "dt=2026-11-27" / "part-0.parquet"
    manifest = tmp_path / "recs_manifests" / "dt=2026-11-27" / "manifest.json"
    out = f"output.path={root}"
    run_job(ckpt, logs, out, "data.num_shards=2")
    first, first_manifest = part.read_bytes(), manifest.read_text()
    reference = pl.read_parquet(part).sort("user_id", "rank")
    assert reference["user_id"].n_unique() == json.loads(first_manifest)["users"]["scored"] > 0

    staged = lambda: sorted((tmp_path / ".recs.staging").glob("*/**/*.parquet"))  # noqa: E731
    for sig in (signal.SIGKILL, signal.SIGTERM):
        before = staged()
        proc = start(job_args(ckpt, out, "data.num_shards=24", "output.top_k=7"), env=job_env(logs))
        log = kill_after(proc, " done (", 4, sig)  # ProgressLog's line after the 4th of 24 shards
        assert proc.returncode in (-sig, 128 + sig), log[-3000:]  # died by the signal (or a handler's exit)
        assert visible_files(root) == ["dt=2026-11-27/part-0.parquet"]
        # SIGKILL leaves its staged file for the next publish to clear; SIGTERM unwinds and removes it at once
        assert len(staged()) == len(before) + (sig == signal.SIGKILL), log[-3000:]
        assert part.read_bytes() == first and manifest.read_text() == first_manifest

    run_job(ckpt, logs, out, "data.num_shards=24")
    again = pl.read_parquet(part).sort("user_id", "rank")
    assert visible_files(root) == ["dt=2026-11-27/part-0.parquet"]
    assert not (tmp_path / ".recs.staging").exists()
    assert json.loads(manifest.read_text())["output"]["shards"] == 24
    # same users, same top-K as the 2-shard run: sharding changes batches, not results
    assert again.select("user_id", "rank", "item_id").equals(reference.select("user_id", "rank", "item_id"))
