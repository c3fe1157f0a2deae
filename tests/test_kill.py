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


def start(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            **kw)


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

    kill_after(start([*writer, "6", "0.5", "v2"]), "shard", 3, sig)  # dies mid-way, after 3 of 6 shards
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
