"""Exact exclusion of a user's already-seen items, inside the model.

The model keeps the token id of every cached context position in a paged buffer that mirrors vLLM's KV cache
(same slots, same block tables, 4 bytes per slot). When a request's last chunk is scored, its whole context is read
back through its block table and every item token in it is set to -inf in that request's logits row. This is exact
for any history length, survives chunked prefill and prefix caching (a reused block holds the same tokens, by its
hash), needs no logits processor (whose interface differs between vLLM's model runners) and leaves vLLM's output
work at the K returned logprobs per user.

In a step that does not use the cache (``HSTUMetadata.cached`` false) each request's whole context is the step's own
tokens, and :func:`mask_step_tokens` reads them directly.
"""

from __future__ import annotations

import torch

from .attention import HSTUMetadata


class PagedTokenIds:
    """Token ids per KV-cache slot; allocated on first use from the KV cache's own shape."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.block_size = 0

    def write(self, input_ids: torch.Tensor, md: HSTUMetadata, kv_cache: torch.Tensor) -> None:
        """Store this step's tokens at their cache slots (padding slots < 0 are skipped)."""
        num_blocks, _, block_size, _ = kv_cache.shape
        num_slots = num_blocks * block_size
        if self.ids is None or self.ids.numel() != num_slots + 1:
            # One extra slot at the end takes the padding rows' writes (no host sync on a boolean mask).
            self.ids = torch.zeros(num_slots + 1, dtype=torch.int32, device=kv_cache.device)
            self.block_size = block_size
        slots = md.slot_mapping.long()
        self.ids[torch.where(slots >= 0, slots, num_slots)] = input_ids[: md.num_tokens].to(torch.int32)

    def mask(self, logits: torch.Tensor, md: HSTUMetadata, item_offset: int) -> None:
        """Set ``logits[r, t] = -inf`` for every item token t in request r's context (rows = requests)."""
        assert self.ids is not None
        num_reqs, bs = logits.shape[0], self.block_size
        pos = torch.arange(md.max_seq_len, device=logits.device)
        table = md.block_table[:num_reqs].long()
        page = (pos // bs).clamp(max=table.shape[1] - 1).expand(num_reqs, -1)
        tokens = self.ids[torch.gather(table, 1, page) * bs + pos % bs].long()  # (R, max_seq_len)
        hit = (pos[None, :] < md.seq_lens[:num_reqs, None]) & (tokens >= item_offset)
        # Misses scatter onto column 0 (the PAD token), which compute_logits has already set to -inf.
        logits.scatter_(1, torch.where(hit, tokens, 0), float("-inf"))


def mask_step_tokens(logits: torch.Tensor, input_ids: torch.Tensor, md: HSTUMetadata, item_offset: int) -> None:
    """Set ``logits[r, t] = -inf`` for every item token t among request r's tokens of this step (rows = requests)."""
    n = md.num_tokens
    tokens = input_ids[:n].long()
    req = torch.searchsorted(md.query_start_loc[1:], torch.arange(n, device=logits.device), right=True)
    # Non-item tokens go to column 0 (the PAD token), which compute_logits has already set to -inf.
    logits.index_put_((req, torch.where(tokens >= item_offset, tokens, 0)), logits.new_full((), float("-inf")))
