"""Running the real ``python -m batch.run`` on the committed sample log, for the kill and S3 tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
SAMPLE_EVENTS = REPO / "data" / "samples" / "events"
SAMPLE_CHECKPOINT = REPO / "data" / "samples" / "checkpoint"
RUN_DATE = "2026-11-27"  # conf/data/sample.yaml's run date
# Every 20th user and short sequences keep one run at a few seconds on two cores (100 users, 12,000 events).
SMALL = ('data.filter="user_id % 20 = 0"', "data.max_seq_len=64")


def sample_checkpoint(scratch: Path) -> Path:
    """The committed sample checkpoint; until it exists, a random one with the ``tiny`` preset's architecture."""
    if (SAMPLE_CHECKPOINT / "config.json").exists():
        return SAMPLE_CHECKPOINT
    import pyarrow as pa
    import torch

    from batch.model import MTGR, ItemVocab, MTGRConfig, ProfileFeature, save_checkpoint

    path = scratch / "checkpoint"
    if (path / "config.json").exists():
        return path
    items = pl.scan_parquet(SAMPLE_EVENTS).group_by("video_id").agg(pl.col("category").first()) \
        .sort("video_id").collect()
    cfg = MTGRConfig(d_model=64, num_layers=2, num_heads=2, max_seq_len=1024, num_items=items.height,
                     num_categories=int(items["category"].max()) + 1, feature_dim=16,
                     profile_features=[ProfileFeature("age_group", 7)], model_version="random-for-tests")
    torch.manual_seed(0)
    model = MTGR(cfg)
    vocab = ItemVocab(pa.array(items["video_id"].to_numpy()), items["category"].to_numpy().astype(np.int64),
                      model.embed.layout.item_offset)
    save_checkpoint(str(path), model, vocab)
    return path


def job_args(checkpoint: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "batch.run", f"model.checkpoint={checkpoint}", "engine.device=cpu", *SMALL,
            *overrides]


def job_env(log_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a job subprocess: logs under ``log_dir``, two torch threads (the CI box has 2 cores)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "MTGR_LOG_DIR": str(log_dir),
            "OMP_NUM_THREADS": "2", "HYDRA_FULL_ERROR": "1", **extra}


def run_job(checkpoint: Path, log_dir: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """Run the job to completion; fail with its output if it exits non-zero."""
    proc = subprocess.run(job_args(checkpoint, *overrides), cwd=REPO, env=job_env(log_dir, **env),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
