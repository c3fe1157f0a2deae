"""Triton forward kernel for jagged HSTU attention (packed (T, H, D) rows, per-user offsets, no padding).

One program computes BLOCK_M query rows of one (user, head). Programs come from a work list of (user, m-block)
tiles, longest users first and each user's tiles side by side (see build_work_list), so long and short users share
one launch without idle programs. Each row sees at most two key intervals (see reference.py): interval 1 = [0, hi_i)
is walked as unmasked blocks (keys every row of the tile sees) and then masked blocks; interval 2 (a candidate
row's own key) gets its own short masked loop. A new mask only has to say, per row, where its intervals start and
end. With a relative-position bias, blocks farther than R - 1 from every row of the tile use one scalar bias; nearer
blocks load their (BLOCK_M, BLOCK_N) bias tile from a small table built per call (near_bias_tiles): tiles and key
blocks start at multiples of the block sizes, so the tile depends only on the head and the tile-to-block offset.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # fast reciprocal division on the GPU; the CPU interpreter has no libdevice
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read when this module's kernels are decorated

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim for 16-bit inputs, picked on an H100 by
# `python -m kernels.bench --sweep` (Triton 3.6's automatic warp specialization compiled this loop only for 8-warp
# tiles, and gained nothing there).
CONFIGS: dict[int, tuple] = {
    16: (64, 32, 4, 2),
    32: (64, 64, 4, 2),
    64: (128, 64, 4, 3),
    128: (64, 64, 4, 3),
    256: (128, 32, 8, 3),
}
FP32_CONFIGS: dict[int, tuple] = {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2), 128: (64, 32, 4, 2),
                                  256: (32, 32, 4, 1)}  # fp32 is the accuracy path: small tiles that fit shared memory
# With a relative-position bias (16-bit inputs): the pipeliner also buffers the near blocks' fp32 bias tiles, which
# takes (64, 64, 4, 3) from 112 to 144 KiB of shared memory, one program per SM instead of two; (64, 32, 4, 3) keeps
# two and was the faster of the two in an unrecorded H100 trial. Recorded with it (bench `hstu_attention`, bench/
# RESULTS.md, issue 6): 319-331 TFLOP/s at R = 129 against 374-391 without a bias.
BIAS_CONFIGS: dict[int, tuple] = {128: (64, 32, 4, 3)}
INTERPRET_CONFIG = (32, 16, 4, 1)


def pick_config(D: int, config=None, table: dict | None = None, dtype=None) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): explicit, else the interpreter's small one,
    else FP32_CONFIGS for float32, else table[D], else CONFIGS[D]."""
    if config is not None:
        return tuple(config)
    if INTERPRET:
        return INTERPRET_CONFIG
    if dtype == torch.float32:
        return FP32_CONFIGS[D]
    return (table or {}).get(D) or CONFIGS[D]


def silu_mode(dtype) -> int:
    return 0 if INTERPRET else (1 if dtype == torch.float32 else 2)


@triton.jit
def _silu_scaled(qk, alpha, b, SILU: tl.constexpr):
    """silu(alpha * qk + b). SILU 0: exact (interpreter); 1: fast division (fp32 on the GPU); 2: one tanh.approx per
    score, silu(s) = h + h * tanh(h) with h = s / 2 (16-bit inputs: its error is below the bf16 rounding of p)."""
    if SILU == 2:
        h = qk * (0.5 * alpha) + 0.5 * b
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [h], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return h * t + h
    else:
        s = qk * alpha + b
        if SILU == 1:
            return libdevice.fast_dividef(s, 1.0 + tl.exp(-s))
        else:
            return s / (1.0 + tl.exp(-s))


@triton.jit
def _near_tile(tiles_h, o, o_lo, NT, STEP: tl.constexpr, TILE: tl.constexpr):
    """Start of the bias tile for query-tile-minus-key-block offset o (a multiple of STEP). Offsets past either end
    of the table clamp to its end tiles, which hold rel_bias[R - 1] throughout, as every such block does."""
    return tiles_h + tl.minimum(tl.maximum((o - o_lo) // STEP, 0), NT - 1) * TILE


@triton.jit
def _attend(acc, q, k_ptrs, v_ptrs, cols, rows, key_end, lo, hi, b_tile, b_scalar, alpha,
            MASK: tl.constexpr, BIAS: tl.constexpr, SILU: tl.constexpr, PREC: tl.constexpr):
    """acc += silu(alpha * q k^T + bias) * [lo <= col < hi] @ v for one block of keys (cols).
    BIAS 0: none; 1: the scalar b_scalar for every score of the block; 2: the (BLOCK_M, BLOCK_N) tile at b_tile."""
    if MASK:
        ok = cols < key_end
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    if BIAS == 2:  # a contiguous, L2-resident tile: far cheaper than gathering rel_bias[|i - j|] per score
        BM: tl.constexpr = rows.shape[0]
        BN: tl.constexpr = cols.shape[0]
        b = tl.load(b_tile + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :])
    elif BIAS == 1:
        b = b_scalar
    else:
        b = 0.0
    p = _silu_scaled(qk, alpha, b, SILU)
    if MASK:
        vis = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        p = tl.where(vis, p, 0.0)
    return tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)


@triton.jit
def _hstu_jagged_fwd(Q, K, V, O, offsets, work, prefix_lens, num_cands, bias, tiles,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     alpha, R, H, o_lo, NT,
                     HAS_PREFIX: tl.constexpr, HAS_CANDS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BIAS_NEAR: tl.constexpr,
                     NORM_LENGTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                     SILU: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    w = pid // H
    seq = tl.load(work + 2 * w)
    if seq < 0:
        return
    mblk = tl.load(work + 2 * w + 1)
    start = tl.load(offsets + seq).to(tl.int64)
    L = (tl.load(offsets + seq + 1) - start).to(tl.int32)
    hist = L
    if HAS_CANDS:
        hist = L - tl.minimum(tl.maximum(tl.load(num_cands + seq).to(tl.int32), 0), L)
    P = 0
    if HAS_PREFIX:
        P = tl.minimum(tl.maximum(tl.load(prefix_lens + seq).to(tl.int32), 0), hist)

    m0 = mblk * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = rows < L
    q = tl.load(Q + (start + rows)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_ptrs = K + (start + offs_n)[:, None] * stride_kt + h * stride_kh + offs_d[None, :]
    v_ptrs = V + (start + offs_n)[:, None] * stride_vt + h * stride_vh + offs_d[None, :]
    bias_h = bias + h * R
    TILE: tl.constexpr = BLOCK_M * BLOCK_N
    STEP: tl.constexpr = BLOCK_M if BLOCK_M < BLOCK_N else BLOCK_N  # m0 - n0 is always a multiple of it
    tiles_h = tiles + h * NT * TILE

    # Interval 1: [0, hi_i), hi_i = min(max(i + 1, P), hist); nondecreasing in i.
    hi = tl.minimum(tl.maximum(rows + 1, P), hist)
    last = tl.minimum(m0 + BLOCK_M, L) - 1
    full_end = (tl.minimum(tl.maximum(m0 + 1, P), hist) // BLOCK_N) * BLOCK_N  # keys all rows of the tile see
    tile_end = tl.minimum(tl.maximum(last + 1, P), hist)
    zero = tl.full([BLOCK_M], 0, tl.int32)  # tl.full, not tl.zeros: the interpreter can't run tl.zeros once
    # Triton was imported without TRITON_INTERPRET (tl.zeros is itself a jit function)
    acc = tl.full([BLOCK_M, D], 0.0, tl.float32)
    if HAS_BIAS:
        # Key blocks at distance >= R - 1 from every row of the tile all get rel_bias[R - 1]: one scalar.
        far_end = tl.minimum(tl.maximum((m0 - R + 2) // BLOCK_N, 0) * BLOCK_N, full_end)
        b_far = tl.load(bias_h + R - 1)
        b_diag = tl.load(bias_h)
        for n0 in range(0, far_end, BLOCK_N):
            acc = _attend(acc, q, k_ptrs + n0 * stride_kt, v_ptrs + n0 * stride_vt, n0 + offs_n, rows, L, zero, hi,
                          tiles_h, b_far, alpha, False, 1, SILU, PREC)
    else:
        far_end = 0
        b_diag = 0.0
    # Near blocks. A masked block can lie beyond the tile table (a long prefix ahead of the tile, the history end
    # far behind a tile of candidates): _near_tile clamps it to an end tile, all rel_bias[R - 1], which is exact.
    for n0 in range(far_end, full_end, BLOCK_N):
        acc = _attend(acc, q, k_ptrs + n0 * stride_kt, v_ptrs + n0 * stride_vt, n0 + offs_n, rows, L, zero, hi,
                      _near_tile(tiles_h, m0 - n0, o_lo, NT, STEP, TILE), 0.0, alpha, False, BIAS_NEAR, SILU, PREC)
    for n0 in range(full_end, tile_end, BLOCK_N):
        acc = _attend(acc, q, k_ptrs + n0 * stride_kt, v_ptrs + n0 * stride_vt, n0 + offs_n, rows, L, zero, hi,
                      _near_tile(tiles_h, m0 - n0, o_lo, NT, STEP, TILE), 0.0, alpha, True, BIAS_NEAR, SILU, PREC)
    n_vis = hi
    if HAS_CANDS:
        # Interval 2: a candidate row (i >= hist) also sees [i, i + 1), at distance 0: bias rel_bias[0] (these
        # blocks start at hist, not at a multiple of BLOCK_N, so they could not use the tiles).
        is_cand = rows >= hist
        lo2 = rows
        hi2 = tl.where(is_cand, rows + 1, rows)
        for n0 in range(tl.maximum(m0, hist), last + 1, BLOCK_N):
            acc = _attend(acc, q, k_ptrs + n0 * stride_kt, v_ptrs + n0 * stride_vt, n0 + offs_n, rows, L, lo2, hi2,
                          tiles_h, b_diag, alpha, True, HAS_BIAS, SILU, PREC)  # BIAS 1 (the scalar) or 0
        n_vis = hi + is_cand.to(tl.int32)

    if NORM_LENGTH:
        inv = 1.0 / L.to(tl.float32)
        out = acc * inv
    else:
        inv = 1.0 / tl.maximum(n_vis, 1).to(tl.float32)
        out = acc * inv[:, None]
    tl.store(O + (start + rows)[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


def build_work_list(row_counts: torch.Tensor, seq_keys: torch.Tensor, block_m: int, num_slots: int) -> torch.Tensor:
    """(num_slots, 2) int32 tiles (seq, m_block); unused slots hold seq -1 and come last.

    Order: sequences by seq_keys (their length) descending, and within a sequence m-blocks descending (the causal
    tiles with the most keys first). Long users start first and short tiles fill the tail, and the tiles of one
    sequence run side by side so its K/V is read from L2 rather than HBM. Device ops only (no host sync).
    """
    dev = row_counts.device
    B = row_counts.numel()
    rc = row_counts.to(torch.int64)
    tiles = (rc + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    slot = torch.arange(num_slots, device=dev)
    seq = torch.searchsorted(cum, slot, right=True).clamp(max=max(B - 1, 0))
    valid = slot < cum[-1]
    mblk = slot - (cum - tiles)[seq]
    key = (seq_keys.to(torch.int64)[seq] * B + (B - 1 - seq)) * num_slots + mblk
    order = torch.sort(torch.where(valid, key, -1), descending=True, stable=True).indices
    work = torch.stack([torch.where(valid, seq, -1), torch.where(valid, mblk, 0)], 1)[order]
    return work.to(torch.int32).contiguous()


def last_block_work(row_counts: torch.Tensor, block_m: int) -> torch.Tensor:
    """(B, 2) int32 tiles (seq, m_block): only the m-block holding each sequence's last row (seq -1 for an empty
    one). For callers that read one row per sequence (the model's last layer when scoring)."""
    rc = row_counts.to(torch.int64)
    seq = torch.arange(rc.numel(), device=rc.device)
    return torch.stack([torch.where(rc > 0, seq, -1), (rc - 1).clamp(min=0) // block_m], 1).to(torch.int32)


_WORK_CACHE: list = []  # one entry: (key tensors, their versions, params, work list)


def _cached_work(tensors: tuple, params: tuple, make) -> torch.Tensor:
    """Reuse the work list while the model calls every layer with the same offsets tensors (identity + version)."""
    # Inference tensors (torch.inference_mode: the torch engine, vLLM) keep no version counter; for them the
    # identity check below is the whole key, so callers pass fresh tensors (or views) per batch.
    versions = tuple(None if t is None or t.is_inference() else t._version for t in tensors)
    if _WORK_CACHE:
        ts, vs, ps, work = _WORK_CACHE[0]
        if ps == params and vs == versions and len(ts) == len(tensors) and all(a is b for a, b in zip(ts, tensors)):
            return work
    work = make()
    _WORK_CACHE[:] = [(tensors, versions, params, work)]
    return work


_TILE_DIST: dict = {}  # (R, block_m, block_n, device) -> (distance index of every tile, o_lo)


def near_bias_tiles(bias: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, int]:
    """(tiles, o_lo): tiles[h, t] (block_m, block_n) = bias[h, min(|o + r - c|, R - 1)] at row r, column c, for
    every tile-to-block offset o = o_lo + t * step, step = min(block_m, block_n).

    A query tile starting at row m0 and a key block at column n0 (multiples of block_m, block_n) have o = m0 - n0, a
    multiple of step. The table runs from the last offset whose tile is all bias[R - 1] below the diagonal to the
    first such above it, so an offset outside it may be clamped to an end tile. bias: (H, R) float32, contiguous.
    """
    H, R = bias.shape
    key = (R, block_m, block_n, str(bias.device))
    hit = _TILE_DIST.get(key)
    if hit is None:
        step = min(block_m, block_n)
        o_lo = (-(R + block_m - 2) // step) * step  # o <= -(R + block_m - 2): every o + r - c <= -(R - 1)
        o_hi = -(-(R + block_n - 2) // step) * step  # o >= R + block_n - 2: every o + r - c >= R - 1
        dev = bias.device
        o = torch.arange(o_lo, o_hi + 1, step, device=dev)
        d = o[:, None, None] + torch.arange(block_m, device=dev)[:, None] - torch.arange(block_n, device=dev)
        hit = (d.abs().clamp(max=R - 1), o_lo)
        if not (bias.is_cuda and torch.cuda.is_current_stream_capturing()):  # captured: filled only on replay
            _TILE_DIST[key] = hit
    dist, o_lo = hit
    return bias[:, dist], o_lo


def hstu_attention_triton(q, k, v, offsets, *, alpha: float, prefix_lens=None, num_candidates=None, rel_bias=None,
                          norm: str = "visible", rows: str = "all", config=None, work=None,
                          out=None) -> torch.Tensor:
    """Launch the jagged kernel. Inputs are validated by kernels.hstu_attention."""
    T, H, D = q.shape
    B = offsets.numel() - 1
    out = torch.empty_like(q) if out is None else out
    if T == 0 or B == 0:
        return out
    BM, BN, warps, stages = pick_config(D, config, BIAS_CONFIGS if rel_bias is not None else None, dtype=q.dtype)
    lengths = offsets[1:] - offsets[:-1]
    if work is None and rows == "last":
        work = last_block_work(lengths, BM)
    if work is None:
        work = _cached_work((offsets,), ("jagged", BM, T, B, str(q.device)),
                            lambda: build_work_list(lengths, lengths, BM, T // BM + B))
    dummy = offsets
    bias = rel_bias.to(torch.float32).contiguous() if rel_bias is not None else q.new_zeros(1, dtype=torch.float32)
    R = bias.shape[-1] if rel_bias is not None else 1
    tiles, o_lo = near_bias_tiles(bias, BM, BN) if rel_bias is not None else (bias, 0)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (work.shape[0] * H,)
    _hstu_jagged_fwd[grid](
        q, k, v, out, offsets, work,
        prefix_lens if prefix_lens is not None else dummy, num_candidates if num_candidates is not None else dummy,
        bias, tiles, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
        out.stride(1), float(alpha), R, H, o_lo, tiles.shape[1] if rel_bias is not None else 1,
        HAS_PREFIX=prefix_lens is not None, HAS_CANDS=num_candidates is not None, HAS_BIAS=rel_bias is not None,
        BIAS_NEAR=2 if rel_bias is not None else 0,
        NORM_LENGTH=norm == "length", BLOCK_M=BM, BLOCK_N=BN, D=D, SILU=silu_mode(q.dtype), PREC=prec,

        num_warps=warps, num_stages=stages)
    return out
