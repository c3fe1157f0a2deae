"""The native PyTorch engine: jagged batches packed by a token budget, exact top-K on the model's item head.

The per-batch loop never waits for the GPU on its own account: a shard's tokens and offsets go to the device once
(pinned, asynchronous), batches are views of them, every batch's top-K stays on the device and the whole shard's
results come back in one copy at the end. (``MTGR.forward`` still reads the batch's longest sequence on the host,
which is the one wait per batch left; it only waits for the previous batch's kernels.)

Batch sizes come from the token budget and from free memory: at each shard's start the engine reads how much memory
the device has free and cuts batches so that the model's estimate of a batch's peak (batch.model.memory: tokens x
layer activations + users x item logits) fits ``memory_fraction`` of it. Results do not depend on the cut.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from batch.config import Device, TorchEngineConfig
from batch.engines.base import TopK, UserBatch
from batch.errors import ConfigError
from batch.model import Checkpoint
from batch.model.memory import BatchMemory, scoring_batch_memory

# Extra top-K candidates taken so that a tie at the K-th score is settled without a full sort (see candidate_topk).
# In bf16 over ~1M items a tie at the K-th score is common (about K/20 items share one bf16 value there), so the
# default is max(MIN_TIE_SLACK, K); a row whose tie runs past the slack falls back to a full sort at the end.
MIN_TIE_SLACK = 64
# Memory left out of every batch budget: CUDA/cuBLAS workspaces, allocator rounding, the PyTorch attention
# reference's padded score chunks (bounded in size, not per token).
RESERVE_BYTES = 1 << 30
GIB = float(1 << 30)
CGROUP_DIR = "/sys/fs/cgroup"  # the job's own cgroup (v2) as a container sees it
log = logging.getLogger("batch.engines.torch")


class TorchEngine:
    """Runs ``model(tokens, offsets, last_only=True)`` and ``model.item_logits`` at each user's last position."""

    def __init__(self, cfg: TorchEngineConfig, checkpoint: Checkpoint):
        self.device = resolve_device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype.value)
        self.batch_tokens = cfg.batch_tokens
        self.memory_fraction = cfg.memory_fraction
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.batch_memory = scoring_batch_memory(checkpoint.config, self.itemsize)
        self.model = checkpoint.model.to(self.device, self.dtype).eval()
        self.model.embed.build_table()  # the cached embedding table must live on the new device and dtype
        self.item_offset = checkpoint.layout.item_offset
        self.num_items = checkpoint.config.num_items
        self.tie_slack: int | None = None  # None: max(MIN_TIE_SLACK, k); tests set it small to force the fallback
        self.warm_up(checkpoint.config.max_seq_len)
        self._check_memory(checkpoint.config.max_seq_len)

    def warm_up(self, max_seq_len: int) -> None:
        """Score small dummy batches once, so that Triton's kernel compilation and the first CUDA allocations
        happen while the engine starts and not inside the first shard (see bench/RESULTS.md, issue 6: the H100
        runs point to several seconds of such one-time work per run). Triton compiles a kernel again for a row
        count that is 1, a multiple of 16 or neither; the batches cover all three, for every layer (T tokens) and
        for the last one (B users)."""
        for lengths in ([64, 33], [2] * 16, [17]):  # (T, B) = (97, 2), (32, 16), (17, 1)
            lengths = [min(max_seq_len, n) for n in lengths]
            tokens = self.item_offset + np.arange(sum(lengths), dtype=np.int64) % self.num_items
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            users = pa.array(np.arange(len(lengths), dtype=np.int64))
            self.score(UserBatch(users, tokens, offsets), min(10, self.num_items), True)

    def batch_budget(self, reserved: int = 0) -> int | None:
        """Bytes one batch may use now: ``memory_fraction`` of the free memory less RESERVE_BYTES and ``reserved``
        (what the caller is about to put on the device); None where free memory is unknown (no bound)."""
        free = free_memory(self.device)
        if free is None:
            return None
        return max(0, int((free - RESERVE_BYTES - reserved) * self.memory_fraction))

    def resident_bytes(self, batch: UserBatch, k: int) -> int:
        """Device bytes held for a whole ``score`` call beside its batches: the shard's token and offset vectors
        and, per user, the kept last-position rows and the k (+ slack) candidate results."""
        per_user = 2 * self.model.config.d_model * self.itemsize + 24 * (k + MIN_TIE_SLACK)
        return batch.tokens.nbytes + batch.offsets.nbytes + len(batch) * per_user

    def _check_memory(self, max_seq_len: int) -> None:
        """Fail at start, not in the first shard, if one user of the checkpoint's longest length cannot fit."""
        budget, cost = self.batch_budget(), self.batch_memory
        if budget is None:
            log.info("torch engine: free memory on %s unknown; batches are cut by engine.batch_tokens=%d only",
                     self.device, self.batch_tokens)
            return
        need = cost.bytes(max_seq_len, 1)
        if need > budget:
            raise ConfigError(f"engine.memory_fraction={self.memory_fraction} of the memory free on {self.device} "
                              f"allows {budget / GIB:.2f} GiB per batch, but one user of max_seq_len={max_seq_len} "
                              f"tokens needs about {need / GIB:.2f} GiB (item logits over {self.num_items:,} items "
                              "included): raise engine.memory_fraction or free the device")
        tokens = min(self.batch_tokens, (budget - cost.per_user) // cost.per_token)
        log.info("torch engine: a batch may use %.2f GiB on %s (%.0f%% of free memory less %.0f GiB reserve): at "
                 "most %d tokens (engine.batch_tokens=%d) and %d users of one token; %.1f KiB per token, %.1f MiB "
                 "per user", budget / GIB, self.device, 100 * self.memory_fraction, RESERVE_BYTES / GIB, tokens,
                 self.batch_tokens, budget // (cost.per_user + cost.per_token), cost.per_token / 1024,
                 cost.per_user / 2**20)

    @torch.inference_mode()
    def score(self, batch: UserBatch, top_k: int, exclude_seen: bool) -> TopK:
        """Top-K items of every user; the result is the same for any batch cut (see Engine.score)."""
        k = min(top_k, self.num_items)
        items = np.full((len(batch), top_k), -1, dtype=np.int64)
        scores = np.full((len(batch), top_k), -np.inf, dtype=np.float32)
        ranges = pack_batches(batch.lengths, self.batch_tokens, self.batch_memory,
                              self.batch_budget(self.resident_bytes(batch, k)))
        if ranges and k > 0:
            scores[:, :k], items[:, :k] = self._top_k(batch, ranges, k, exclude_seen)
        items[~np.isfinite(scores)] = -1  # fewer than k eligible items: leave the slot empty
        scores[items < 0] = -np.inf
        return TopK(items, scores)

    def _top_k(self, batch: UserBatch, ranges: list[tuple[int, int]], k: int,
               exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32, items int64), both (B, k), of every user in ``ranges`` order (all of ``batch``).

        Ties: each batch takes ``k + slack`` candidates and knows on the device whether they settle its rows
        exactly (candidate_topk). Rows they don't settle are fixed here at the end, after the one copy to the host,
        by recomputing their batch's logits from the kept last-position hidden states: ``item_logits`` of the very
        same (B_i, d) tensor, so the same GEMM shape and inputs give the same bits, and the same mask. This keeps
        the loop free of a host sync for the tie check and costs nothing when no row needs it; a full-vocabulary
        branch-free fix for every row (sorting or re-ranking [B, N] keys) would cost several extra passes per batch.
        """
        slack = max(MIN_TIE_SLACK, k) if self.tie_slack is None else self.tie_slack
        host_offsets = np.asarray(batch.offsets)
        tokens_all, tokens_host = self._to_device(batch.tokens)
        offsets_all, offsets_host = self._to_device(batch.offsets)
        kept: list[_Kept] = []
        values, index, exact = [], [], []
        for start, stop in ranges:
            lo = int(host_offsets[start])
            tokens = tokens_all[lo: int(host_offsets[stop])]  # views: no copy, no host round trip
            offsets = offsets_all[start: stop + 1] - lo
            longest = int(np.diff(host_offsets[start: stop + 1]).max())  # from the host: no device sync
            last = self.model(tokens, offsets, max_len=longest, last_only=True)
            batch_values, batch_index, batch_exact = candidate_topk(self._logits(last, tokens, offsets, exclude_seen),
                                                                    k, slack)
            values.append(batch_values)
            index.append(batch_index)
            exact.append(batch_exact)
            kept.append(_Kept(start, stop, tokens, offsets, last))
        # bf16/fp16 -> float32 is exact and order preserving: converting only the k selected scores equals
        # selecting on a float32 copy of the logits.
        host_values, host_index, host_exact = self._to_host(torch.cat(values).float(), torch.cat(index),
                                                            torch.cat(exact))
        del tokens_host, offsets_host  # pinned sources: the copies are certainly done after the sync in _to_host
        if not host_exact.all():
            for part in kept:
                rows = np.flatnonzero(~host_exact[part.start: part.stop])
                if not len(rows):
                    continue
                logits = self._logits(part.last, part.tokens, part.offsets, exclude_seen)
                # A row's sort holds a copy, the sorted values and int64 indices: (2 * itemsize + 8) bytes per item
                # against the itemsize its logits row has. Sorting that many fewer rows at a time keeps the
                # fallback inside the batch's memory estimate (logits + as much again per user).
                step = max(1, (part.stop - part.start) * self.itemsize // (2 * self.itemsize + 8))
                for lo in range(0, len(rows), step):
                    some = rows[lo: lo + step]
                    fixed = torch.sort(logits[torch.from_numpy(some).to(self.device)], dim=1, descending=True,
                                       stable=True)
                    host_values[part.start + some] = fixed.values[:, :k].float().cpu().numpy()
                    host_index[part.start + some] = fixed.indices[:, :k].cpu().numpy()
        return host_values, host_index

    def _logits(self, last: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor,
                exclude_seen: bool) -> torch.Tensor:
        """Item logits (B, num_items) in the model dtype, seen items at -inf when ``exclude_seen``."""
        logits = self.model.item_logits(last)
        if exclude_seen:
            mask_seen_items(logits, tokens, offsets, self.item_offset)
        return logits

    def _to_device(self, array: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(device tensor, its pinned host source or None): on CUDA an asynchronous copy from pinned memory.

        The caller keeps the pinned source alive until it has synchronised with the stream (the caching host
        allocator would also hold the block until the copy is done, but we don't rely on that).
        """
        host = torch.from_numpy(array)
        if self.device.type != "cuda":
            return host.to(self.device), None
        pinned = host.pin_memory()
        return pinned.to(self.device, non_blocking=True), pinned

    def _to_host(self, *tensors: torch.Tensor) -> list[np.ndarray]:
        """NumPy copies of device tensors, with a single wait for the stream on CUDA."""
        if self.device.type != "cuda":
            return [t.numpy().copy() for t in tensors]
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return [h.numpy().copy() for h in host]  # plain memory: pinned blocks go back to the allocator

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass
class _Kept:
    """What a batch's logits are recomputed from if a row's tie needs the full sort."""

    start: int
    stop: int
    tokens: torch.Tensor
    offsets: torch.Tensor
    last: torch.Tensor  # the exact (B_i, d) input of item_logits


def resolve_device(device: Device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a config error."""
    if device == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("engine.device=cuda but no CUDA device is available: expected one of [auto, cpu]")
    return torch.device(device.value)


def free_memory(device: torch.device) -> int | None:
    """Bytes new tensors can take on ``device``: on CUDA the driver's free memory plus what PyTorch's caching
    allocator holds unused; on Linux CPU MemAvailable, or less if the job's cgroup (v2) limit leaves less; None
    where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    available = None
    try:
        with open("/proc/meminfo") as f:
            available = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
        with open(os.path.join(CGROUP_DIR, "memory.max")) as f:
            limit = f.read().strip()
        with open(os.path.join(CGROUP_DIR, "memory.current")) as f:
            used = int(f.read())
        if limit != "max":  # a container's limit: the host's MemAvailable does not see it
            available = min(available if available is not None else 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def pack_batches(lengths: np.ndarray, max_tokens: int, cost: BatchMemory | None = None,
                 max_bytes: int | None = None) -> list[tuple[int, int]]:
    """Consecutive user ranges of at most ``max_tokens`` tokens and, given ``cost`` and ``max_bytes``, at most
    ``max_bytes`` estimated bytes (a user that alone exceeds either gets a batch of its own)."""
    bounded = cost is not None and max_bytes is not None
    ranges, start, used = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if i > start and (used + n > max_tokens or (bounded and cost.bytes(used + n, i + 1 - start) > max_bytes)):
            ranges.append((start, i))
            start, used = i, 0
        used += n
    if start < len(lengths):
        ranges.append((start, len(lengths)))
    return ranges


def mask_seen_items(logits: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor, item_offset: int) -> None:
    """Set ``logits[b, i] = -inf`` for every item token ``item_offset + i`` in user b's own sequence.

    Without a host sync: no boolean indexing and a known output size. Every token takes part; an item token
    lowers its cell to -inf, any other token "lowers" cell (b, 0) to +inf, which leaves it as it was, bit for bit.
    A min is order independent, so concurrent updates of one cell give the same result on the GPU.
    """
    user = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=tokens.device), offsets.diff(),
                                   output_size=len(tokens))
    is_item = tokens >= item_offset
    column = torch.where(is_item, tokens - item_offset, 0)
    src = torch.full(tokens.shape, float("inf"), dtype=logits.dtype, device=logits.device)
    src.masked_fill_(is_item, float("-inf"))
    logits.view(-1).scatter_reduce_(0, user * logits.shape[1] + column, src, reduce="amin")


def candidate_topk(logits: torch.Tensor, k: int, slack: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, index) (B, k) ordered by (score desc, index asc) and ``exact`` (B,): rows where they are the true
    top-k under that order (ties at the k-th score to lower indices). No host sync, in the logits' dtype.

    Takes ``c = min(k + slack, N)`` candidates, the top-c of each row in any tie order. If the k-th candidate
    score ``v`` is above the c-th ``w`` (or c = N), every item scoring >= v is among the candidates (topk keeps all
    items above its smallest selected score), so sorting the candidates by (score desc, index asc) puts the true
    top-k first. Otherwise the tie at v may reach past the candidates and the row needs a full sort.
    """
    c = min(k + slack, logits.shape[1])
    values, index = torch.topk(logits, c, dim=1, sorted=False)
    order = index.argsort(dim=1)  # canonical order inside the candidates: index asc (indices are distinct)...
    index, values = index.gather(1, order), values.gather(1, order)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices  # ...then score desc, stable
    index, values = index.gather(1, order), values.gather(1, order)
    if c == logits.shape[1]:
        exact = torch.ones(len(logits), dtype=torch.bool, device=logits.device)
    else:
        exact = values[:, k - 1] > values[:, c - 1]
    return values[:, :k], index[:, :k], exact


def deterministic_topk(logits: torch.Tensor, k: int, slack: int = MIN_TIE_SLACK) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row ordered by (score desc, index asc); ties at the k-th score go to lower indices.

    The one-call form of candidate_topk with the full-sort fallback applied at once (a host sync).
    """
    values, index, exact = candidate_topk(logits, k, slack)
    if not bool(exact.all()):  # rare: settle those rows with a full stable sort
        tied = ~exact
        full = torch.sort(logits[tied], dim=1, descending=True, stable=True)
        values[tied], index[tied] = full.values[:, :k], full.indices[:, :k]
    return values, index
