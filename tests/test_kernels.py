"""HSTU attention kernels: PyTorch references against a per-user loop, and the Triton kernels in the CPU interpreter
(TRITON_INTERPRET=1 is set only while this module loads its own copies of the kernel modules, then restored)."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

import kernels
from kernels import reference as ref

ALPHA = 0.35


def _offsets(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)


def _rand(T, H, D, dtype, gen):
    return [torch.randn(T, H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# Ragged lengths: 1, block-size multiples and not, prefix longer than the history, candidates of every kind.
LENGTHS = [1, 17, 40, 64, 5, 33, 2]
PREFIX = torch.tensor([0, 3, 5, 70, 2, 40, 1])
CANDS = torch.tensor([0, 4, 0, 10, 5, 3, 1])
MASKS = {
    "causal": {},
    "prefix": dict(prefix_lens=PREFIX),
    "candidates": dict(num_candidates=CANDS),
    "prefix+cand+bias": dict(prefix_lens=PREFIX, num_candidates=CANDS, bias=True),
    "length-norm+bias": dict(norm="length", bias=True),
}


def _mask_kwargs(spec, H, gen, dtype=torch.float64):
    kw = {k: v for k, v in spec.items() if k != "bias"}
    if spec.get("bias"):
        kw["rel_bias"] = torch.randn(H, 9, generator=gen, dtype=torch.float64).to(dtype)
    return kw


def test_visible_mask_matches_rules():
    # Literal reading of the contract: prefix rows see [0, P); other history rows are causal; a candidate sees the
    # history and itself.
    for L, P, C in [(1, 0, 0), (7, 3, 0), (7, 0, 3), (9, 4, 3), (5, 9, 2), (6, 0, 6)]:
        hist = L - C
        Pc = min(P, hist)
        want = torch.zeros(L, L, dtype=torch.bool)
        for i in range(L):
            for j in range(L):
                if i >= hist:
                    want[i, j] = j < hist or j == i
                elif i < Pc:
                    want[i, j] = j < Pc
                else:
                    want[i, j] = j <= i
        mask, n = ref.visible_mask(L, P, C)
        assert torch.equal(mask, want), (L, P, C)
        assert torch.equal(n, want.sum(1)), (L, P, C)


@pytest.mark.parametrize("name", list(MASKS))
def test_torch_matches_naive(name, monkeypatch):
    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 2 * 64 * 64)  # force several chunks
    gen = torch.Generator().manual_seed(1)
    q, k, v = _rand(sum(LENGTHS), 2, 8, torch.float64, gen)
    kw = _mask_kwargs(MASKS[name], 2, gen)
    off = _offsets(LENGTHS)
    want = ref.hstu_attention_naive(q, k, v, off, alpha=ALPHA, **kw)
    got = kernels.hstu_attention(q, k, v, off, alpha=ALPHA, **kw)  # CPU: auto -> torch
    assert _rel(got, want) < 1e-12


def test_torch_gradients_match_naive():
    gen = torch.Generator().manual_seed(2)
    off = _offsets([3, 1, 6])
    kw = _mask_kwargs(MASKS["prefix+cand+bias"], 2, gen)
    kw["prefix_lens"], kw["num_candidates"] = torch.tensor([2, 0, 1]), torch.tensor([1, 0, 2])
    grads = []
    for fn in (ref.hstu_attention_naive, kernels.hstu_attention):
        q, k, v = (t.clone().requires_grad_() for t in _rand(10, 2, 4, torch.float64, torch.Generator().manual_seed(3)))
        bias = kw["rel_bias"].clone().requires_grad_()
        out = fn(q, k, v, off, alpha=ALPHA, **{**kw, "rel_bias": bias})
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum().backward()
        grads.append([q.grad, k.grad, v.grad, bias.grad])
    for a, b in zip(*grads):
        assert _rel(b, a) < 1e-12


def test_empty_sequences_and_float32():
    gen = torch.Generator().manual_seed(4)
    lengths = [0, 3, 0, 2]
    q, k, v = _rand(5, 1, 16, torch.float32, gen)
    out = kernels.hstu_attention(q, k, v, _offsets(lengths), alpha=ALPHA)
    want = ref.hstu_attention_naive(q.double(), k.double(), v.double(), _offsets(lengths), alpha=ALPHA)
    assert out.dtype == torch.float32 and _rel(out, want) < 1e-6


def test_argument_errors(monkeypatch):
    from kernels import triton_jagged
    monkeypatch.setattr(triton_jagged, "INTERPRET", False)  # as without TRITON_INTERPRET=1 in the environment
    q = torch.randn(4, 2, 16)
    off = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="shape"):
        kernels.hstu_attention(q, q[:, :1], q, off, alpha=1.0)
    with pytest.raises(ValueError, match="norm"):
        kernels.hstu_attention(q, q, q, off, alpha=1.0, norm="max")
    with pytest.raises(ValueError, match="prefix_lens"):
        kernels.hstu_attention(q, q, q, off, alpha=1.0, prefix_lens=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="offsets"):
        kernels.hstu_attention(q, q, q, torch.tensor([0, 3]), alpha=1.0)
    with pytest.raises(ValueError, match="rel_bias"):
        kernels.hstu_attention(q, q, q, off, alpha=1.0, rel_bias=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="CUDA"):
        kernels.hstu_attention(q, q, q, off, alpha=1.0, backend="triton")
    with pytest.raises(ValueError, match="kv_cache"):
        kernels.hstu_attention_paged(q, torch.zeros(2, 2, 4, 16), torch.zeros(1, 1, dtype=torch.int32),
                                     torch.tensor([0, 4]), torch.tensor([4]), alpha=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Paged


def _paged_case(dtype, page, gen, H=2, D=16, ctx=(1, 17, 40, 64, 5), qlens=(1, 17, 9, 1, 5)):
    """Random KV cache with shuffled pages; request r's query rows are the last qlens[r] of ctx[r] tokens."""
    total_pages = sum((c + page - 1) // page for c in ctx) + 3
    perm = torch.randperm(total_pages, generator=gen)
    max_pages = max((c + page - 1) // page for c in ctx)
    table = torch.zeros(len(ctx), max_pages + 1, dtype=torch.int32)
    used = 0
    for r, c in enumerate(ctx):
        n = (c + page - 1) // page
        table[r, :n] = perm[used:used + n].int()
        used += n
    kc, vc = torch.randn(2, sum(ctx), H, D, generator=gen, dtype=torch.float64).to(dtype)
    slots = []
    for r, c in enumerate(ctx):
        p = torch.arange(c)
        slots.append(table[r, p // page].long() * page + p % page)
    cache = torch.randn(total_pages, H, page, 2 * D, generator=gen, dtype=torch.float64).to(dtype)  # garbage
    ref.write_kv_cache_torch(kc, vc, cache, torch.cat(slots))
    q = torch.randn(sum(qlens), H, D, generator=gen, dtype=torch.float64).to(dtype)
    qsl = _offsets(list(qlens))
    seq_lens = torch.tensor(ctx)
    return q, cache, table, qsl, seq_lens, (kc, vc, torch.cat(slots))


def test_paged_torch_matches_naive_and_jagged():
    gen = torch.Generator().manual_seed(5)
    q, cache, table, qsl, seq_lens, _ = _paged_case(torch.float64, 4, gen)
    bias = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    for kw in ({}, dict(rel_bias=bias, norm="length")):
        want = ref.hstu_attention_paged_naive(q, cache, table, qsl, seq_lens, alpha=ALPHA, **kw)
        got = kernels.hstu_attention_paged(q, cache, table, qsl, seq_lens, alpha=ALPHA, **kw)
        assert _rel(got, want) < 1e-12
    # Full prefill (q = the whole context) equals the jagged causal kernel on the same rows.
    ctx = [3, 9, 1]
    q, cache, table, qsl, seq_lens, (kc, vc, _) = _paged_case(torch.float64, 4, gen, ctx=ctx, qlens=ctx)
    paged = kernels.hstu_attention_paged(q, cache, table, qsl, seq_lens, alpha=ALPHA, rel_bias=bias)
    jag = kernels.hstu_attention(q, kc, vc, _offsets(ctx), alpha=ALPHA, rel_bias=bias)
    assert _rel(paged, jag) < 1e-12


def test_write_kv_cache_skips_padding():
    cache = torch.zeros(3, 2, 4, 8)
    k, v = torch.randn(2, 3, 2, 4)
    kernels.write_kv_cache(k, v, cache, torch.tensor([5, -1, 0]))
    assert torch.equal(cache[1, :, 1, :4], k[0]) and torch.equal(cache[1, :, 1, 4:], v[0])
    assert torch.equal(cache[0, :, 0, :4], k[2]) and torch.equal(cache[0, :, 0, 4:], v[2])
    assert int((cache != 0).sum()) == 2 * 2 * 8  # nothing else written


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels in the CPU interpreter


def _interpreted(*names):
    """Private interpreted copies of the named kernel modules. TRITON_INTERPRET=1 is set only while the tests using
    them run (Triton reads it at decoration and again while interpreting) and restored afterwards, and the copies are
    taken out of sys.modules again, so no other test module sees them."""
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_mods = {n: sys.modules.pop(n, None) for n in names}
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mods = [importlib.import_module(n) for n in names]
        assert all(getattr(m, "INTERPRET", True) for m in mods)  # triton_paged goes by triton_jagged's flag
        yield mods
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        for n in names:
            sys.modules.pop(n, None)
            if saved_mods[n] is not None:
                sys.modules[n] = saved_mods[n]


@pytest.fixture(scope="module")
def interp():
    """Interpreted kernels.triton_jagged and kernels.triton_paged."""
    yield from _interpreted("kernels.triton_jagged", "kernels.triton_paged")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("name", list(MASKS))
def test_triton_jagged_interpreter(interp, name, dtype, tol):
    jag, _ = interp
    gen = torch.Generator().manual_seed(6)
    H, D = 2, 32
    q, k, v = _rand(sum(LENGTHS), H, D, dtype, gen)
    kw = _mask_kwargs(MASKS[name], H, gen, torch.float32)
    off = _offsets(LENGTHS)
    want = ref.hstu_attention_naive(q.double(), k.double(), v.double(), off, alpha=ALPHA,
                                    **{a: (b.double() if a == "rel_bias" else b) for a, b in kw.items()})
    got = jag.hstu_attention_triton(q, k, v, off, alpha=ALPHA, **kw)
    assert got.dtype == dtype
    assert _rel(got, want) < tol


def test_triton_jagged_interpreter_strided_and_64(interp):
    """Row-strided views (q, k, v slices of one fused projection) and head_dim 64."""
    jag, _ = interp
    gen = torch.Generator().manual_seed(7)
    lengths = [33, 1, 20]
    T, H, D = sum(lengths), 1, 64
    fused = torch.randn(T, H, 3 * D, generator=gen).to(torch.float16)
    q, k, v = fused[..., :D], fused[..., D:2 * D], fused[..., 2 * D:]
    off = _offsets(lengths)
    want = ref.hstu_attention_naive(q.double(), k.double(), v.double(), off, alpha=ALPHA)
    assert _rel(jag.hstu_attention_triton(q, k, v, off, alpha=ALPHA), want) < 1e-2


@pytest.mark.parametrize("page", [8, 16, 32])  # BLOCK_N is 16 in the interpreter: gather path and page-uniform path
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_triton_paged_interpreter(interp, page, dtype, tol):
    _, pag = interp
    gen = torch.Generator().manual_seed(8)
    q, cache, table, qsl, seq_lens, _ = _paged_case(dtype, page, gen)
    bias = torch.randn(2, 11, generator=gen)
    for kw in ({}, dict(rel_bias=bias, norm="length")):
        want = ref.hstu_attention_paged_naive(q.double(), cache.double(), table, qsl, seq_lens, alpha=ALPHA,
                                              **{a: (b.double() if a == "rel_bias" else b) for a, b in kw.items()})
        got = pag.hstu_attention_paged_triton(q, cache, table, qsl, seq_lens, alpha=ALPHA, **kw)
        assert _rel(got, want) < tol


def test_triton_kernels_write_into_out(interp):
    """``out=`` (a strided view of a wider buffer, as vLLM's attention output is) receives the result in place and
    is what the kernels return; the rows it already held elsewhere stay untouched."""
    jag, pag = interp
    gen = torch.Generator().manual_seed(9)
    H, D = 2, 16
    q, k, v = _rand(sum(LENGTHS), H, D, torch.float32, gen)
    off = _offsets(LENGTHS)
    buf = torch.full((q.shape[0] + 3, H, D + 4), 7.0)
    out = buf[:q.shape[0], :, :D]
    got = jag.hstu_attention_triton(q, k, v, off, alpha=ALPHA, out=out)
    assert got is out
    assert _rel(buf[:q.shape[0], :, :D], jag.hstu_attention_triton(q, k, v, off, alpha=ALPHA)) < 1e-6
    assert (buf[q.shape[0]:] == 7).all() and (buf[..., D:] == 7).all()
    qp, cache, table, qsl, seq_lens, _ = _paged_case(torch.float32, 16, gen)
    out = torch.full_like(qp, 7.0)
    assert pag.hstu_attention_paged_triton(qp, cache, table, qsl, seq_lens, alpha=ALPHA, out=out) is out
    assert _rel(out, pag.hstu_attention_paged_triton(qp, cache, table, qsl, seq_lens, alpha=ALPHA)) < 1e-6


def test_out_argument_on_the_reference_path():
    gen = torch.Generator().manual_seed(10)
    q, k, v = _rand(sum(LENGTHS), 2, 8, torch.float64, gen)
    off = _offsets(LENGTHS)
    out = torch.empty_like(q)
    assert kernels.hstu_attention(q, k, v, off, alpha=ALPHA, out=out) is out
    assert torch.equal(out, kernels.hstu_attention(q, k, v, off, alpha=ALPHA))
    qp, cache, table, qsl, seq_lens, _ = _paged_case(torch.float64, 4, gen)
    out = torch.empty_like(qp)
    assert kernels.hstu_attention_paged(qp, cache, table, qsl, seq_lens, alpha=ALPHA, out=out) is out
    assert torch.equal(out, kernels.hstu_attention_paged(qp, cache, table, qsl, seq_lens, alpha=ALPHA))
    for bad, msg in ((torch.empty(3, 2, 8, dtype=torch.float64), "shape"), (torch.empty_like(q).float(), "float32"),
                     (torch.empty(q.shape[0], 2, 16, dtype=torch.float64)[..., ::2], "contiguous in its last")):
        with pytest.raises(ValueError, match=msg):
            kernels.hstu_attention(q, k, v, off, alpha=ALPHA, out=bad)


def test_near_bias_tiles():
    """tiles[h, t, r, c] = bias[h, min(|o + r - c|, R - 1)] at o = o_lo + t * min(BM, BN); the end tiles are all
    bias[R - 1], so the kernels may clamp offsets beyond them."""
    from kernels.triton_jagged import near_bias_tiles
    bias = torch.randn(3, 40, generator=torch.Generator().manual_seed(30))
    for R, bm, bn in [(1, 16, 16), (9, 32, 16), (40, 16, 32), (40, 64, 64), (17, 128, 32)]:
        tiles, o_lo = near_bias_tiles(bias[:, :R].contiguous(), bm, bn)
        step = min(bm, bn)
        o = o_lo + step * torch.arange(tiles.shape[1])
        want = bias[:, (o[:, None, None] + torch.arange(bm)[:, None] - torch.arange(bn)).abs().clamp(max=R - 1)]
        assert torch.equal(tiles, want), (R, bm, bn)
        far = bias[:, R - 1, None, None]
        assert (tiles[:, 0] == far).all() and (tiles[:, -1] == far).all()
        assert not (tiles[:, 1] == far).all() or R == 1  # and the table is no longer than it must be
        assert not (tiles[:, -2] == far).all() or R == 1


BIAS_LENGTHS = [1, 40, 100, 129, 200, 64, 7, 300]  # shorter and longer than R, multiples of the tiles and not


# config None: INTERPRET_CONFIG, (32, 16); R 129 is what the models use
@pytest.mark.parametrize("config,R", [(None, 20), (None, 129), ((16, 32, 4, 1), 20), ((64, 16, 4, 1), 129)])
def test_triton_jagged_bias_tiles_interpreter(interp, config, R):
    """Near key blocks read precomputed bias tiles: every mask, BLOCK_M > BLOCK_N and BLOCK_M < BLOCK_N; prefixes
    longer than a tile and tiles of candidates far past their history reach offsets beyond the tile table."""
    jag, _ = interp
    gen = torch.Generator().manual_seed(31)
    H, D = 2, 16
    q, k, v = _rand(sum(BIAS_LENGTHS), H, D, torch.float32, gen)
    off = _offsets(BIAS_LENGTHS)
    bias = torch.randn(H, R, generator=gen)
    prefix = torch.tensor([0, 35, 90, 5, 150, 0, 3, 70])
    cands = torch.tensor([1, 0, 60, 129, 10, 64, 2, 200])
    for kw in ({}, dict(prefix_lens=prefix), dict(num_candidates=cands),
               dict(prefix_lens=prefix, num_candidates=cands, norm="length")):
        want = ref.hstu_attention_naive(q.double(), k.double(), v.double(), off, alpha=ALPHA, rel_bias=bias.double(),
                                        **kw)
        got = jag.hstu_attention_triton(q, k, v, off, alpha=ALPHA, rel_bias=bias, config=config, **kw)
        assert _rel(got, want) < 1e-5, list(kw)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("config", [None, (16, 32, 4, 1)])
def test_triton_paged_bias_tiles_interpreter(interp, page, config, monkeypatch):
    """Chunked prefill with bias: requests whose first query position is a multiple of min(BLOCK_M, BLOCK_N) use
    the tiles, the others gather; both match the reference, and shifting the tiles moves exactly the first kind."""
    _, pag = interp
    gen = torch.Generator().manual_seed(32)
    ctx = (300, 200, 150, 129, 64, 40)
    qlens = (300, 72, 101, 40, 64, 3)  # first = 0, 128 (aligned); 49, 89, 0, 37 (aligned only for 0)
    q, cache, table, qsl, seq_lens, _ = _paged_case(torch.float32, page, gen, ctx=ctx, qlens=qlens)
    bias = torch.randn(2, 129, generator=gen)
    want = ref.hstu_attention_paged_naive(q.double(), cache.double(), table, qsl, seq_lens, alpha=ALPHA,
                                          rel_bias=bias.double())
    got = pag.hstu_attention_paged_triton(q, cache, table, qsl, seq_lens, alpha=ALPHA, rel_bias=bias, config=config)
    assert _rel(got, want) < 1e-5
    near_bias_tiles = pag.near_bias_tiles
    monkeypatch.setattr(pag, "near_bias_tiles", lambda *a: (lambda t, o: (t + 1.0, o))(*near_bias_tiles(*a)))
    shifted = pag.hstu_attention_paged_triton(q, cache, table, qsl, seq_lens, alpha=ALPHA, rel_bias=bias,
                                              config=config)
    moved = [not torch.equal(shifted[s:e], got[s:e]) for s, e in zip(qsl[:-1].tolist(), qsl[1:].tolist())]
    assert moved == [True, True, False, False, True, False]


def test_triton_write_kv_cache_interpreter(interp):
    _, pag = interp
    gen = torch.Generator().manual_seed(9)
    cache_a = torch.randn(4, 2, 8, 32, generator=gen).half()
    cache_b = cache_a.clone()
    k, v = torch.randn(2, 6, 2, 16, generator=gen).half()
    slots = torch.tensor([3, 17, -1, 8, 31, 0])
    ref.write_kv_cache_torch(k, v, cache_a, slots)
    pag.write_kv_cache_triton(k, v, cache_b, slots)
    assert torch.equal(cache_a, cache_b)


# ---------------------------------------------------------------------------------------------------------------
# Group-LayerNorm


def _gln_case(T, d, dtype, gen, G=3, gids=torch.int64, row_pad=0, gate=True):
    """x with a row stride of d + row_pad, groups, weight, bias and a gate that is a column slice of (T, 4d)."""
    wide = torch.randn(T, d + row_pad, generator=gen, dtype=torch.float64)
    x = (3.0 * wide + 0.5).to(dtype)[:, :d]
    groups = torch.randint(0, G, (T,), generator=gen).to(gids)
    weight = (1.0 + 0.5 * torch.randn(G, d, generator=gen, dtype=torch.float64)).to(dtype)
    bias = (0.5 * torch.randn(G, d, generator=gen, dtype=torch.float64)).to(dtype)
    u = torch.randn(T, 4 * d, generator=gen, dtype=torch.float64).to(dtype)[:, d:2 * d] if gate else None
    return x, groups, weight, bias, u


def _gln_want(x, groups, weight, bias, u, eps=1e-5):
    """float64 reference of the same inputs."""
    return ref.group_layer_norm_torch(x.double(), groups.long(), weight.double(), bias.double(), eps,
                                      None if u is None else u.double())


def test_group_layer_norm_torch_is_the_model_formula():
    """The CPU / autograd path computes, bit for bit, what GroupLayerNorm and HSTULayer computed before the fused
    kernel (training checkpoints depend on it), and gradients flow through it."""
    gen = torch.Generator().manual_seed(20)
    x, groups, weight, bias, u = _gln_case(11, 24, torch.float32, gen, row_pad=8)
    weight.requires_grad_()
    old = (torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * weight[groups] + bias[groups]) * u
    new = kernels.group_layer_norm(x, groups, weight, bias, 1e-6, gate=u)
    assert torch.equal(new, old)
    assert torch.equal(kernels.group_layer_norm(x, groups, weight, bias, 1e-6),
                       torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * weight[groups] + bias[groups])
    new.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def interp_gln():
    """Interpreted kernels.group_norm (the dispatch picks it up from sys.modules while these tests run)."""
    yield from _interpreted("kernels.group_norm")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("d", [16, 24, 100])  # power of two and not
@pytest.mark.parametrize("gate", [False, True])
def test_triton_group_layer_norm_interpreter(interp_gln, dtype, tol, d, gate):
    (gn,) = interp_gln
    gen = torch.Generator().manual_seed(21 + d)
    for gids, row_pad in ((torch.int64, 0), (torch.int32, 5)):  # contiguous x; x with a row stride of d + 5
        x, groups, weight, bias, u = _gln_case(13, d, dtype, gen, gids=gids, row_pad=row_pad, gate=gate)
        got = gn.group_layer_norm_triton(x, groups, weight, bias, 1e-5, u)
        assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
        assert _rel(got, _gln_want(x, groups, weight, bias, u)) < tol, (gids, row_pad)


def test_triton_group_layer_norm_dispatch_wide_and_empty(interp_gln):
    """backend='triton' through the public function; d = 1000 (BLOCK_D 1024) and 1024; no rows."""
    gen = torch.Generator().manual_seed(22)
    for d in (1000, 1024):
        x, groups, weight, bias, u = _gln_case(5, d, torch.float32, gen, gids=torch.int32, row_pad=3)
        got = kernels.group_layer_norm(x, groups, weight, bias, 1e-5, gate=u, backend="triton")
        assert _rel(got, _gln_want(x, groups, weight, bias, u)) < 1e-5
    x, groups, weight, bias, u = _gln_case(0, 8, torch.bfloat16, gen)
    got = kernels.group_layer_norm(x, groups, weight, bias, gate=u, backend="triton")
    assert got.shape == (0, 8) and got.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="autograd"):
        kernels.group_layer_norm(x, groups, weight.requires_grad_(), bias, backend="triton")
    with pytest.raises(ValueError, match="alike"):
        kernels.group_layer_norm(x, groups, weight.detach().float(), bias, backend="triton")


def test_group_layer_norm_argument_errors(monkeypatch):
    gn = importlib.import_module("kernels.group_norm")
    monkeypatch.setattr(gn, "INTERPRET", False)  # as without TRITON_INTERPRET=1 in the environment
    x, groups, weight, bias, u = _gln_case(6, 8, torch.float32, torch.Generator().manual_seed(23))
    gln = kernels.group_layer_norm
    cases = [
        ("backend", dict(backend="cuda")),
        ("x must be", dict(x=x[0])),
        ("groups must be a 1-D integer", dict(groups=groups.float())),
        ("groups must have one entry per row", dict(groups=groups[:4])),
        ("weight must be", dict(weight=weight[:, :4])),
        ("bias shape", dict(bias=bias[:2])),
        ("gate shape", dict(gate=u[:, :4])),
        ("gate must be floating", dict(gate=torch.ones(6, 8, dtype=torch.int64))),
        (r"group ids must lie in \[0, 3\)", dict(groups=torch.tensor([0, 1, 2, 3, 0, 0]))),
        ("CUDA", dict(backend="triton")),
    ]
    for match, kw in cases:
        args = dict(x=x, groups=groups, weight=weight, bias=bias, gate=u)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            gln(args.pop("x"), args.pop("groups"), args.pop("weight"), args.pop("bias"), **args)
