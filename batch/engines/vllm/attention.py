"""Paged HSTU attention as a vLLM attention backend.

Each step writes the new K/V rows into vLLM's paged cache and reads every request's whole context back through its
block table, so chunked prefill and prefix caching see the same keys as a single full pass. The math is
``kernels.hstu_attention_paged`` (Triton on CUDA, PyTorch on CPU): causal pointwise SiLU attention normalised by
the number of visible keys (absolute position + 1) with a relative-position bias per head.

With chunked prefill and prefix caching both off, nothing ever reads the cache back: every request is prefilled
whole in one step and then finishes (the engine asks for one token). Such steps skip the cache and run the jagged
kernel (``kernels.hstu_attention``) on the step's own K/V, as the torch engine does: no K/V write (10 KB per token
on the DLRMv3-like shape) and no block-table reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from kernels import hstu_attention, hstu_attention_paged, write_kv_cache

from . import compat


@dataclass
class HSTUMetadata:
    """One step's batch as the kernel reads it; rows past ``num_reqs`` / ``num_tokens`` are padding."""

    num_reqs: int
    num_tokens: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # (num_reqs + 1,)
    seq_lens: torch.Tensor  # (num_reqs,) context length incl. this step's tokens
    block_table: torch.Tensor  # (num_reqs, max_blocks)
    slot_mapping: torch.Tensor  # (num_tokens,) cache slot of each new token, < 0 = padding
    # False: every request's whole context is in this step and no later step reads it (see the module docstring):
    # attention runs on the step's own K/V and nothing is written to the cache.
    cached: bool = True


def cache_is_read_back(vllm_config) -> bool:
    """Whether any step reads K/V that an earlier step wrote: a request's next chunk (chunked prefill) or another
    request sharing its prefix (prefix caching)."""
    return bool(vllm_config.scheduler_config.enable_chunked_prefill or vllm_config.cache_config.enable_prefix_caching)


class HSTUMetadataBuilder(AttentionMetadataBuilder[HSTUMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.cache_free = not cache_is_read_back(vllm_config)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HSTUMetadata:
        # Model Runner V2 passes these by keyword: keep the parameter names.
        m, r = common_attn_metadata, common_attn_metadata.num_reqs
        num_tokens = int(m.query_start_loc_cpu[r])
        return HSTUMetadata(num_reqs=r, num_tokens=num_tokens, max_seq_len=int(m.max_seq_len),
                            query_start_loc=m.query_start_loc[: r + 1], seq_lens=m.seq_lens[:r],
                            block_table=m.block_table_tensor[:r], slot_mapping=m.slot_mapping[:num_tokens],
                            cached=not (self.cache_free and self._all_fresh(m)))

    @staticmethod
    def _all_fresh(m: CommonAttentionMetadata) -> bool:
        """Every request's context starts in this step (host arrays only). Always so in a cache-free engine's
        scoring steps; vLLM's own warm-up also runs decode steps, which keep the cached path."""
        seq_lens = getattr(m, "seq_lens_cpu_upper_bound", None)  # exact for prefill rows
        if seq_lens is None:
            return False
        qsl = m.query_start_loc_cpu[: m.num_reqs + 1]
        return bool((seq_lens[: m.num_reqs] == qsl[1:] - qsl[:-1]).all())


class HSTUAttentionImpl(AttentionImpl[HSTUMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto", logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None, **unused) -> None:
        if attn_type != AttentionType.DECODER or sliding_window is not None or alibi_slopes is not None:
            raise NotImplementedError("HSTU attention is causal decoder attention only")
        if num_kv_heads not in (None, num_heads):
            raise NotImplementedError("HSTU attention has as many K/V heads as query heads")
        self.num_heads, self.head_size, self.alpha = num_heads, head_size, scale
        self.num_kv_heads = num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None

    def forward(self, layer: "HSTUAttention", query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: HSTUMetadata | None, output: torch.Tensor | None = None,
                output_scale=None, output_block_scale=None, **unused) -> torch.Tensor:
        assert output is not None
        if attn_metadata is None or kv_cache.numel() == 0:  # profiling run: no cache yet
            return output.zero_()
        md, n = attn_metadata, attn_metadata.num_tokens
        out = output[:n].view(n, self.num_heads, self.head_size)  # the kernels write vLLM's buffer directly
        if not md.cached:
            hstu_attention(query[:n], key[:n], value[:n], md.query_start_loc, alpha=self.alpha,
                           rel_bias=layer.rel_bias_table, norm="visible", rows=layer.rows, out=out)
            return output
        write_kv_cache(key[:n], value[:n], kv_cache, md.slot_mapping)
        hstu_attention_paged(query[:n], kv_cache, md.block_table, md.query_start_loc, md.seq_lens, alpha=self.alpha,
                             rel_bias=layer.rel_bias_table, norm="visible", rows=layer.rows, out=out)
        return output


class HSTUAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return compat.backend_name()

    @staticmethod
    def get_impl_cls() -> type[HSTUAttentionImpl]:
        return HSTUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HSTUMetadataBuilder]:
        return HSTUMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)  # K in [..., :D], V in [..., D:]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any; the Triton kernel checks its own limits


class HSTUAttention(Attention):
    """vLLM attention layer of one HSTU block: holds the block's relative-position bias and which query rows
    it must compute, for the backend."""

    def __init__(self, num_heads: int, head_dim: int, alpha: float, bias_columns: int, prefix: str,
                 cache_config=None, rows: str = "all"):
        super().__init__(num_heads, head_dim, scale=alpha, num_kv_heads=num_heads,
                         cache_config=cache_config, prefix=prefix, attn_backend=HSTUAttentionBackend)
        # "last": only each request's last query row of a step is read (the model's last layer); every new
        # token's K/V is still written to the cache.
        self.rows = rows
        # (H, R) float32 bias by relative distance (longer distances use the last column); set after loading.
        self.register_buffer("rel_bias_table", torch.zeros(num_heads, bias_columns, dtype=torch.float32),
                             persistent=False)
