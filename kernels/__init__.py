"""HSTU attention kernels (Triton on CUDA, PyTorch reference elsewhere). Imports nothing from batch/."""
from .hstu_attention import hstu_attention, hstu_attention_paged, write_kv_cache

__all__ = ["hstu_attention", "hstu_attention_paged", "write_kv_cache"]
