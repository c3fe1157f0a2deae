"""PyTorch references for HSTU attention (and, at the end, Group-LayerNorm and the fused linear + SiLU).

Two kinds of reference live here:
- ``*_naive``: a plain loop over users, written to be obviously right. Test oracle (call it with float64 inputs).
- ``hstu_attention_torch`` / ``hstu_attention_paged_torch``: the batched CPU / autograd path. Users are sorted by
  length and processed in chunks padded to the chunk's longest user, so the score tensor stays bounded and padding
  stays small; it is differentiable through every op.

Mask semantics (shared with the Triton kernels). For a sequence of length L with C candidates (the last C rows) and
a profile prefix of P rows (P is clamped to the history length L - C), row i sees the keys
    [0, hi_i) with hi_i = min(max(i + 1, P), L - C)      (interval 1: causal / prefix / candidate's history)
    and, if i >= L - C, also [i, i + 1)                   (interval 2: a candidate sees itself)
so n_i ("visible" normalisation) = hi_i + [i >= L - C]; with norm="length", n_i = L.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Upper bound on elements of one chunk's score tensor (batch * heads * Lq * Lk).
_CHUNK_ELEMS = 1 << 25


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_mask(L: int, P: int = 0, C: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L) bool mask of visible keys and (L,) count of visible keys per row, for one sequence."""
    C = min(max(C, 0), L)
    hist = L - C
    P = min(max(P, 0), hist)
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    hi = torch.clamp(torch.clamp(i + 1, min=P), max=hist)
    cand = i >= hist
    mask = (j < hi) | (cand & (j == i))
    return mask, (hi + cand.long()).squeeze(1)


def _bias_table(rel_bias: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """rel_bias (H, R) gathered at clamp(dist, max=R-1): returns (H, *dist.shape)."""
    R = rel_bias.shape[1]
    return rel_bias[:, dist.clamp(max=R - 1)]


def hstu_attention_naive(q, k, v, offsets, *, alpha, prefix_lens=None, num_candidates=None, rel_bias=None,
                         norm="visible") -> torch.Tensor:
    """Per-user loop oracle; computes in float32 (float64 for float64 inputs)."""
    cd = _compute_dtype(q.dtype)
    out = torch.zeros_like(q)
    offs = offsets.tolist()
    for b in range(len(offs) - 1):
        s, e = offs[b], offs[b + 1]
        L = e - s
        if L == 0:
            continue
        P = int(prefix_lens[b]) if prefix_lens is not None else 0
        C = int(num_candidates[b]) if num_candidates is not None else 0
        mask, n = visible_mask(L, P, C, q.device)
        qb, kb, vb = (x[s:e].transpose(0, 1).to(cd) for x in (q, k, v))  # (H, L, D)
        scores = alpha * qb @ kb.transpose(1, 2)
        if rel_bias is not None:
            pos = torch.arange(L, device=q.device)
            scores = scores + _bias_table(rel_bias.to(cd), (pos[:, None] - pos[None, :]).abs())
        denom = torch.full_like(n, L) if norm == "length" else n
        a = F.silu(scores) * mask / denom[:, None].to(cd)
        out[s:e] = (a @ vb).transpose(0, 1).to(q.dtype)
    return out


def _padded_core(qp, kp, vp, mask, denom, qpos, kpos, alpha, rel_bias):
    """qp (B, H, M, D), kp/vp (B, H, N, D), mask (B, M, N), denom (B, M) -> (B, H, M, D).

    qpos / kpos: (B, M) / (B, N) positions, or (M,) / (N,) when every sequence of the chunk shares them (jagged
    batches start at position 0), in which case the bias is gathered once for the chunk instead of per sequence."""
    scores = alpha * torch.matmul(qp, kp.transpose(-1, -2))
    if rel_bias is not None:
        dist = (qpos[..., :, None] - kpos[..., None, :]).abs()  # (B, M, N) or (M, N)
        bias = _bias_table(rel_bias.to(scores.dtype), dist)  # (H, B, M, N) or (H, M, N)
        scores = scores + (bias.transpose(0, 1) if dist.dim() == 3 else bias)
    a = F.silu(scores) * (mask / denom[:, :, None]).unsqueeze(1)
    return torch.matmul(a, vp)


def _chunks(order: list[int], lengths: list[int], extra: list[int], heads: int):
    """Split users (sorted by length) into chunks whose padded score tensor stays under _CHUNK_ELEMS."""
    chunk: list[int] = []
    M = N = 0
    for b in order:
        M2, N2 = max(M, lengths[b]), max(N, extra[b])
        if chunk and (len(chunk) + 1) * heads * M2 * N2 > _CHUNK_ELEMS:
            yield chunk
            chunk, M2, N2 = [], lengths[b], extra[b]
        chunk.append(b)
        M, N = M2, N2
    if chunk:
        yield chunk


def hstu_attention_torch(q, k, v, offsets, *, alpha, prefix_lens=None, num_candidates=None, rel_bias=None,
                         norm="visible") -> torch.Tensor:
    """Batched, differentiable reference: length-sorted chunks padded to their longest user."""
    T, H, D = q.shape
    cd = _compute_dtype(q.dtype)
    dev = q.device
    offs = offsets.tolist()
    B = len(offs) - 1
    lengths = [offs[b + 1] - offs[b] for b in range(B)]
    order = sorted((b for b in range(B) if lengths[b] > 0), key=lambda b: lengths[b])
    P_all = prefix_lens.tolist() if prefix_lens is not None else [0] * B
    C_all = num_candidates.tolist() if num_candidates is not None else [0] * B
    outs, rows = [], []
    for chunk in _chunks(order, lengths, lengths, H):
        Lm = max(lengths[b] for b in chunk)
        starts = torch.tensor([offs[b] for b in chunk], device=dev)
        Ls = torch.tensor([lengths[b] for b in chunk], device=dev)
        C = torch.tensor([C_all[b] for b in chunk], device=dev).clamp(min=0)
        C = torch.minimum(C, Ls)
        hist = Ls - C
        P = torch.minimum(torch.tensor([P_all[b] for b in chunk], device=dev).clamp(min=0), hist)
        pos = torch.arange(Lm, device=dev)
        valid = pos[None, :] < Ls[:, None]  # (Bc, Lm)
        idx = torch.where(valid, starts[:, None] + pos[None, :], 0)
        qp, kp, vp = (x[idx].to(cd).permute(0, 2, 1, 3) for x in (q, k, v))  # (Bc, H, Lm, D)
        i, j = pos[None, :, None], pos[None, None, :]
        hi = torch.minimum(torch.maximum(i + 1, P[:, None, None]), hist[:, None, None])  # (Bc, Lm, 1)
        cand = i >= hist[:, None, None]
        mask = ((j < hi) | (cand & (j == i))) & valid[:, None, :]
        n = (hi + cand.long()).squeeze(-1)
        denom = Ls[:, None].expand(-1, Lm) if norm == "length" else n
        o = _padded_core(qp, kp, vp, mask.to(cd), denom.clamp(min=1).to(cd), pos, pos, alpha, rel_bias)
        o = o.permute(0, 2, 1, 3)  # (Bc, Lm, H, D)
        outs.append(o[valid])
        rows.append(idx[valid])
    if not outs:
        return torch.zeros_like(q)
    vals = torch.cat(outs).to(q.dtype)
    return torch.zeros_like(q).index_copy(0, torch.cat(rows), vals)


# ----------------------------------------------------------------------------------------------------------------
# Paged (vLLM) variant: causal only; query rows are the last q_len positions of each request's context.


def gather_paged_kv(kv_cache, block_table, r: int, S: int):
    """Context K, V (S, H, D) of request r read through the block table."""
    D = kv_cache.shape[-1] // 2
    bs = kv_cache.shape[2]
    p = torch.arange(S, device=kv_cache.device)
    blocks = block_table[r, p // bs].long()
    kv = kv_cache[blocks, :, p % bs]  # (S, H, 2D)
    return kv[..., :D], kv[..., D:]


def hstu_attention_paged_naive(q, kv_cache, block_table, query_start_loc, seq_lens, *, alpha, rel_bias=None,
                               norm="visible") -> torch.Tensor:
    """Per-request loop oracle for the paged kernel."""
    cd = _compute_dtype(q.dtype)
    out = torch.zeros_like(q)
    qsl, sl = query_start_loc.tolist(), seq_lens.tolist()
    for r in range(len(sl)):
        s, e, S = qsl[r], qsl[r + 1], sl[r]
        if e == s:
            continue
        kc, vc = gather_paged_kv(kv_cache, block_table, r, S)
        qb, kb, vb = (x.transpose(0, 1).to(cd) for x in (q[s:e], kc, vc))
        qpos = torch.arange(S - (e - s), S, device=q.device)
        kpos = torch.arange(S, device=q.device)
        scores = alpha * qb @ kb.transpose(1, 2)
        if rel_bias is not None:
            scores = scores + _bias_table(rel_bias.to(cd), (qpos[:, None] - kpos[None, :]).abs())
        mask = kpos[None, :] <= qpos[:, None]
        denom = torch.full_like(qpos, S) if norm == "length" else qpos + 1
        a = F.silu(scores) * mask / denom[:, None].to(cd)
        out[s:e] = (a @ vb).transpose(0, 1).to(q.dtype)
    return out


def hstu_attention_paged_torch(q, kv_cache, block_table, query_start_loc, seq_lens, *, alpha, rel_bias=None,
                               norm="visible") -> torch.Tensor:
    """Batched paged reference: requests sorted by context length, padded per chunk."""
    Tq, H, D = q.shape
    cd = _compute_dtype(q.dtype)
    dev = q.device
    bs = kv_cache.shape[2]
    flat = kv_cache.permute(0, 2, 1, 3).reshape(-1, H, 2 * D)  # (num_blocks * bs, H, 2D), slot-major
    qsl, sl = query_start_loc.tolist(), seq_lens.tolist()
    R = len(sl)
    qlens = [qsl[r + 1] - qsl[r] for r in range(R)]
    order = sorted((r for r in range(R) if qlens[r] > 0), key=lambda r: sl[r])
    outs, rows = [], []
    for chunk in _chunks(order, qlens, sl, H):
        M, N = max(qlens[r] for r in chunk), max(sl[r] for r in chunk)
        qs = torch.tensor([qsl[r] for r in chunk], device=dev)
        ql = torch.tensor([qlens[r] for r in chunk], device=dev)
        S = torch.tensor([sl[r] for r in chunk], device=dev)
        m, p = torch.arange(M, device=dev), torch.arange(N, device=dev)
        qvalid = m[None, :] < ql[:, None]
        kvalid = p[None, :] < S[:, None]
        qidx = torch.where(qvalid, qs[:, None] + m[None, :], 0)
        bt = block_table[torch.tensor(chunk, device=dev)].long()
        pages = torch.gather(bt, 1, torch.where(kvalid, p[None, :] // bs, 0))
        slots = torch.where(kvalid, pages * bs + p[None, :] % bs, 0)
        kv = flat[slots].to(cd)  # (Bc, N, H, 2D)
        kp, vp = kv[..., :D].permute(0, 2, 1, 3), kv[..., D:].permute(0, 2, 1, 3)
        qp = q[qidx].to(cd).permute(0, 2, 1, 3)
        qpos = S[:, None] - ql[:, None] + m[None, :]  # (Bc, M)
        mask = (p[None, None, :] <= qpos[:, :, None]) & kvalid[:, None, :]
        denom = S[:, None].expand(-1, M) if norm == "length" else qpos + 1
        o = _padded_core(qp, kp, vp, mask.to(cd), denom.clamp(min=1).to(cd), qpos, p[None].expand(len(chunk), -1),
                         alpha, rel_bias)
        outs.append(o.permute(0, 2, 1, 3)[qvalid])
        rows.append(qidx[qvalid])
    if not outs:
        return torch.zeros_like(q)
    return torch.zeros_like(q).index_copy(0, torch.cat(rows), torch.cat(outs).to(q.dtype))


def write_kv_cache_torch(k, v, kv_cache, slot_mapping) -> None:
    """kv_cache[slot // bs, :, slot % bs] = concat(k, v) for every slot >= 0 (negative slots are padding)."""
    bs = kv_cache.shape[2]
    D = k.shape[-1]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    slot = slot_mapping.long()
    blk, off = slot // bs, slot % bs
    kv_cache[blk, :, off, :D] = k.to(kv_cache.dtype)
    kv_cache[blk, :, off, D:] = v.to(kv_cache.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Group-LayerNorm: LayerNorm with per-group affine parameters, optionally times a gate.


def group_layer_norm_torch(x, groups, weight, bias, eps=1e-5, gate=None) -> torch.Tensor:
    """(F.layer_norm(x) * weight[groups] + bias[groups]) * gate, op for op as the unfused model computed it (the
    training path: its results, and so checkpoints, must not move by a bit)."""
    y = F.layer_norm(x, x.shape[-1:], eps=eps) * weight[groups] + bias[groups]
    return y if gate is None else y * gate


# ----------------------------------------------------------------------------------------------------------------
# Linear projection with SiLU: the HSTU layer's uvqk projection.


def linear_silu_torch(x, weight, bias=None) -> torch.Tensor:
    """F.silu(F.linear(x, weight, bias)), as HSTULayer computed it before the fused kernel (the training path)."""
    return F.silu(F.linear(x, weight, bias))


def linear_add_torch(x, weight, bias, residual) -> torch.Tensor:
    """residual + F.linear(x, weight, bias), as HSTULayer computed its output before the fused kernel."""
    return residual + F.linear(x, weight, bias)
