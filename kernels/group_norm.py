"""Triton forward kernel for Group-LayerNorm: y = (LN(x) * weight[g] + bias[g]) * gate in one memory pass.

The unfused PyTorch form materialises weight[groups] and bias[groups] as (T, d) tensors and makes one pass over
memory per op (layer_norm, *, +, * gate). Here one program reads BLOCK_M rows of x (and of the gate), takes the row
statistics in float32, gathers the (tiny, cache-resident) affine rows of each row's group and writes y once in
x.dtype. A row is BLOCK_D = next_power_of_2(d) wide and masked, so d need not be a power of two. x and the gate may
have any row stride (the gate is usually a column slice of the (T, 4d) uvqk projection); their last dim must be
contiguous. Inputs are validated by kernels.group_layer_norm.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read when this module's kernel is decorated
# The kernel reduces with its own _add rather than tl.sum: tl.sum is a jit function of triton.language, decorated
# when Triton was first imported, and the tests interpret this module after Triton was imported without the flag.

MAX_D = 8192  # one program holds whole rows in registers
# BLOCK_M * BLOCK_D on the GPU, 4 warps. On an H100 (bf16, T=131072, with the gate) `python -m kernels.bench
# --sweep --sweep-kernels group_norm` put (BLOCK_M, num_warps) = (4, 4) first at d 512 (2.87 TB/s; 8 rows: 2.87,
# 8 rows / 8 warps: 2.81, 1 row: 2.36) and (2, 4) at d 768 (2.75 TB/s; 1 row: 2.70, 4 rows / 8 warps: 2.63).
ELEMS_PER_PROGRAM = 2048
# (BLOCK_M, num_warps) per BLOCK_D where measured better than the rule in pick_config (`python -m kernels.bench
# --sweep --sweep-kernels group_norm` fills it for the run).
CONFIGS: dict[int, tuple[int, int]] = {}


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _group_ln_fwd(X, G, W, B, GATE, Y, T, D, stride_x, stride_gate, stride_y, stride_w, stride_b, eps,
                  HAS_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    ok = row_ok[:, None] & (cols < D)[None, :]
    r = rows.to(tl.int64)[:, None]  # T * stride can pass 2^31

    x = tl.load(X + r * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.reduce(x, 1, _add) / D
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.reduce(xc * xc, 1, _add) / D  # biased, as F.layer_norm
    rstd = 1.0 / tl.sqrt(var + eps)

    g = tl.load(G + rows, mask=row_ok, other=0).to(tl.int64)[:, None]
    w = tl.load(W + g * stride_w + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + g * stride_b + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w + b
    if HAS_GATE:
        u = tl.load(GATE + r * stride_gate + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        y = y * u
    tl.store(Y + r * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


def pick_config(D: int, config=None) -> tuple[int, int]:
    """(BLOCK_M, num_warps): explicit, else a small tile in the interpreter, else CONFIGS[BLOCK_D], else about
    ELEMS_PER_PROGRAM elements per program (4 rows of 512, 2 rows of 768 / 1024) with 4 warps, 8 for rows wider
    than 2048."""
    if config is not None:
        return tuple(config)
    block_d = triton.next_power_of_2(D)
    if INTERPRET:
        return (4, 1)
    if block_d in CONFIGS:
        return CONFIGS[block_d]
    return max(1, min(16, ELEMS_PER_PROGRAM // block_d)), (8 if block_d > 2048 else 4)


def group_layer_norm_triton(x: torch.Tensor, groups: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float = 1e-5, gate: torch.Tensor | None = None, *, config=None) -> torch.Tensor:
    """Launch the fused kernel: x (T, d), groups (T,) int32/int64 in [0, G), weight / bias (G, d), gate None or
    (T, d). Returns a contiguous (T, d) tensor in x.dtype."""
    T, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if gate is not None and gate.stride(-1) != 1:
        gate = gate.contiguous()
    weight, bias, groups = weight.contiguous(), bias.contiguous(), groups.contiguous()
    y = torch.empty((T, D), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    block_m, num_warps = pick_config(D, config)
    has_gate = gate is not None
    _group_ln_fwd[(triton.cdiv(T, block_m),)](
        x, groups, weight, bias, gate if has_gate else x, y, T, D,
        x.stride(0), gate.stride(0) if has_gate else 0, y.stride(0), weight.stride(0), bias.stride(0), float(eps),
        HAS_GATE=has_gate, BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(D), num_warps=num_warps)
    return y
