"""Device memory one scoring batch holds at its peak, counted from the architecture (like flops.py for FLOPs).

A batch of T tokens and B users, scored with ``MTGR.forward(..., last_only=True)`` and ``item_logits`` in
inference mode, keeps at most
    per token: the HSTU layer tensors alive at once: 8 * d values on the Triton path (the residual input, the
               U/V/Q/K projection (4d), the attention output, the gated norm and the new residual), up to 12 * d
               on the PyTorch path (F.linear's and F.silu's outputs side by side, the reference attention's
               output copies); plus the int64 token, group, user and scatter-index vectors and the seen-item
               mask's source values;
    per user:  the item logits (num_items values) and as much again for torch.topk / the tie-settling sort's
               scratch, plus the few d-wide last-position rows.
Weights, the embedding table and the shard's token vector live outside the batch and are not counted: the engine
sizes batches from the memory that is free once those are in place. The estimate is checked against the measured
peak on the GPU by bench/memory_check.py. The PyTorch attention reference also needs a fixed workspace (its
padded score chunks are bounded in size, not per token), which the engine keeps in reserve.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MTGRConfig

INT64 = 8


@dataclass(frozen=True)
class BatchMemory:
    """Bytes one scoring batch holds: ``per_token * tokens + per_user * users``."""

    per_token: int
    per_user: int

    def bytes(self, tokens: int, users: int) -> int:
        return self.per_token * tokens + self.per_user * users


def scoring_batch_memory(cfg: MTGRConfig, itemsize: int) -> BatchMemory:
    """Peak bytes of a scoring batch whose activations and logits are ``itemsize`` bytes per value."""
    d = cfg.d_model
    per_token = 12 * d * itemsize + 5 * INT64 + itemsize + 1  # layer tensors; ids, groups, user, index; mask
    per_user = 2 * cfg.num_items * itemsize + 4 * d * itemsize + 4 * INT64
    return BatchMemory(per_token, per_user)
