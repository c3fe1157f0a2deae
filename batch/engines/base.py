"""The engine interface: a jagged batch of users in, each user's top-K items out.

Every engine (the native PyTorch one, the vLLM one) implements :class:`Engine`. One engine is built per job run
and scores every shard; it owns the model and the device. Item columns are item indices ``i`` of the checkpoint's
ItemVocab (token ``item_offset + i``), so OOV, special, profile and action tokens can never be recommended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa


@dataclass
class UserBatch:
    """Users of one shard as flat tokens: user ``b`` owns ``tokens[offsets[b]:offsets[b+1]]``."""

    user_ids: pa.Array  # (B,) raw user ids, input type
    tokens: np.ndarray  # (T,) int64 token ids
    offsets: np.ndarray  # (B+1,) int64, offsets[0] = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, users: slice) -> "UserBatch":
        """A contiguous range of users as a batch of its own (offsets rebased to 0)."""
        start, stop, _ = users.indices(len(self))
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return UserBatch(self.user_ids[start:stop], self.tokens[lo:hi], self.offsets[start: stop + 1] - lo)


@dataclass
class TopK:
    """Each user's best items, best first: ``items[b, r]`` is an item index, ``scores[b, r]`` its score.

    A user with fewer than K eligible items has trailing entries ``items = -1, scores = -inf``.
    """

    items: np.ndarray  # (B, K) int64
    scores: np.ndarray  # (B, K) float32


class Engine(Protocol):
    """Scores users; built once per run by :func:`batch.engines.build_engine`."""

    def score(self, batch: UserBatch, top_k: int, exclude_seen: bool) -> TopK:
        """Top-K next items of every user in ``batch``, deterministic (ties -> lower item index first).

        With ``exclude_seen`` an item whose token occurs in the user's own sequence is never returned.
        The result must not depend on how the engine splits ``batch`` internally.
        """
        ...

    def close(self) -> None:
        """Release the device and any worker processes."""
        ...


def recommendations_table(user_ids: pa.Array, topk: TopK, item_ids: pa.Array) -> pa.Table:
    """Long rows ``(user_id, rank int16 1..K, item_id, score float32)``; empty slots (item -1) are left out."""
    num_users, k = topk.items.shape
    valid = topk.items >= 0
    user_index = np.repeat(np.arange(num_users), k).reshape(num_users, k)[valid]
    rank = np.tile(np.arange(1, k + 1, dtype=np.int16), (num_users, 1))[valid]
    return pa.table({
        "user_id": user_ids.take(pa.array(user_index, pa.int64())),
        "rank": pa.array(rank, pa.int16()),
        "item_id": item_ids.take(pa.array(topk.items[valid], pa.int64())),
        "score": pa.array(topk.scores[valid].astype(np.float32), pa.float32()),
    })
