"""Fused linear + SiLU: the PyTorch reference is the model's old formula, the Triton kernel (in the CPU interpreter,
by the same mechanism as tests/test_kernels.py) matches a float64 reference, and the public function's dispatch and
errors."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference as ref
from tests.test_kernels import _interpreted, _rel


def _case(M, N, K, dtype, gen, col_offset=0, bias=True):
    """x (M, K), a column slice of a wider (M, K + col_offset + 3) tensor when col_offset > 0 (row stride != K,
    data not at the start); weight (N, K) scaled so x @ weight.T is ~N(0, 1); bias (N,) ~N(0, 0.25) or None."""
    wide = torch.randn(M, K + col_offset + (3 if col_offset else 0), generator=gen, dtype=torch.float64).to(dtype)
    x = wide[:, col_offset:col_offset + K]
    weight = (torch.randn(N, K, generator=gen, dtype=torch.float64) / max(K, 1) ** 0.5).to(dtype)
    b = (0.5 * torch.randn(N, generator=gen, dtype=torch.float64)).to(dtype) if bias else None
    return x, weight, b


def _want(x, weight, bias):
    """float64 reference of the same (already rounded) inputs."""
    return ref.linear_silu_torch(x.double(), weight.double(), None if bias is None else bias.double())


def _want_add(x, weight, bias, residual):
    return ref.linear_add_torch(x.double(), weight.double(), None if bias is None else bias.double(),
                                residual.double())


def test_reference_is_the_model_formula():
    """The CPU / autograd path is, bit for bit, F.silu(nn.Linear(x)) (training checkpoints depend on it), and
    gradients flow through the public function."""
    gen = torch.Generator().manual_seed(40)
    lin = torch.nn.Linear(24, 96)
    x = torch.randn(11, 40, generator=gen)[:, 8:32]
    got = kernels.linear_silu(x, lin.weight, lin.bias)
    assert torch.equal(got, F.silu(lin(x)))
    assert torch.equal(kernels.linear_silu(x, lin.weight), F.silu(F.linear(x, lin.weight)))
    got.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0 and lin.bias.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def interp_ls():
    """Interpreted kernels.fused_linear (the dispatch picks it up from sys.modules while these tests run)."""
    yield from _interpreted("kernels.fused_linear")


# bf16: one rounding of the output (Triton 3.9's interpreter truncates fp32 -> bf16: up to 2^-8 relative, ~3e-3
# over a tensor; the GPU rounds to nearest); fp32: accumulation order.
TOLS = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]
# (M, N, K): ragged in every dim against INTERPRET_CONFIG's 16 x 16 x 16 tiles (K 40: a masked K tail), exact
# multiples (K 32: the unmasked K loop), one element, K smaller than one tile.
SHAPES = [(37, 45, 40), (32, 48, 32), (1, 1, 1), (50, 70, 7)]


@pytest.mark.parametrize("dtype,tol", TOLS)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("epilogue", ["silu", "add"])
def test_triton_fused_linear_interpreter(interp_ls, dtype, tol, M, N, K, bias, epilogue):
    """Both epilogues (SiLU; residual add, with a row-strided residual) against float64."""
    (fl,) = interp_ls
    gen = torch.Generator().manual_seed(41 + M + N + K)
    x, weight, b = _case(M, N, K, dtype, gen, bias=bias)
    if epilogue == "silu":
        got, want = fl.linear_silu_triton(x, weight, b), _want(x, weight, b)
        wrong = [F.linear(x.double(), weight.double(), None if b is None else b.double())]  # no SiLU
    else:
        residual = (3 * torch.randn(M, N + 4, generator=gen, dtype=torch.float64)).to(dtype)[:, 2:N + 2]
        got, want = fl.linear_add_triton(x, weight, b, residual), _want_add(x, weight, b, residual)
        wrong = [residual.double(), _want(x, weight, b)]  # no GEMM; SiLU instead of the add
    assert got.dtype == dtype and got.shape == (M, N) and got.is_contiguous()
    assert _rel(got, want) < tol
    if M * N > 100:  # the check can fail: a kernel that dropped a term would be far off
        assert all(_rel(w, want) > 10 * tol for w in wrong)
        if bias:
            drop_bias = _want(x, weight, None) if epilogue == "silu" else _want_add(x, weight, None, residual)
            assert _rel(drop_bias, want) > 10 * tol


# Explicit tiles: BLOCK_M > BLOCK_N and K steps of 32 (K 40 has a masked tail); GROUP_M 3 over 2 or 4 row-blocks
# (a short last group); GROUP_M 1 (plain row-major order); a tile larger than the whole problem.
@pytest.mark.parametrize("config", [(32, 16, 32, 3, 4, 2), (16, 32, 16, 1, 4, 1), (64, 64, 64, 8, 4, 1)])
def test_triton_linear_silu_interpreter_configs(interp_ls, config):
    (fl,) = interp_ls
    gen = torch.Generator().manual_seed(42)
    for M, N, K in ((37, 45, 40), (100, 20, 64)):
        x, weight, b = _case(M, N, K, torch.float32, gen)
        assert _rel(fl.linear_silu_triton(x, weight, b, config=config), _want(x, weight, b)) < 1e-5, (M, N, K)


@pytest.mark.parametrize("dtype,tol", TOLS[:2])
def test_triton_linear_silu_interpreter_strided_x(interp_ls, dtype, tol):
    """x a column slice (row stride K + 8, data 5 columns in) as a (T, 4d) tensor's slice would be; a transposed x
    (last dim not contiguous) is copied first."""
    (fl,) = interp_ls
    gen = torch.Generator().manual_seed(43)
    x, weight, b = _case(29, 33, 24, dtype, gen, col_offset=5)
    assert x.stride() == (24 + 8, 1)
    got = fl.linear_silu_triton(x, weight, b)
    assert got.is_contiguous() and _rel(got, _want(x, weight, b)) < tol
    xt = x.t().contiguous().t()
    assert xt.stride(-1) != 1
    assert _rel(fl.linear_silu_triton(xt, weight, b), _want(x, weight, b)) < tol


def test_triton_linear_silu_dispatch_and_empty(interp_ls):
    """backend='triton' through the public function; no rows; autograd and mixed dtypes refused."""
    gen = torch.Generator().manual_seed(44)
    x, weight, b = _case(19, 21, 18, torch.bfloat16, gen, col_offset=2)
    assert not x.is_contiguous()
    got = kernels.linear_silu(x, weight, b, backend="triton")
    assert got.dtype == torch.bfloat16 and _rel(got, _want(x, weight, b)) < 1e-2
    x0 = torch.empty(0, 18, dtype=torch.bfloat16)
    got = kernels.linear_silu(x0, weight, b, backend="triton")
    assert got.shape == (0, 21) and got.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="autograd"):
        kernels.linear_silu(x, weight.clone().requires_grad_(), b, backend="triton")
    with torch.no_grad():  # no autograd needed: the kernel runs
        kernels.linear_silu(x, weight.clone().requires_grad_(), b, backend="triton")
    with pytest.raises(ValueError, match="alike"):
        kernels.linear_silu(x, weight.float(), b, backend="triton")
    with pytest.raises(ValueError, match="alike"):
        kernels.linear_silu(x.double(), weight.double(), b.double(), backend="triton")
    # auto on CPU tensors is the reference even with the interpreter loaded
    assert torch.equal(kernels.linear_silu(x, weight, b), ref.linear_silu_torch(x, weight, b))


def test_linear_silu_argument_errors(monkeypatch):
    fl = importlib.import_module("kernels.fused_linear")
    monkeypatch.setattr(fl, "INTERPRET", False)  # as without TRITON_INTERPRET=1 in the environment
    x, weight, b = _case(6, 10, 8, torch.float32, torch.Generator().manual_seed(45))
    cases = [
        ("backend must be", dict(backend="cuda")),
        ("x must be a floating", dict(x=x[0])),
        ("x must be a floating", dict(x=x.long())),
        (r"weight must be a floating \(out_features, 8\)", dict(weight=weight[:, :4])),
        ("weight must be a floating", dict(weight=weight[0])),
        ("weight must be a floating", dict(weight=weight.int())),
        (r"bias must be None or a floating \(10,\)", dict(bias=b[:4])),
        ("bias must be None", dict(bias=b[None])),
        ("bias must be None", dict(bias=b.int())),
        ("weight is on meta, x on cpu", dict(weight=weight.to("meta"))),
        ("bias is on meta", dict(bias=b.to("meta"))),
        ("CUDA", dict(backend="triton")),
    ]
    for match, kw in cases:
        args = dict(x=x, weight=weight, bias=b)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            kernels.linear_silu(args.pop("x"), args.pop("weight"), **args)
    with pytest.raises(ValueError, match=r"^linear_silu: "):  # every message names the function
        kernels.linear_silu(x, weight[:, :4])


def test_pick_config(monkeypatch):
    """The GPU's choice: CONFIGS, SHAPE_CONFIGS[(K, N)] for 16-bit inputs, the small-grid tiles when the grid
    would have fewer programs than SMs, an explicit config first."""
    fl = importlib.import_module("kernels.fused_linear")
    monkeypatch.setattr(fl, "INTERPRET", False)
    bf16, fp32 = torch.bfloat16, torch.float32
    assert fl.pick_config(65536, 2048, 512, bf16, sm_count=132) == fl.CONFIGS[bf16]
    assert fl.pick_config(65536, 2048, 512, fp32, sm_count=132) == fl.CONFIGS[fp32]
    assert fl.pick_config(1024, 2048, 512, bf16, sm_count=132) == fl.SMALL_GRID_CONFIGS[bf16]  # 8 x 8 tiles
    assert fl.pick_config(1024, 2048, 512, bf16) == fl.CONFIGS[bf16]  # no SM count known
    monkeypatch.setitem(fl.SHAPE_CONFIGS, (512, 2048), (64, 64, 32, 4, 4, 2))
    assert fl.pick_config(65536, 2048, 512, bf16, sm_count=132) == (64, 64, 32, 4, 4, 2)
    assert fl.pick_config(65536, 2048, 512, torch.float16, sm_count=132) == (64, 64, 32, 4, 4, 2)
    assert fl.pick_config(65536, 2048, 512, fp32, sm_count=132) == fl.CONFIGS[fp32]
    assert fl.pick_config(65536, 4096, 512, bf16, sm_count=132) == fl.CONFIGS[bf16]
    assert fl.pick_config(5, 5, 5, bf16, config=[1, 2, 3, 4, 5, 6], sm_count=132) == (1, 2, 3, 4, 5, 6)
    for cfg in (*fl.CONFIGS.values(), *fl.SMALL_GRID_CONFIGS.values(), fl.INTERPRET_CONFIG):
        assert len(cfg) == 6 and all(v & (v - 1) == 0 for v in cfg[:3])  # powers of two
    assert (fl.silu_mode(bf16), fl.silu_mode(torch.float16), fl.silu_mode(fp32)) == (2, 1, 1)


def test_bench_section_on_cpu(interp_ls, monkeypatch, tmp_path):
    """kernels.bench's linear_silu section end to end on tiny shapes with the interpreted kernel and a fake clock:
    it checks, times, sweeps, applies the sweep's choice and writes the JSON lines of the other sections."""
    from kernels import bench

    (fl,) = interp_ls
    monkeypatch.setattr(bench, "fused_linear", fl)
    monkeypatch.setattr(bench, "DEV", "cpu")
    monkeypatch.setattr(bench, "bench_ms", lambda fn: (fn(), 2.0)[1])
    monkeypatch.setattr(bench, "ls_tile", lambda M, K, N, dtype=torch.bfloat16: list(fl.pick_config(M, N, K, dtype)))
    monkeypatch.setattr(bench, "LS_SHAPES", [(37, 24, 40), (64, 24, 40), (20, 32, 16)])
    monkeypatch.setattr(bench, "LS_FP32_SHAPES", [(33, 16, 24)])
    monkeypatch.setattr(bench, "LS_SMALL_SHAPES", [(20, 16, 16)])
    monkeypatch.setattr(bench, "LS_SWEEP", [(16, 16, 16, 2, 1, 1), (32, 16, 32, 3, 4, 2)])
    monkeypatch.setattr(bench, "LS_CHECK", [("a", 37, 40, 45, {}), ("nob", 30, 32, 20, dict(bias=False)),
                                            ("slice", 29, 24, 33, dict(slice=True))])
    monkeypatch.setattr(fl, "SHAPE_CONFIGS", {})
    monkeypatch.setattr(fl, "SMALL_GRID_CONFIGS", dict(fl.SMALL_GRID_CONFIGS))
    out = tmp_path / "results.jsonl"
    rec = bench.Recorder(str(out), "cpu", "abc", "python -m kernels.bench")
    assert bench.check_linear_silu(rec)
    rows = bench.run_bench_linear_silu(rec)
    assert [(r["M"], r["K"], r["N"], r["dtype"]) for r in rows] == (
        [(*shape, "bf16") for shape in bench.LS_SHAPES] + [(33, 16, 24, "fp32"), (33, 16, 24, "fp32_tf32")])
    assert all(r["fused"] == r["cublas_linear"] == r["cublas_linear_silu"] == 2.0 for r in rows)
    assert not torch.backends.cuda.matmul.allow_tf32  # restored
    bench.sweep_linear_silu(rec, apply=True)
    assert set(fl.SHAPE_CONFIGS) == {(24, 40), (32, 16)}
    assert fl.SMALL_GRID_CONFIGS[torch.bfloat16] in bench.LS_SWEEP
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(r) == {"bench", "config", "metric", "value", "unit", "device", "commit", "command", "date"}
               for r in lines)
    by = {}
    for r in lines:
        by.setdefault((r["bench"], r["metric"]), []).append(r)
    checks = by[("linear_silu_check", "rel_err_vs_fp64")]
    assert len(checks) == 3 * 2 * 2  # cases x dtypes x (fused, cuBLAS path)
    assert all(r["value"] < (1e-2 if r["config"]["dtype"] == "bfloat16" else 1e-5) for r in checks)
    assert {r["config"]["x_slice"] for r in checks} == {True, False}
    assert len(by[("linear_silu", "median_ms")]) == len(by[("linear_silu", "tflops")]) == 5 * 3
    t = next(r for r in by[("linear_silu", "tflops")] if r["config"]["M"] == 37)
    assert t["value"] == pytest.approx(round(2 * 37 * 24 * 40 / 2.0 / 1e9, 6))
    assert [r["value"] for r in by[("linear_silu", "speedup")]] == [1.0] * 5
    assert len(by[("linear_silu_sweep", "tflops")]) == 2 * 4


# linear_add: the same kernel with the residual add in its epilogue (the HSTU layer's output projection)


def test_linear_add_reference_is_the_model_formula():
    """The CPU / autograd path is, bit for bit, x + nn.Linear(y) (HSTULayer's old formula), gradients included."""
    gen = torch.Generator().manual_seed(50)
    lin = torch.nn.Linear(24, 16)
    y = torch.randn(11, 24, generator=gen)
    x = torch.randn(11, 16, generator=gen, requires_grad=True)
    got = kernels.linear_add(y, lin.weight, lin.bias, x)
    assert torch.equal(got, x + lin(y))
    got.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and lin.weight.grad.abs().sum() > 0


def test_linear_add_dispatch_and_errors(interp_ls):
    gen = torch.Generator().manual_seed(52)
    x, weight, b = _case(19, 21, 18, torch.bfloat16, gen)
    residual = torch.randn(19, 21, generator=gen).to(torch.bfloat16)
    got = kernels.linear_add(x, weight, b, residual, backend="triton")
    assert _rel(got, _want_add(x, weight, b, residual)) < 1e-2
    assert torch.equal(kernels.linear_add(x, weight, b, residual), ref.linear_add_torch(x, weight, b, residual))
    for bad in (residual[:5], residual.float(), residual[:, :20]):
        with pytest.raises(ValueError, match=r"^linear_add: residual must be"):
            kernels.linear_add(x, weight, b, bad)
    with pytest.raises(ValueError, match="autograd"):
        kernels.linear_add(x, weight, b, residual.clone().requires_grad_(), backend="triton")


def test_bench_linear_add_section_on_cpu(interp_ls, monkeypatch, tmp_path):
    """kernels.bench's linear_add timings on tiny shapes with the interpreted kernel and a fake clock."""
    from kernels import bench

    (fl,) = interp_ls
    monkeypatch.setattr(bench, "DEV", "cpu")
    monkeypatch.setattr(bench, "bench_ms", lambda fn: (fn(), 2.0)[1])
    monkeypatch.setattr(bench, "ls_tile", lambda M, K, N, dtype=torch.bfloat16: list(fl.pick_config(M, N, K, dtype)))
    monkeypatch.setattr(bench, "LA_SHAPES", [(37, 24, 40), (20, 32, 16)])
    out = tmp_path / "results.jsonl"
    assert bench.run_bench_linear_add(bench.Recorder(str(out), "cpu", "abc", "python -m kernels.bench"))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    errs = [r["value"] for r in lines if r["metric"] == "rel_err_vs_fp64"]
    assert len(errs) == 2 and all(e < 1e-2 for e in errs)
    assert sum(r["metric"] == "tflops" for r in lines) == 2 * 3
