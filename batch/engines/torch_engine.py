"""The native PyTorch engine: jagged batches packed by a token budget, exact top-K on the model's item head."""

from __future__ import annotations

import numpy as np
import torch

from batch.config import Device, TorchEngineConfig
from batch.engines.base import TopK, UserBatch
from batch.errors import ConfigError
from batch.model import Checkpoint


class TorchEngine:
    """Runs ``hidden = model(tokens, offsets)`` and ``model.item_logits`` at each user's last position."""

    def __init__(self, cfg: TorchEngineConfig, checkpoint: Checkpoint):
        self.device = resolve_device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype.value)
        self.batch_tokens = cfg.batch_tokens
        self.model = checkpoint.model.to(self.device, self.dtype).eval()
        self.model.embed.build_table()  # the cached embedding table must live on the new device and dtype
        self.item_offset = checkpoint.layout.item_offset
        self.num_items = checkpoint.config.num_items

    @torch.inference_mode()
    def score(self, batch: UserBatch, top_k: int, exclude_seen: bool) -> TopK:
        """Top-K items of every user; the result is the same for any token budget (see Engine.score)."""
        k = min(top_k, self.num_items)
        items = np.full((len(batch), top_k), -1, dtype=np.int64)
        scores = np.full((len(batch), top_k), -np.inf, dtype=np.float32)
        for start, stop in pack_by_tokens(batch.lengths, self.batch_tokens):
            sub = batch.select(slice(start, stop))
            tokens = torch.from_numpy(sub.tokens).to(self.device)
            offsets = torch.from_numpy(sub.offsets).to(self.device)
            hidden = self.model(tokens, offsets)
            logits = self.model.item_logits(hidden[self.model.last_positions(offsets)]).float()
            if exclude_seen:
                mask_seen_items(logits, tokens, offsets, self.item_offset)
            top_scores, top_items = deterministic_topk(logits, k)
            items[start:stop, :k] = top_items.cpu().numpy()
            scores[start:stop, :k] = top_scores.cpu().numpy()
        items[~np.isfinite(scores)] = -1  # fewer than k eligible items: leave the slot empty
        scores[items < 0] = -np.inf
        return TopK(items, scores)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def resolve_device(device: Device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a config error."""
    if device == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("engine.device=cuda but no CUDA device is available: expected one of [auto, cpu]")
    return torch.device(device.value)


def pack_by_tokens(lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive user ranges whose total tokens fit ``budget`` (a longer user gets a batch of its own)."""
    ranges, start, used = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if i > start and used + n > budget:
            ranges.append((start, i))
            start, used = i, 0
        used += n
    if start < len(lengths):
        ranges.append((start, len(lengths)))
    return ranges


def mask_seen_items(logits: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor, item_offset: int) -> None:
    """Set ``logits[b, i] = -inf`` for every item token ``item_offset + i`` in user b's own sequence."""
    user = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=tokens.device), offsets.diff())
    is_item = tokens >= item_offset
    logits[user[is_item], tokens[is_item] - item_offset] = float("-inf")


def deterministic_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row ordered by (score desc, index asc); ties at the k-th score go to lower indices."""
    values, index = torch.topk(logits, k, dim=1)
    order = index.argsort(dim=1)  # canonical order inside the selected set
    index, values = index.gather(1, order), values.gather(1, order)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    index, values = index.gather(1, order), values.gather(1, order)
    tied = (logits >= values[:, -1:]).sum(dim=1) > k  # more candidates than slots at the k-th score
    if tied.any():  # rare: settle those rows with a full stable sort
        full = torch.sort(logits[tied], dim=1, descending=True, stable=True)
        values[tied], index[tied] = full.values[:, :k], full.indices[:, :k]
    return values, index
