"""batch.train and batch.evaluate: labels, metrics, determinism, and a checkpoint that loads."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from batch.evaluate import evaluate, rank_metrics, target_ranks
from batch.dataset import read_user_sequences
from batch.model import MTGRConfig, TokenLayout, load_checkpoint
from batch.model.checkpoint import content_hash
from batch.train import next_item_labels, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_log(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("log") / "events"
    subprocess.run([sys.executable, str(ROOT / "data" / "samples" / "generate.py"), "--users", "40", "--out", str(out)],
                   check=True, capture_output=True)
    return str(out)


def train_config(log: str, out: str):
    overrides = [f"data_path={log}", f"out={out}", "epochs=2", "batch_tokens=2048", "log_every=1000",
                 "model.arch.d_model=16", "model.arch.feature_dim=4", "model.arch.max_seq_len=128",
                 "hydra.run.dir=."]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_next_item_labels_point_at_the_next_events_item():
    cfg = MTGRConfig(num_items=10, max_seq_len=64)
    lay = TokenLayout(cfg)
    i, a = lay.item_offset, lay.action_offset
    tokens = np.array([i + 3, a, i + 5, a + 1, 1, a,  i + 7, a])  # user 0: 3 events (last OOV), user 1: 1 event
    offsets = np.array([0, 6, 8])
    assert next_item_labels(tokens, offsets, lay).tolist() == [-1, 5, -1, -1, -1, -1, -1, -1]


def test_rank_metrics_by_hand():
    got = rank_metrics(np.array([1, 3, 0, 60]))
    assert got["hr@10"] == 0.5 and got["hr@50"] == 0.5
    assert math.isclose(got["ndcg@10"], (1 + 1 / math.log2(4)) / 4)
    assert math.isclose(got["mrr"], (1 + 1 / 3 + 1 / 60) / 4)


def test_target_ranks_exclude_seen_items_and_miss_unrankable_targets():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    seen = [np.array([0]), np.array([3]), np.array([2])]
    # user 0: item 0 seen, so item 2 ranks 2nd; user 1: target unknown (-1); user 2: target is a seen item.
    assert target_ranks(scores, seen, np.array([2, -1, 2])).tolist() == [2, 0, 0]


def test_training_is_deterministic_on_cpu_and_writes_a_loadable_checkpoint(small_log, tmp_path):
    results = [train(train_config(small_log, str(tmp_path / f"ck{i}"))) for i in range(2)]
    assert content_hash(str(tmp_path / "ck0")) == content_hash(str(tmp_path / "ck1"))
    assert results[0] == results[1] and results[0]["users"] == 40
    assert set(results[0]["model"]) == {"hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr"}
    ckpt = load_checkpoint(str(tmp_path / "ck0"))
    assert ckpt.config.d_model == 16 and ckpt.config.num_items == len(ckpt.items)
    again = evaluate(ckpt.model, ckpt.items, read_user_sequences(small_log, ckpt.config))
    assert again == results[0]  # batch.evaluate on the saved checkpoint reproduces the trainer's own numbers
