"""Public HSTU attention entry points: argument checks and backend dispatch (Triton on CUDA, PyTorch otherwise)."""
from __future__ import annotations

import torch

from . import reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(msg: str):
    raise ValueError(f"hstu_attention: {msg}")


def _check_qkv(q, k, v) -> None:
    if q.dim() != 3:
        _fail(f"q must be (tokens, heads, head_dim), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            _fail(f"{name} shape {tuple(t.shape)} != q shape {tuple(q.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            _fail(f"{name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")


def _check_index(name: str, t, n: int | None, device) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        _fail(f"{name} must be a 1-D integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        _fail(f"{name} must have {n} entries, got {t.numel()}")
    if t.device != device:
        _fail(f"{name} is on {t.device}, q on {device}")


def _check_rows(rows: str) -> None:
    if rows not in ("all", "last"):
        _fail(f"rows must be 'all' or 'last', got {rows!r}")


def _check_common(q, rel_bias, norm: str, backend: str) -> None:
    if norm not in ("visible", "length"):
        _fail(f"norm must be 'visible' or 'length', got {norm!r}")
    if backend not in ("auto", "triton", "torch"):
        _fail(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if rel_bias is not None and (rel_bias.dim() != 2 or rel_bias.shape[0] != q.shape[1] or rel_bias.shape[1] < 1):
        _fail(f"rel_bias must be (heads={q.shape[1]}, R>=1), got {tuple(rel_bias.shape)}")
    if rel_bias is not None and rel_bias.device != q.device:
        _fail(f"rel_bias is on {rel_bias.device}, q on {q.device}")


def _use_triton(backend: str, tensors) -> bool:
    q = tensors[0]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if backend == "auto":
        return q.is_cuda and not needs_grad
    if backend == "triton":
        if not q.is_cuda and not _interpreting():
            _fail("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
        if needs_grad:
            _fail("the Triton kernels are forward only; use backend='torch' for autograd")
        D = q.shape[-1]
        if q.dtype not in _DTYPES or D < 16 or D > 256 or D & (D - 1):
            _fail(f"Triton backend needs fp16/bf16/fp32 and a power-of-two head_dim in [16, 256]; got {q.dtype}, {D}")
        return True
    return False


def _interpreting() -> bool:
    from . import triton_jagged
    return triton_jagged.INTERPRET


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_out(out, q) -> None:
    if out is None:
        return
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        _fail(f"out must be {q.dtype} of shape {tuple(q.shape)} on {q.device}, like q; got {out.dtype} of shape "
              f"{tuple(out.shape)} on {out.device}")
    if out.stride(-1) != 1:
        _fail("out must be contiguous in its last dim")


def _into(out, result: torch.Tensor) -> torch.Tensor:
    """``result`` written into ``out`` when one was given (the reference paths allocate their own)."""
    if out is None or out is result:
        return result
    return out.copy_(result)


def hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *, alpha: float,
                   prefix_lens: torch.Tensor | None = None, num_candidates: torch.Tensor | None = None,
                   rel_bias: torch.Tensor | None = None, norm: str = "visible", max_len: int | None = None,
                   rows: str = "all", backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Jagged HSTU attention: out_i = sum_j visible silu(alpha q_i.k_j + rel_bias[h, |i-j|]) / n_i * v_j.

    q, k, v: (T, H, D) packed rows of B sequences; offsets (B+1,). prefix_lens / num_candidates: (B,) per-sequence
    profile-prefix length and candidate count (see kernels/reference.py for the exact mask). norm: "visible" (n_i =
    keys row i sees) or "length" (n_i = the sequence's length). max_len is accepted for callers that know it; the
    kernels do not need it. rows: "all", or "last": only each sequence's last row is needed — the Triton kernel
    then computes just the tile holding it (other rows of the result are undefined). Returns (T, H, D) in q.dtype:
    ``out`` when given (same shape and dtype as q, last dim contiguous, e.g. a view of a caller's buffer), which
    the Triton kernel writes directly.
    """
    _check_qkv(q, k, v)
    _check_out(out, q)
    _check_common(q, rel_bias, norm, backend)
    _check_rows(rows)
    if offsets.dim() != 1 or offsets.numel() < 1:
        _fail(f"offsets must be 1-D with B+1 >= 1 entries, got shape {tuple(offsets.shape)}")
    _check_index("offsets", offsets, None, q.device)
    B = offsets.numel() - 1
    _check_index("prefix_lens", prefix_lens, B, q.device)
    _check_index("num_candidates", num_candidates, B, q.device)
    kwargs = dict(alpha=alpha, prefix_lens=prefix_lens, num_candidates=num_candidates, rel_bias=rel_bias, norm=norm)
    if _use_triton(backend, (q, k, v, rel_bias)):
        from .triton_jagged import hstu_attention_triton
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        return hstu_attention_triton(q, k, v, offsets, rows=rows, out=out, **kwargs)
    if not q.is_cuda and offsets.numel() and int(offsets[-1]) != q.shape[0]:
        _fail(f"offsets[-1]={int(offsets[-1])} != number of rows {q.shape[0]}")
    return _into(out, reference.hstu_attention_torch(q, k, v, offsets, **kwargs))


def hstu_attention_paged(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                         query_start_loc: torch.Tensor, seq_lens: torch.Tensor, *, alpha: float,
                         rel_bias: torch.Tensor | None = None, norm: str = "visible", rows: str = "all",
                         backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Paged causal HSTU attention (vLLM): request r's query rows query_start_loc[r]:query_start_loc[r+1] are the
    last positions of its context of seq_lens[r] tokens, whose K/V sit in kv_cache (num_blocks, H, block_size, 2D)
    at block block_table[r, p // block_size], offset p % block_size. rows: "all", or "last": only each request's
    last query row is needed (as in hstu_attention). Returns (Tq, H, D) in q.dtype (``out`` when given, as in
    hstu_attention)."""
    _check_common(q, rel_bias, norm, backend)
    _check_rows(rows)
    if q.dim() != 3:
        _fail(f"q must be (tokens, heads, head_dim), got shape {tuple(q.shape)}")
    Tq, H, D = q.shape
    _check_out(out, q)
    if kv_cache.dim() != 4 or kv_cache.shape[1] != H or kv_cache.shape[3] != 2 * D:
        _fail(f"kv_cache must be (num_blocks, {H}, block_size, {2 * D}), got {tuple(kv_cache.shape)}")
    if kv_cache.dtype != q.dtype or kv_cache.device != q.device:
        _fail(f"kv_cache is {kv_cache.dtype} on {kv_cache.device}, q is {q.dtype} on {q.device}")
    if block_table.dim() != 2 or block_table.dtype.is_floating_point:
        _fail(f"block_table must be a 2-D integer tensor, got {block_table.dtype} {tuple(block_table.shape)}")
    R = seq_lens.numel()
    _check_index("seq_lens", seq_lens, R, q.device)
    _check_index("query_start_loc", query_start_loc, R + 1, q.device)
    if block_table.shape[0] < R:
        _fail(f"block_table has {block_table.shape[0]} rows for {R} requests")
    kwargs = dict(alpha=alpha, rel_bias=rel_bias, norm=norm)
    if _use_triton(backend, (q, kv_cache, rel_bias)):
        from .triton_paged import hstu_attention_paged_triton
        if kv_cache.stride(-1) != 1:
            _fail("kv_cache must be contiguous in its last dim")
        return hstu_attention_paged_triton(_last_dim_contiguous(q), kv_cache, block_table, query_start_loc,
                                           seq_lens, rows=rows, out=out, **kwargs)
    return _into(out, reference.hstu_attention_paged_torch(q, kv_cache, block_table, query_start_loc, seq_lens,
                                                           **kwargs))


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   backend: str = "auto") -> None:
    """Store this step's K, V (T, H, D) into kv_cache at slot_mapping (T,) (slot = block * block_size + offset;
    negative slots are padding and skipped). In place."""
    if k.shape != v.shape or k.dim() != 3:
        _fail(f"k and v must both be (T, H, D); got {tuple(k.shape)} and {tuple(v.shape)}")
    T, H, D = k.shape
    if kv_cache.dim() != 4 or kv_cache.shape[1] != H or kv_cache.shape[3] != 2 * D:
        _fail(f"kv_cache must be (num_blocks, {H}, block_size, {2 * D}), got {tuple(kv_cache.shape)}")
    _check_index("slot_mapping", slot_mapping, T, k.device)
    use_triton = backend == "triton" or (backend == "auto" and k.is_cuda)
    if use_triton and D & (D - 1) == 0 and kv_cache.stride(-1) == 1:
        from .triton_paged import write_kv_cache_triton
        write_kv_cache_triton(_last_dim_contiguous(k), _last_dim_contiguous(v), kv_cache, slot_mapping)
    else:
        reference.write_kv_cache_torch(k, v, kv_cache, slot_mapping)
