"""Triton forward kernel for paged HSTU attention (vLLM backend): query rows of several requests in one launch,
K/V read through the block table. Causal: a row at absolute position p sees context keys [0, p].

The structure follows triton_jagged: tiles of BLOCK_M query rows, longest first; unmasked key blocks below the
tile's first row, masked blocks on the diagonal. When the page size is a multiple of BLOCK_N a key block lies in one
page (one block-table read per block); otherwise each key's page is gathered. A relative-position bias near the
diagonal comes from triton_jagged's precomputed tiles when the tile's first absolute position is a multiple of
min(BLOCK_M, BLOCK_N) (always in a full prefill); otherwise (chunked prefill) it is gathered per score.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jagged import (_cached_work, _near_tile, _silu_scaled, build_work_list, last_block_work,
                            near_bias_tiles, pick_config, silu_mode)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim when they differ from the jagged kernel's; picked on an
# H100 by `python -m kernels.bench --sweep --sweep-kernels paged` at page size 64. A page size that is a multiple of
# BLOCK_N (64 here) lets each key block read one block-table entry; smaller pages (vLLM's default 16) gather per key
# and ran about 13% slower.
CONFIGS: dict[int, tuple[int, int, int, int]] = {128: (64, 64, 4, 4), 256: (128, 64, 8, 2)}


@triton.jit
def _paged_attend(acc, q, KV, bt_row, n0, offs_n, offs_d, rows_pos, key_end, h, stride_cb, stride_ch, stride_cs,
                  bias_ptr, R, b_far, b_tile, tiled, alpha, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                  D: tl.constexpr, MASK: tl.constexpr, BIAS: tl.constexpr, SILU: tl.constexpr, PREC: tl.constexpr):
    """BIAS 0: none; 1: the scalar b_far; 2: the tile at b_tile if tiled (see triton_jagged._attend), else gather
    rel_bias[min(|i - j|, R - 1)] per score."""
    cols = n0 + offs_n
    if PAGE % BLOCK_N == 0:
        blk = tl.load(bt_row + n0 // PAGE).to(tl.int64)
        base = KV + blk * stride_cb + h * stride_ch + ((n0 % PAGE) + offs_n)[:, None] * stride_cs
    else:
        if MASK:
            blk = tl.load(bt_row + cols // PAGE, mask=cols < key_end, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + cols // PAGE).to(tl.int64)
        base = KV + blk[:, None] * stride_cb + h * stride_ch + (cols % PAGE)[:, None] * stride_cs
    k_ptrs = base + offs_d[None, :]
    if MASK:
        ok = cols < key_end
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
        v = tl.load(k_ptrs + D, mask=ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(k_ptrs + D)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    if BIAS == 2:
        if tiled:
            BM: tl.constexpr = rows_pos.shape[0]
            b = tl.load(b_tile + tl.arange(0, BM)[:, None] * BLOCK_N + offs_n[None, :])
        else:
            b = tl.load(bias_ptr + tl.minimum(tl.abs(rows_pos[:, None] - cols[None, :]), R - 1))
    elif BIAS == 1:
        b = b_far
    else:
        b = 0.0
    p = _silu_scaled(qk, alpha, b, SILU)
    if MASK:
        p = tl.where(cols[None, :] <= rows_pos[:, None], p, 0.0)
    return tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)


@triton.jit
def _hstu_paged_fwd(Q, KV, O, query_start_loc, seq_lens, block_table, work, bias, tiles,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ch, stride_cs, stride_bt,
                    alpha, R, H, o_lo, NT,
                    PAGE: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_NEAR: tl.constexpr,
                    NORM_LENGTH: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                    SILU: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    w = pid // H
    r = tl.load(work + 2 * w)
    if r < 0:
        return
    mblk = tl.load(work + 2 * w + 1)
    qs = tl.load(query_start_loc + r).to(tl.int64)
    qlen = (tl.load(query_start_loc + r + 1) - qs).to(tl.int32)
    S = tl.load(seq_lens + r).to(tl.int32)
    first = S - qlen  # absolute position of the request's first query row

    m0 = mblk * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    pos = first + rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = rows < qlen
    q = tl.load(Q + (qs + rows)[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    bt_row = block_table + r.to(tl.int64) * stride_bt
    bias_h = bias + h * R
    TILE: tl.constexpr = BLOCK_M * BLOCK_N
    STEP: tl.constexpr = BLOCK_M if BLOCK_M < BLOCK_N else BLOCK_N
    tiles_h = tiles + h * NT * TILE
    a0 = first + m0  # absolute position of the tile's first row
    tiled = a0 % STEP == 0  # then a0 - n0 is a multiple of STEP: a precomputed tile

    full_end = ((first + m0 + 1) // BLOCK_N) * BLOCK_N
    tile_end = first + tl.minimum(m0 + BLOCK_M, qlen)
    acc = tl.full([BLOCK_M, D], 0.0, tl.float32)
    if HAS_BIAS:  # blocks at distance >= R - 1 from every row use the scalar rel_bias[R - 1]
        far_end = tl.minimum(tl.maximum((first + m0 - R + 2) // BLOCK_N, 0) * BLOCK_N, full_end)
        b_far = tl.load(bias_h + R - 1)
        for n0 in range(0, far_end, BLOCK_N):
            acc = _paged_attend(acc, q, KV, bt_row, n0, offs_n, offs_d, pos, S, h, stride_cb, stride_ch, stride_cs,
                                bias_h, R, b_far, tiles_h, tiled, alpha, PAGE, BLOCK_N, D, False, 1, SILU, PREC)
    else:
        far_end = 0
        b_far = 0.0
    for n0 in range(far_end, full_end, BLOCK_N):
        acc = _paged_attend(acc, q, KV, bt_row, n0, offs_n, offs_d, pos, S, h, stride_cb, stride_ch, stride_cs,
                            bias_h, R, b_far, _near_tile(tiles_h, a0 - n0, o_lo, NT, STEP, TILE), tiled, alpha,
                            PAGE, BLOCK_N, D, False, BIAS_NEAR, SILU, PREC)
    for n0 in range(full_end, tile_end, BLOCK_N):
        acc = _paged_attend(acc, q, KV, bt_row, n0, offs_n, offs_d, pos, S, h, stride_cb, stride_ch, stride_cs,
                            bias_h, R, b_far, _near_tile(tiles_h, a0 - n0, o_lo, NT, STEP, TILE), tiled, alpha,
                            PAGE, BLOCK_N, D, True, BIAS_NEAR, SILU, PREC)
    if NORM_LENGTH:
        out = acc * (1.0 / S.to(tl.float32))
    else:
        out = acc * (1.0 / (pos + 1).to(tl.float32))[:, None]
    tl.store(O + (qs + rows)[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


def hstu_attention_paged_triton(q, kv_cache, block_table, query_start_loc, seq_lens, *, alpha: float,
                                rel_bias=None, norm: str = "visible", rows: str = "all", config=None,
                                work=None, out=None) -> torch.Tensor:
    """Launch the paged kernel. Inputs are validated by kernels.hstu_attention_paged."""
    Tq, H, D = q.shape
    nreq = seq_lens.numel()
    out = torch.empty_like(q) if out is None else out
    if Tq == 0 or nreq == 0:
        return out
    BM, BN, warps, stages, *_ = pick_config(D, config, CONFIGS, dtype=q.dtype)
    page = kv_cache.shape[2]
    if work is None and rows == "last":
        work = last_block_work(query_start_loc[1:] - query_start_loc[:-1], BM)
    if work is None:
        work = _cached_work((query_start_loc, seq_lens), ("paged", BM, Tq, nreq, str(q.device)),
                            lambda: build_work_list(query_start_loc[1:] - query_start_loc[:-1], seq_lens, BM,
                                                    Tq // BM + nreq))
    bias = rel_bias.to(torch.float32).contiguous() if rel_bias is not None else q.new_zeros(1, dtype=torch.float32)
    R = bias.shape[-1] if rel_bias is not None else 1
    tiles, o_lo = near_bias_tiles(bias, BM, BN) if rel_bias is not None else (bias, 0)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (work.shape[0] * H,)
    _hstu_paged_fwd[grid](
        q, kv_cache, out, query_start_loc, seq_lens, block_table, work, bias, tiles,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        kv_cache.stride(2), block_table.stride(0), float(alpha), R, H, o_lo,
        tiles.shape[1] if rel_bias is not None else 1,
        PAGE=page, HAS_BIAS=rel_bias is not None, BIAS_NEAR=2 if rel_bias is not None else 0,
        NORM_LENGTH=norm == "length", BLOCK_M=BM, BLOCK_N=BN, D=D,
        SILU=silu_mode(q.dtype), PREC=prec, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _write_kv_kernel(K, V, KV, slots, stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_cs,
                     H, PAGE: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    t = pid // H
    h = pid % H
    slot = tl.load(slots + t).to(tl.int64)
    if slot < 0:  # padding row
        return
    offs_d = tl.arange(0, D)
    dst = KV + (slot // PAGE) * stride_cb + h * stride_ch + (slot % PAGE) * stride_cs + offs_d
    k = tl.load(K + t * stride_kt + h * stride_kh + offs_d)
    v = tl.load(V + t * stride_vt + h * stride_vh + offs_d)
    tl.store(dst, k.to(KV.dtype.element_ty))
    tl.store(dst + D, v.to(KV.dtype.element_ty))


def write_kv_cache_triton(k, v, kv_cache, slot_mapping) -> None:
    """kv_cache[slot // bs, h, slot % bs] = concat(k, v) per row; rows with slot < 0 are skipped (no host sync)."""
    T, H, D = k.shape
    if T == 0:
        return
    _write_kv_kernel[(T * H,)](k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                               kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), H,
                               PAGE=kv_cache.shape[2], D=D, num_warps=1)
