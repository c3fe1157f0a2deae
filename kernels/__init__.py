"""HSTU attention, Group-LayerNorm and fused linear (+ SiLU or + residual) kernels (Triton on CUDA, PyTorch
reference elsewhere). Imports nothing from batch/, and Triton only when a Triton kernel runs."""
from __future__ import annotations

import importlib

import torch

from . import reference
from .hstu_attention import hstu_attention, hstu_attention_paged, write_kv_cache

__all__ = ["group_layer_norm", "hstu_attention", "hstu_attention_paged", "linear_add", "linear_silu",
           "write_kv_cache"]

_GLN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _gln_fail(msg: str):
    raise ValueError(f"group_layer_norm: {msg}")


def _triton_module(name: str):
    """kernels.<name> as sys.modules has it now (the tests swap in interpreted copies), or None without Triton."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None


def _gln_check(x, groups, weight, bias, gate, backend: str) -> None:
    if backend not in ("auto", "triton", "torch"):
        _gln_fail(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if x.dim() != 2 or not x.dtype.is_floating_point:
        _gln_fail(f"x must be a floating (tokens, dim) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    T, d = x.shape
    if groups.dim() != 1 or groups.dtype.is_floating_point or groups.dtype == torch.bool or groups.is_complex():
        _gln_fail(f"groups must be a 1-D integer tensor, got {groups.dtype} of shape {tuple(groups.shape)}")
    if groups.numel() != T:
        _gln_fail(f"groups must have one entry per row of x ({T}), got {groups.numel()}")
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] < 1:
        _gln_fail(f"weight must be (num_groups, {d}), got {tuple(weight.shape)}")
    if bias.shape != weight.shape:
        _gln_fail(f"bias shape {tuple(bias.shape)} != weight shape {tuple(weight.shape)}")
    if gate is not None and gate.shape != x.shape:
        _gln_fail(f"gate shape {tuple(gate.shape)} != x shape {tuple(x.shape)}")
    for name, t in (("groups", groups), ("weight", weight), ("bias", bias), ("gate", gate)):
        if t is not None and t.device != x.device:
            _gln_fail(f"{name} is on {t.device}, x on {x.device}")
    for name, t in (("weight", weight), ("bias", bias), ("gate", gate)):
        if t is not None and not t.dtype.is_floating_point:
            _gln_fail(f"{name} must be floating, got {t.dtype}")
    if not x.is_cuda and T:  # on the GPU this would cost a sync; there an out-of-range id is the caller's bug
        lo, hi = int(groups.min()), int(groups.max())
        if lo < 0 or hi >= weight.shape[0]:
            _gln_fail(f"group ids must lie in [0, {weight.shape[0]}), got [{lo}, {hi}]")


def _gln_triton_unsupported(x, weight, bias, gate, max_d: int) -> str | None:
    """Why the Triton kernel can't take these inputs, or None."""
    dtypes = {t.dtype for t in (x, weight, bias, gate) if t is not None}
    if x.dtype not in _GLN_DTYPES or len(dtypes) > 1:
        return (f"the Triton kernel needs x, weight, bias (and gate) all fp16, bf16 or fp32 alike; got "
                f"{', '.join(sorted(str(t)[6:] for t in dtypes))}")
    if x.shape[1] > max_d:
        return f"the Triton kernel takes dim <= {max_d}, got {x.shape[1]}"
    return None


def group_layer_norm(x: torch.Tensor, groups: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float = 1e-5, gate: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Group-LayerNorm: (layer_norm(x) * weight[groups] + bias[groups]) * gate (gate optional).

    x (T, d) floating; groups (T,) int32/int64 ids in [0, num_groups); weight, bias (num_groups, d); gate None or
    (T, d), e.g. a column slice of a wider tensor. backend "auto" runs the fused Triton kernel (one memory pass,
    statistics in float32, result in x.dtype) for CUDA inputs when no autograd is needed and x, weight, bias and gate
    share an fp16/bf16/fp32 dtype, and the PyTorch reference otherwise (differentiable; dtype promotion as PyTorch
    does it); "triton" / "torch" force one and "triton" raises if it can't run.
    """
    _gln_check(x, groups, weight, bias, gate, backend)
    if backend == "torch":
        return reference.group_layer_norm_torch(x, groups, weight, bias, eps, gate)
    tensors = (x, weight, bias, gate)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    gn = _triton_module("group_norm") if backend == "triton" or x.is_cuda else None
    if backend == "triton":
        if gn is None:
            _gln_fail("backend='triton' needs Triton, which is not installed")
        if not x.is_cuda and not gn.INTERPRET:
            _gln_fail("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
        if needs_grad:
            _gln_fail("the Triton kernel is forward only; use backend='torch' for autograd")
        why = _gln_triton_unsupported(x, weight, bias, gate, gn.MAX_D)
        if why:
            _gln_fail(why)
    elif gn is None or needs_grad or _gln_triton_unsupported(x, weight, bias, gate, gn.MAX_D):
        return reference.group_layer_norm_torch(x, groups, weight, bias, eps, gate)
    return gn.group_layer_norm_triton(x, groups, weight, bias, eps, gate)


_LS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _ls_fail(msg: str, fn: str = "linear_silu"):
    raise ValueError(f"{fn}: {msg}")


def _ls_check(x, weight, bias, backend: str, fn: str = "linear_silu") -> None:
    if backend not in ("auto", "triton", "torch"):
        _ls_fail(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}", fn)
    if x.dim() != 2 or not x.dtype.is_floating_point:
        _ls_fail(f"x must be a floating (rows, in_features) tensor, got {x.dtype} of shape {tuple(x.shape)}", fn)
    K = x.shape[1]
    if weight.dim() != 2 or weight.shape[1] != K or not weight.dtype.is_floating_point:
        _ls_fail(f"weight must be a floating (out_features, {K}) tensor, got {weight.dtype} of shape "
                 f"{tuple(weight.shape)}", fn)
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.dtype.is_floating_point):
        _ls_fail(f"bias must be None or a floating ({weight.shape[0]},) tensor, got {bias.dtype} of shape "
                 f"{tuple(bias.shape)}", fn)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            _ls_fail(f"{name} is on {t.device}, x on {x.device}", fn)


def _ls_triton_unsupported(x, weight, bias) -> str | None:
    """Why the Triton kernel can't take these inputs, or None."""
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if x.dtype not in _LS_DTYPES or len(dtypes) > 1:
        return (f"the Triton kernel needs x, weight (and bias) all fp16, bf16 or fp32 alike; got "
                f"{', '.join(sorted(str(t)[6:] for t in dtypes))}")
    return None


def linear_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                backend: str = "auto") -> torch.Tensor:
    """silu(x @ weight.T + bias): nn.Linear followed by SiLU, as one GEMM with the bias and SiLU in its epilogue.

    x (M, K) floating, any row stride (e.g. a column slice); weight (N, K) as nn.Linear keeps it; bias None or (N,).
    backend "auto" runs the fused Triton kernel (float32 accumulation and SiLU, result in x.dtype, one write of the
    (M, N) output) for CUDA inputs when no autograd is needed and x, weight and bias share an fp16/bf16 dtype
    (fp32 stays with cuBLAS: exact fp32 products ran at half its speed on the H100), and the PyTorch reference
    F.silu(F.linear(...)) otherwise (differentiable; dtype rules as PyTorch's); "triton" / "torch" force one and
    "triton" raises if it can't run. The Triton result is contiguous.
    """
    _ls_check(x, weight, bias, backend)
    fl = _ls_pick(x, weight, bias, backend)
    return reference.linear_silu_torch(x, weight, bias) if fl is None else fl.linear_silu_triton(x, weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, *,
               backend: str = "auto") -> torch.Tensor:
    """residual + x @ weight.T + bias: nn.Linear followed by a residual add, as one GEMM with the bias and the add in
    its epilogue. residual (M, N) in x.dtype on x.device (any row stride, last dim contiguous); everything else and
    the dispatch as in linear_silu. The reference computes residual + F.linear(x, weight, bias)."""
    _ls_check(x, weight, bias, backend, "linear_add")
    M, N = x.shape[0], weight.shape[0]
    if residual.shape != (M, N) or residual.dtype != x.dtype or residual.device != x.device:
        _ls_fail(f"residual must be {x.dtype} of shape ({M}, {N}) on {x.device}, got {residual.dtype} of shape "
                 f"{tuple(residual.shape)} on {residual.device}", "linear_add")
    fl = _ls_pick(x, weight, bias, backend, residual, fn="linear_add")
    if fl is None:
        return reference.linear_add_torch(x, weight, bias, residual)
    return fl.linear_add_triton(x, weight, bias, residual)


def _ls_pick(x, weight, bias, backend: str, *more, fn: str = "linear_silu"):
    """kernels.fused_linear when the fused kernel runs these inputs, None for the PyTorch reference."""
    if backend == "torch":
        return None
    tensors = (x, weight, bias, *more)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    fl = _triton_module("fused_linear") if backend == "triton" or x.is_cuda else None
    if backend == "triton":
        if fl is None:
            _ls_fail("backend='triton' needs Triton, which is not installed", fn)
        if not x.is_cuda and not fl.INTERPRET:
            _ls_fail("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1)", fn)
        if needs_grad:
            _ls_fail("the Triton kernel is forward only; use backend='torch' for autograd", fn)
        why = _ls_triton_unsupported(x, weight, bias)
        if why:
            _ls_fail(why, fn)
        return fl
    # fp32 stays with cuBLAS: on the H100 the fused kernel ran at 0.51x of F.linear + F.silu with exact fp32
    # products, and at 0.94x (3f23e70) and 1.16x (86fbc20) with TF32, which torch leaves off by default.
    if fl is None or needs_grad or _ls_triton_unsupported(x, weight, bias) or x.dtype == torch.float32:
        return None
    return fl
