"""rows="last": the kernels compute only each sequence's last tile, and the model's last layer only the last rows.

Scoring reads one position per user, so the last layer's attention, norms and output projection run on those rows
only. The last rows must come out exactly as in the full computation."""
from __future__ import annotations

import pytest
import torch

import kernels
from batch.model import MTGR, MTGRConfig
from tests.test_kernels import ALPHA, _interpreted, _offsets, _paged_case, _rand

LENGTHS = [1, 17, 40, 64, 5, 33, 2, 0, 48]


@pytest.fixture(scope="module")
def interp():
    yield from _interpreted("kernels.triton_jagged", "kernels.triton_paged")


@pytest.mark.parametrize("bias", [False, True])
def test_jagged_last_rows_are_bit_identical(interp, bias):
    jag, _ = interp
    gen = torch.Generator().manual_seed(11)
    H, D = 2, 16
    q, k, v = _rand(sum(LENGTHS), H, D, torch.float32, gen)
    kw = dict(rel_bias=torch.randn(H, 9, generator=gen)) if bias else {}
    off = _offsets(LENGTHS)
    full = jag.hstu_attention_triton(q, k, v, off, alpha=ALPHA, **kw)
    last = jag.hstu_attention_triton(q, k, v, off, alpha=ALPHA, rows="last", **kw)
    ends = off[1:][torch.tensor(LENGTHS) > 0] - 1
    assert torch.equal(last[ends], full[ends])


@pytest.mark.parametrize("page", [8, 32])
def test_paged_last_rows_are_bit_identical(interp, page):
    _, pag = interp
    gen = torch.Generator().manual_seed(12)
    # query chunks longer than the interpreter's 32-row tile, full prefills and a chunk ending mid-context
    q, cache, table, qsl, seq_lens, _ = _paged_case(torch.float32, page, gen, qlens=(1, 17, 40, 33, 5))
    bias = torch.randn(2, 11, generator=gen)
    full = pag.hstu_attention_paged_triton(q, cache, table, qsl, seq_lens, alpha=ALPHA, rel_bias=bias)
    last = pag.hstu_attention_paged_triton(q, cache, table, qsl, seq_lens, alpha=ALPHA, rel_bias=bias, rows="last")
    ends = qsl[1:] - 1
    assert torch.equal(last[ends], full[ends])


def test_rows_argument_is_checked():
    q, k, v = _rand(4, 1, 8, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="rows must be 'all' or 'last'"):
        kernels.hstu_attention(q, k, v, _offsets([4]), alpha=ALPHA, rows="first")


def test_model_last_only_matches_full_forward():
    torch.manual_seed(0)
    cfg = MTGRConfig(d_model=32, num_layers=2, num_heads=2, max_seq_len=128, num_items=50)
    model = MTGR(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.rel_bias.normal_()
    lengths = [1, 30, 7, 64]
    offsets = _offsets(lengths)
    lay = model.embed.layout
    tokens = torch.randint(lay.item_offset, lay.vocab_size, (sum(lengths),))
    with torch.no_grad():
        full = model(tokens, offsets)[model.last_positions(offsets)]
        last = model(tokens, offsets, last_only=True)
    assert last.shape == (len(lengths), cfg.d_model)
    torch.testing.assert_close(last, full, rtol=1e-6, atol=1e-6)
