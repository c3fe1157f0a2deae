"""Triton forward kernel for a GEMM with its elementwise follower in its epilogue: y = silu(x @ weight.T + bias)
(the HSTU layer's uvqk projection) or y = residual + x @ weight.T + bias (its output projection).

cuBLAS runs the projections at full speed, but F.silu after the first and the residual add after the second read
and write the whole output once more (H100 profile, DLRMv3-like shape: the SiLU pass cost 16% of all GPU time,
nearly as much as its GEMM, and the add 5%). Here one program computes a (BLOCK_M, BLOCK_N) tile of y: it walks K
in BLOCK_K steps with tl.dot into a float32 accumulator, then adds the bias, applies SiLU or adds the residual in
float32 and writes the tile once in x.dtype. Programs are numbered in groups of GROUP_M row-blocks that sweep the
column-blocks together, so the x rows and weight columns a group reads stay in L2. Ragged M and N edges wrap around
on load (row m reads row m mod M, which is never stored) and are masked on store; a K that is not a multiple of
BLOCK_K is masked on load (one that is not a multiple of 16 is then not pipelined by Triton 3.9, which can no
longer prove the loads aligned; the models' K are multiples of 64). x may have any row stride (its last dim must be
contiguous); weight is nn.Linear's (N, K). Tile sizes come from a fixed table (no autotuning on the job's critical
path; `python -m kernels.bench --sweep --sweep-kernels linear_silu` times candidates). Inputs are validated by
kernels.linear_silu and kernels.linear_add. The module is not called linear_silu.py: importing a submodule of that
name would replace the function kernels.linear_silu on the package.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # fast division on the GPU; the CPU interpreter has no libdevice
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read when this module's kernel is decorated

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). 16-bit inputs, measured on the H100 (bench
# linear_silu_sweep, 3f23e70; `python -m kernels.bench --sweep --sweep-kernels linear_silu` times kernels/bench.py's
# LS_SWEEP candidates): 128 x 128 x 64 tiles, one warpgroup, 3 stages (96 KiB of shared memory, two programs per SM,
# so one's epilogue overlaps the other's main loop) won at every M from 16k to 131k rows for K 512 -> N 2048 and
# K 1024 -> N 4096 (411 against 373 TFLOP/s for 128 x 256 / 8 warps at 65k x 512 -> 2048), and within 3% of the
# best at 1-2k rows. Float32 (the accuracy path; tf32 only when torch allows it for matmuls): 32-wide K steps so
# that three stages fit shared memory.
CONFIGS: dict[torch.dtype, tuple] = {
    torch.bfloat16: (128, 128, 64, 8, 4, 3),
    torch.float16: (128, 128, 64, 8, 4, 3),
    torch.float32: (128, 128, 32, 8, 8, 3),
}
# (K, N) -> config for 16-bit inputs, where measured better than CONFIGS (the sweep fills it for its run).
SHAPE_CONFIGS: dict[tuple[int, int], tuple] = {}
# When those tiles would leave SMs idle (fewer tiles than SMs: M of a few thousand rows): smaller ones for fp32;
# 16-bit keeps its tiles (the sweep's best there).
SMALL_GRID_CONFIGS: dict[torch.dtype, tuple] = {
    torch.bfloat16: (128, 128, 64, 8, 4, 3),
    torch.float16: (128, 128, 64, 8, 4, 3),
    torch.float32: (64, 128, 32, 8, 4, 3),
}
INTERPRET_CONFIG = (16, 16, 16, 2, 1, 1)

_SM_COUNT: dict[int, int] = {}


def silu_mode(dtype) -> int:
    return 0 if INTERPRET else (2 if dtype == torch.bfloat16 else 1)


@triton.jit
def _silu(s, SILU: tl.constexpr):
    """silu(s) in float32. SILU 0: exact (interpreter); 1: fast division (fp32 / fp16 on the GPU); 2: one tanh.approx
    per element, silu(s) = h + h * tanh(h) with h = s / 2 (bf16 outputs: tanh.approx's 2^-11 relative error gives at
    most ~2.5e-4 * |s|, under the bf16 rounding of the result for s >= -2 and under that of a unit-sized value for
    s >= -8; the SFU, which bounds this epilogue, then does one operation per element instead of two)."""
    if SILU == 2:
        h = 0.5 * s
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [h], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return h * t + h
    elif SILU == 1:
        return libdevice.fast_dividef(s, 1.0 + tl.exp(-s))
    else:
        return s / (1.0 + tl.exp(-s))  # exp overflows to inf for s < -88 and the result is -0


@triton.jit
def _fused_linear_fwd(X, W, B, R, Y, M, N, K, stride_xm, stride_wn, stride_rm, stride_ym,
                      HAS_BIAS: tl.constexpr, ADD_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
                      PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, SILU: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # ADD_RESIDUAL: y = R + x @ W.T + b; else y = silu(x @ W.T + b).
    # Program -> (pid_m, pid_n): groups of GROUP_M row-blocks (the last group may be shorter); inside a group the
    # row-block changes fastest, so consecutive programs share a weight tile and a group reuses its x rows.
    pid = tl.program_id(0)
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge read row m mod M / column n mod N: in bounds, and never stored.
    xm = (rm % M).to(tl.int64)  # M * stride can pass 2^31
    wn = (rn % N).to(tl.int64)
    x_ptrs = X + xm[:, None] * stride_xm + rk[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + wn[None, :] * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N): a tile of weight.T

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see kernels/group_norm.py on jit helpers
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(x_ptrs, mask=rk[None, :] < K - k0, other=0.0)
            b = tl.load(w_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        if DOT_FP32:  # the interpreter's bf16 tl.dot (see linear_silu_triton)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    rows = rm.to(tl.int64)[:, None]
    if ADD_RESIDUAL:
        y = acc + tl.load(R + rows * stride_rm + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    else:
        y = _silu(acc, SILU)
    tl.store(Y + rows * stride_ym + rn[None, :], y.to(Y.dtype.element_ty), mask=ok)


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, config=None, sm_count: int | None = None) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): explicit, else the interpreter's small one, else
    SHAPE_CONFIGS[(K, N)] (16-bit) or CONFIGS[dtype], or SMALL_GRID_CONFIGS[dtype] when those tiles would number
    fewer than sm_count."""
    if config is not None:
        return tuple(config)
    if INTERPRET:
        return INTERPRET_CONFIG
    cfg = (dtype != torch.float32 and SHAPE_CONFIGS.get((K, N))) or CONFIGS[dtype]
    if sm_count is not None and triton.cdiv(M, cfg[0]) * triton.cdiv(N, cfg[1]) < sm_count:
        return SMALL_GRID_CONFIGS[dtype]
    return cfg


def linear_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                       config=None) -> torch.Tensor:
    """silu(x @ weight.T + bias): x (M, K) with a contiguous last dim, weight (N, K), bias (N,) or None, all one of
    fp16 / bf16 / fp32. Returns a contiguous (M, N) tensor in x.dtype."""
    return _launch(x, weight, bias, None, config)


def linear_add_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, *,
                      config=None) -> torch.Tensor:
    """residual + x @ weight.T + bias: as linear_silu_triton, with residual (M, N) in x.dtype (its last dim
    contiguous)."""
    return _launch(x, weight, bias, residual, config)


def _launch(x, weight, bias, residual, config) -> torch.Tensor:
    M, K = x.shape
    N = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    bm, bn, bk, group_m, num_warps, num_stages = pick_config(
        M, N, K, x.dtype, config, None if INTERPRET or not x.is_cuda else _sm_count(x.device))
    # Triton's default "tf32" (which 16-bit inputs ignore), or exact fp32 products for fp32 inputs unless torch allows
    # tf32 for matmuls, as F.linear does on CUDA.
    exact = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    # Triton 3.9's interpreter multiplies bf16 dot operands as their raw uint16 bits; there they are widened first
    # (exactly: a bf16 product fits a float32).
    dot_fp32 = INTERPRET and x.dtype == torch.bfloat16
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fused_linear_fwd[grid](
        x, weight, bias if bias is not None else x, residual if residual is not None else x, y, M, N, K, x.stride(0),
        weight.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        HAS_BIAS=bias is not None, ADD_RESIDUAL=residual is not None, EVEN_K=K % bk == 0,
        PRECISION="ieee" if exact else "tf32", DOT_FP32=dot_fp32, SILU=silu_mode(x.dtype), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages)
    return y
