"""The MTGR model: mixed-type token embeddings, HSTU layers with Group-LayerNorm, an item-only head.

Follows MTGR (arXiv 2505.18654) and HSTU (arXiv 2402.17152). Each layer:
    h = GroupLN(x);  u, v, q, k = silu(W h)
    a = sum_j silu(alpha * q.k_j + rab(i - j)) / n_i * v_j      (causal; n_i = keys row i sees)
    x = x + W_o(GroupLN(a) * u)
The attention, Group-LayerNorm (the second one fused with the gate u), the U/V/Q/K projection with its SiLU and
the output projection with the residual add are functions of ``kernels`` (Triton on CUDA, PyTorch elsewhere); the
vLLM engine reuses these modules and passes its own attention (paged, or jagged on its cache-free steps).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import group_layer_norm, hstu_attention, linear_add, linear_silu

from .config import MTGRConfig
from .tokens import GROUP_ACTION, GROUP_ITEM, GROUP_PROFILE, NUM_GROUPS, TokenLayout

# attend(layer_index, q, k, v, rel_bias) -> (T, H, D); q, k, v: (T, H, D); rel_bias: (H, R) by distance
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GroupLayerNorm(nn.Module):
    """LayerNorm with separate affine parameters per token group (profile, item, action)."""

    def __init__(self, dim: int, num_groups: int = NUM_GROUPS, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_groups, dim))
        self.bias = nn.Parameter(torch.zeros(num_groups, dim))

    def forward(self, x: torch.Tensor, groups: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """(LN(x) * weight[groups] + bias[groups]) * gate (gate optional): one fused Triton pass on CUDA without
        autograd, the plain PyTorch ops otherwise (see kernels.group_layer_norm)."""
        return group_layer_norm(x, groups, self.weight, self.bias, self.eps, gate=gate)


def relative_buckets(max_distance: int, num_buckets: int) -> torch.Tensor:
    """Bucket of each distance 0..max_distance: exact below num_buckets // 2, log-spaced up to max_distance
    (the last bucket). Longer distances share the last bucket, so bias tables stop at max_distance."""
    exact = num_buckets // 2
    d = torch.arange(max_distance + 1, dtype=torch.float64, device="cpu")  # real values in a meta-built model
    log_part = exact + torch.floor(torch.log(d.clamp(min=exact) / exact) / math.log(max_distance / exact)
                                   * (num_buckets - 1 - exact))
    return torch.where(d < exact, d, log_part).clamp(max=num_buckets - 1).long()


class HSTULayer(nn.Module):
    """One HSTU block as MTGR stacks it."""

    def __init__(self, cfg: MTGRConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.alpha = 1.0 / math.sqrt(cfg.head_dim)
        self.norm_in = GroupLayerNorm(d)
        self.uvqk = nn.Linear(d, 4 * d)
        self.norm_attn = GroupLayerNorm(d)
        self.out = nn.Linear(d, d)
        self.rel_bias = nn.Parameter(torch.zeros(cfg.num_heads, cfg.rel_pos_buckets))
        self.dropout = cfg.dropout
        self.register_buffer("buckets", relative_buckets(cfg.rel_pos_max_distance, cfg.rel_pos_buckets),
                             persistent=False)

    def rel_bias_table(self) -> torch.Tensor:
        """(H, rel_pos_max_distance + 1) float32 bias by relative distance |i - j| (the kernels clamp longer
        distances to the last column)."""
        return self.rel_bias[:, self.buckets].float()

    def forward(self, x: torch.Tensor, groups: torch.Tensor, attend: Callable[..., torch.Tensor],
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(T, d) -> (T, d). With ``rows`` (indices) only those rows are needed: the attention still reads every
        key (``attend`` must return those rows right), everything after it runs on them, and the result is
        (len(rows), d). Scoring uses this in the last layer, where only each user's last position matters."""
        t, d = x.shape
        # silu(uvqk(.)) as one GEMM with the bias and SiLU in its epilogue on CUDA (no second pass over (T, 4d))
        u, v, q, k = linear_silu(self.norm_in(x, groups), self.uvqk.weight, self.uvqk.bias).split(d, dim=-1)
        shape = (t, self.num_heads, self.head_dim)
        a = attend(q.reshape(shape), k.reshape(shape), v.reshape(shape), self.rel_bias_table()).reshape(t, d)
        if rows is not None:
            a, u, groups, x = a[rows], u[rows], groups[rows], x[rows]
        y = self.norm_attn(a, groups, gate=u)
        return linear_add(F.dropout(y, self.dropout, self.training), self.out.weight, self.out.bias, x)


class MixedTypeEmbedding(nn.Module):
    """Token -> d_model vector. Item tokens fuse item id and item category embeddings with an MLP;
    action tokens decode their mixed-radix features and fuse flag, watch-percentage, watch-duration and
    time-gap embeddings with an MLP; profile and special tokens have a plain embedding."""

    def __init__(self, cfg: MTGRConfig):
        super().__init__()
        self.layout = lay = TokenLayout(cfg)
        d, f = cfg.d_model, cfg.feature_dim
        self.item = nn.Embedding(cfg.num_items, d)  # tied with the output head
        self.category = nn.Embedding(cfg.num_categories + 1, f)  # row 0 = unknown / no category
        self.register_buffer("item_category", torch.zeros(cfg.num_items, dtype=torch.long))
        self.item_mlp = nn.Sequential(nn.Linear(d + f, d), nn.SiLU(), nn.Linear(d, d))
        self.flags = nn.Embedding(lay.flag_radix, f)
        self.pct = nn.Embedding(lay.pct_radix, f)
        self.dur = nn.Embedding(lay.dur_radix, f)
        self.gap = nn.Embedding(lay.gap_radix, f)
        self.action_mlp = nn.Sequential(nn.Linear(4 * f, d), nn.SiLU(), nn.Linear(d, d))
        self.other = nn.Embedding(lay.action_offset, d)  # specials + profile tokens
        nn.init.normal_(self.item.weight, std=d ** -0.5)
        self.table: torch.Tensor | None = None  # (vocab_size, d_model) cache for inference

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Fused embedding (N, d_model) of each token, computed from its features."""
        lay = self.layout
        is_item = tokens >= lay.item_offset
        is_action = (tokens >= lay.action_offset) & ~is_item

        item_idx = (tokens - lay.item_offset).clamp(min=0) * is_item
        item_x = self.item_mlp(torch.cat([self.item(item_idx), self.category(self.item_category[item_idx])], -1))

        code = (tokens - lay.action_offset).clamp(min=0) * is_action
        gap, code = code % lay.gap_radix, code // lay.gap_radix
        dur, code = code % lay.dur_radix, code // lay.dur_radix
        pct, bits = code % lay.pct_radix, code // lay.pct_radix
        action_x = self.action_mlp(torch.cat([self.flags(bits), self.pct(pct), self.dur(dur), self.gap(gap)], -1))

        other_x = self.other(torch.where(is_item | is_action, torch.zeros_like(tokens), tokens))
        return torch.where(is_item[:, None], item_x, torch.where(is_action[:, None], action_x, other_x))

    def groups(self, tokens: torch.Tensor) -> torch.Tensor:
        """Group id (profile, item, action) of each token, for Group-LayerNorm."""
        lay = self.layout
        groups = torch.full_like(tokens, GROUP_ITEM)
        groups = torch.where((tokens >= lay.profile_offset) & (tokens < lay.action_offset), GROUP_PROFILE, groups)
        return torch.where((tokens >= lay.action_offset) & (tokens < lay.item_offset), GROUP_ACTION, groups)

    @torch.no_grad()
    def build_table(self, chunk: int = 1 << 16) -> None:
        """Precompute every token's embedding, ``chunk`` tokens at a time: inference then embeds by a single lookup.

        In one piece, the features and MLP activations of the whole vocabulary peaked at 6.1 tables' worth (5.9 GiB
        for DLRMv3-like's 1M items in bf16 on an H100; bench/table_memory.py), in every engine at start-up; in
        chunks of 65,536 tokens, 1.4 tables: the table itself and one chunk's work."""
        weight = self.item.weight
        table = torch.empty(self.layout.vocab_size, weight.shape[1], device=weight.device, dtype=weight.dtype)
        for start in range(0, len(table), chunk):
            stop = min(len(table), start + chunk)
            table[start:stop] = self.embed_tokens(torch.arange(start, stop, device=weight.device))
        self.table = table

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (T, d_model) and group ids (T,) of flat tokens."""
        if self.table is not None and not self.training:
            return self.table[tokens], self.groups(tokens)
        unique, inverse = torch.unique(tokens, return_inverse=True)  # each distinct token's MLP runs once
        return self.embed_tokens(unique)[inverse], self.groups(tokens)


class MTGR(nn.Module):
    """The MTGR encoder over jagged batches of token sequences, with next-item scores over items only."""

    def __init__(self, cfg: MTGRConfig):
        super().__init__()
        self.config = cfg
        self.embed = MixedTypeEmbedding(cfg)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)

    def encode(self, tokens: torch.Tensor, attend: Attend, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (T, d_model) of flat tokens, before the final norm (``item_logits`` applies it to the
        rows it scores); ``attend`` supplies the attention per layer. With ``rows``, the last layer computes only
        those rows (see HSTULayer.forward) and the result is (len(rows), d_model)."""
        x, groups = self.embed(tokens)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, groups, lambda q, k, v, bias, i=i: attend(i, q, k, v, bias), rows if i == last else None)
        return x

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor, max_len: int | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Hidden states (T, d_model) of a jagged batch (see ``encode``): sequence b is
        ``tokens[offsets[b]:offsets[b+1]]``. ``last_only``: only each sequence's last position, (B, d_model) —
        the last layer then skips the attention rows, norms and projection that scoring never reads.

        ``max_len`` (the longest sequence) may be passed by a caller that knows it, which saves a device sync."""
        if max_len is None:
            max_len = int((offsets[1:] - offsets[:-1]).max()) if len(offsets) > 1 else 0
        if max_len > self.config.max_seq_len:
            raise ValueError(f"sequence of {max_len} tokens exceeds max_seq_len {self.config.max_seq_len}")
        last = len(self.layers) - 1

        def attend(i: int, q, k, v, bias):
            return hstu_attention(q, k, v, offsets, alpha=self.layers[i].alpha, rel_bias=bias, norm="visible",
                                  max_len=max_len, rows="last" if last_only and i == last else "all")

        return self.encode(tokens, attend, self.last_positions(offsets) if last_only else None)

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-item scores (N, num_items) of hidden states from ``forward``: the final norm, then the item head
        (tied item embeddings); column i is item token ``item_offset + i``. Scoring normalises only the rows it
        scores (one per user), not every position."""
        return self.final_norm(hidden) @ self.embed.item.weight.t()

    @staticmethod
    def last_positions(offsets: torch.Tensor) -> torch.Tensor:
        """Index of each sequence's last token, where its next-item scores are read."""
        return offsets[1:] - 1
