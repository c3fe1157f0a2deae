"""MTGR as a vLLM model: the model package's own layers, with vLLM's paged attention under them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available

from batch.model import MTGR

from . import compat
from .attention import HSTUAttention, HSTUMetadata
from .seen import PagedTokenIds, mask_step_tokens


class MTGRForItemScoring(nn.Module):
    """Next-item scores of each request's last position; logits are -inf outside the item token range.

    ``self.mtgr`` is the model package's :class:`MTGR` (embeddings, HSTU layers, final norm, item head); each HSTU
    layer runs with an :class:`HSTUAttention` as its ``attend``. With ``exclude_seen`` (the default; the engine
    flips it through :class:`MTGRWorkerExtension`) items in a request's own context are -inf too.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = vllm_config.model_config.hf_config.mtgr_config()
        self.mtgr = MTGR(cfg).eval()
        self.item_offset = self.mtgr.embed.layout.item_offset
        self.vocab_size = self.mtgr.embed.layout.vocab_size
        self.attn = nn.ModuleList(
            HSTUAttention(cfg.num_heads, cfg.head_dim, layer.alpha, layer.rel_bias_table().shape[1],
                          prefix=f"{prefix}attn.{i}", cache_config=vllm_config.cache_config,
                          rows="last" if i == cfg.num_layers - 1 else "all")
            for i, layer in enumerate(self.mtgr.layers))
        self.exclude_seen = True
        self.seen = PagedTokenIds()
        self._step: HSTUMetadata | None = None  # this step's batch, for compute_logits
        self._step_ids: torch.Tensor | None = None  # and its tokens

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mtgr.embed(input_ids)[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if inputs_embeds is not None:
            raise NotImplementedError("MTGR scores token prompts only (its groups come from the token ids)")
        self._step = self._metadata()
        kv_cache = compat.layer_kv_cache(self.attn[0])
        if self._step is not None and kv_cache.numel() == 0:  # profiling run: no cache yet
            self._step = None
        self._step_ids = input_ids
        if self._step is not None and self._step.cached and self.exclude_seen:
            self.seen.write(input_ids, self._step, kv_cache)
        x, groups = self.mtgr.embed(input_ids)
        # vLLM reads logits at each request's last row of the step (query_start_loc[1:] - 1): the last layer
        # computes only those rows (its attention backend computes only each request's last tile, see
        # HSTUAttention.rows) and writes them back into x; the other rows of the result are never read.
        rows = None if self._step is None else self._step.query_start_loc[1:] - 1
        last = len(self.attn) - 1
        for i, (layer, attn) in enumerate(zip(self.mtgr.layers, self.attn)):
            # The backend reads the bias from ``attn.rel_bias_table`` (the same table, built after loading).
            attend = lambda q, k, v, rel_bias, attn=attn: attn(q, k, v)  # noqa: E731
            if i == last and rows is not None:
                x[rows] = layer(x, groups, attend, rows)
            else:
                x = layer(x, groups, attend)
        return x  # before the final norm, which compute_logits applies to the scored rows only

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(N, vocab_size): item logits in the item columns, -inf elsewhere and on seen items."""
        # One (N, vocab) buffer: the item scores are written straight into its item columns (a strided output
        # that BLAS takes as is), so the head needs no second (N, num_items) tensor; at 1M items vLLM's warm-up
        # asks for ~1,000 rows at once.
        logits = hidden_states.new_empty((hidden_states.shape[0], self.vocab_size))
        logits[:, :self.item_offset] = float("-inf")
        torch.mm(self.mtgr.final_norm(hidden_states), self.mtgr.embed.item.weight.t(), out=logits[:, self.item_offset:])
        step, ids = self._step, self._step_ids
        self._step = self._step_ids = None
        if step is not None and self.exclude_seen:
            # Row r is request r of this step (padded requests, if any, come last and have no row).
            if hidden_states.shape[0] > step.num_reqs:
                raise RuntimeError(f"MTGR expects one logits row per request, got {hidden_states.shape[0]} rows "
                                   f"for {step.num_reqs} requests (speculative decoding and prompt logprobs "
                                   "are not supported)")
            if not step.cached:
                mask_step_tokens(logits, ids, step, self.item_offset)
            elif self.seen.ids is not None:
                self.seen.mask(logits, step, self.item_offset)
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's tensors carry MTGR's own state_dict names."""
        state = self.mtgr.state_dict()
        loaded = set()
        for name, tensor in weights:
            if name not in state:
                raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
            if state[name].shape != tensor.shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(state[name].shape)}")
            state[name].copy_(tensor)
            loaded.add(name)
        missing = sorted(set(state) - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks tensors {missing[:5]}")
        self.mtgr.embed.build_table()  # inference embeds by lookup
        for layer, attn in zip(self.mtgr.layers, self.attn):
            attn.rel_bias_table.copy_(layer.rel_bias_table())
        return {f"mtgr.{name}" for name in loaded}

    def _metadata(self) -> HSTUMetadata | None:
        """This step's attention metadata, or None in profiling / dummy runs."""
        if not is_forward_context_available():
            return None
        md = get_forward_context().attn_metadata
        if isinstance(md, list):
            md = md[0]
        if isinstance(md, dict):
            md = md.get(self.attn[0].layer_name)
        return md if isinstance(md, HSTUMetadata) else None


class MTGRWorkerExtension:
    """Mixed into vLLM's workers (``worker_extension_cls``): lets the engine switch seen-item exclusion."""

    def mtgr_set_exclude_seen(self, flag: bool) -> None:
        self.get_model().exclude_seen = bool(flag)
