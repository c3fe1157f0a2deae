"""Check and benchmark the HSTU attention, Group-LayerNorm and fused linear kernels on a CUDA GPU.

    python -m kernels.bench [--check] [--sweep] [--bench-kernels attention,group_norm,linear_silu]
                            [--sweep-kernels jagged,paged,group_norm,linear_silu] [--out bench/results.jsonl]
                            [--commit HASH]

Per shape: median time (triton.testing.do_bench) and TFLOP/s of the Triton jagged kernel (causal, no bias and with
a relative-position bias of R = 256 and 129 columns, the models' R), the padded PyTorch reference and the paged
kernel (full prefill through a shuffled block table; page size 64, a multiple of the key tile, and 16, vLLM's
default, which needs a per-key page gather; and page size 64 with the R = 129 bias).
FLOPs = 2 matmuls x 2*H*D*sum(L^2)/2 (causal half). --check compares every kernel with
an fp64 reference on every shape (bf16 and fp32). --sweep times candidate tile configs. Each number is also written
as a JSON line to --out.

Group-LayerNorm: the fused kernel against the unfused PyTorch ops (layer_norm, weight[groups], bias[groups], the
gate multiply) for T=131072 rows, d 512 and 768, bf16, with and without the gate (a column slice of a (T, 4d)
tensor, as in the model). GB/s counts the bytes the fused kernel must move: x and the gate read once, y written once
(the per-group weights are a few KiB); the speed-up is unfused time / fused time.

Linear + SiLU (the HSTU layer's uvqk projection): cuBLAS F.linear alone, cuBLAS F.linear then F.silu (the unfused
path) and the fused Triton kernel (kernels.linear_silu), bf16, M = 16384 / 65536 / 131072 rows at K 512 -> N 2048
(d_model 512) and K 1024 -> N 4096; and fp32 at M 65536, K 512 -> N 2048, exact and with TF32 allowed. TFLOP/s
counts 2*M*K*N; the speed-up is the unfused time / fused time. --check compares the fused kernel (and, for scale,
the unfused cuBLAS path) with an fp64 reference, --sweep times LS_SWEEP. The same section (bench name linear_add)
checks and times the output projection with its residual add (kernels.linear_add) at M x 512 -> 512 against
cuBLAS F.linear then the add.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys

import numpy as np
import torch
import triton

from . import (group_layer_norm, hstu_attention, hstu_attention_paged, linear_add, linear_silu, reference,
               write_kv_cache)
from . import fused_linear, group_norm, triton_jagged, triton_paged

FIXED = [(64, 512, 4, 128), (32, 1024, 4, 128), (16, 2048, 4, 128), (8, 4096, 4, 128), (32, 1024, 2, 256),
         (16, 2048, 2, 256)]
PAGE = 64
DEV = "cuda"


class Recorder:
    def __init__(self, out: str | None, device: str, commit: str, command: str):
        self.out, self.device, self.commit, self.command = out, device, commit, command
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def __call__(self, bench: str, config: dict, metric: str, value: float, unit: str) -> None:
        line = dict(bench=bench, config=config, metric=metric, value=round(float(value), 6), unit=unit,
                    device=self.device, commit=self.commit, command=self.command, date=self.date)
        if self.out:
            with open(self.out, "a") as f:
                f.write(json.dumps(line) + "\n")


def lognormal_lengths(total: int = 65536, mean: float = 1000.0, sigma: float = 0.8, seed: int = 0) -> list[int]:
    """User lengths drawn from a lognormal of the given mean until they add up to `total` tokens."""
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - sigma ** 2 / 2
    out, left = [], total
    while left > 0:
        L = int(min(max(round(rng.lognormal(mu, sigma)), 1), 8192, left))
        out.append(L)
        left -= L
    return out


def make_inputs(lengths, H, D, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, device=DEV, generator=g).to(dtype) for _ in range(3))
    offsets = torch.tensor([0] + lengths, device=DEV).cumsum(0)
    return q, k, v, offsets


def paged_from_jagged(k, v, lengths, page=PAGE, seed=0):
    """KV cache holding each user's K/V in shuffled pages; block table; seq_lens."""
    g = torch.Generator().manual_seed(seed)
    H, D = k.shape[1:]
    npages = [(L + page - 1) // page for L in lengths]
    total = sum(npages)
    perm = torch.randperm(total, generator=g)
    table = torch.zeros(len(lengths), max(npages), dtype=torch.int32)
    slots, used = [], 0
    for r, (L, n) in enumerate(zip(lengths, npages)):
        table[r, :n] = perm[used:used + n].int()
        used += n
        p = torch.arange(L)
        slots.append(table[r, p // page].long() * page + p % page)
    cache = torch.randn(total, H, page, 2 * D, device=DEV).to(k.dtype)  # never zeros: unwritten slots show
    table, slot_mapping = table.to(DEV), torch.cat(slots).to(DEV)
    write_kv_cache(k, v, cache, slot_mapping)
    return cache, table, torch.tensor(lengths, device=DEV, dtype=torch.int32)


def flops(lengths, H, D) -> float:
    return 2.0 * H * D * sum(L * L for L in lengths)


def bench_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def shapes():
    out = [(f"B{B}_L{L}_H{H}_D{D}", [L] * B, H, D) for B, L, H, D in FIXED]
    out.insert(2, ("B64_L1024_H4_D128", [1024] * 64, 4, 128))  # same token count as the lognormal batch
    out.append(("lognormal_mean1000_64k_H4_D128", lognormal_lengths(), 4, 128))
    return out


def check(rec, only=None) -> bool:
    """Every kernel vs an fp64 reference on every shape; fp32 inputs are the bf16 values widened."""
    ok = True
    print(f"{'shape':34} {'kernel':22} {'dtype':6} rel_err")
    for name, lengths, H, D in shapes():
        if only and name not in only:
            continue
        q, k, v, off = make_inputs(lengths, H, D, torch.bfloat16, seed=1)
        alpha = 1.0 / math.sqrt(D)
        want = reference.hstu_attention_naive(q.double(), k.double(), v.double(), off, alpha=alpha)
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            qd, kd, vd = (t.to(dtype) for t in (q, k, v))
            cache, table, seq_lens = paged_from_jagged(kd, vd, lengths)
            runs = {
                "jagged": lambda: hstu_attention(qd, kd, vd, off, alpha=alpha, backend="triton"),
                "paged": lambda: hstu_attention_paged(qd, cache, table, off, seq_lens, alpha=alpha,
                                                      backend="triton"),
            }
            for kern, fn in runs.items():
                err = rel_err(fn(), want)
                ok &= err < tol
                print(f"{name:34} {kern:22} {str(dtype)[6:]:6} {err:.2e} {'ok' if err < tol else 'FAIL'}")
                rec("hstu_attention_check", dict(shape=name, kernel=kern, dtype=str(dtype)[6:], mask="causal"),
                    "rel_err_vs_fp64", err, "ratio")
        del want
    # Masks, bias and norms on the lognormal batch (and a chunked-prefill paged case) in bf16 and fp32.
    lengths = lognormal_lengths(total=16384, seed=3)
    H, D = 4, 128
    q, k, v, off = make_inputs(lengths, H, D, torch.bfloat16, seed=2)
    B = len(lengths)
    g = torch.Generator(device=DEV).manual_seed(5)
    Ls = torch.tensor(lengths, device=DEV)
    prefix = torch.randint(0, 40, (B,), device=DEV, generator=g)
    cands = torch.minimum(torch.randint(0, 300, (B,), device=DEV, generator=g), Ls)
    bias = 0.3 * torch.randn(H, 257, device=DEV, generator=g)
    cases = {"prefix": dict(prefix_lens=prefix), "candidates": dict(num_candidates=cands),
             "prefix+cand+bias": dict(prefix_lens=prefix, num_candidates=cands, rel_bias=bias),
             "bias+length_norm": dict(rel_bias=bias, norm="length")}
    alpha = 1.0 / math.sqrt(D)
    for mask, kw in cases.items():
        kw64 = {a: (b.double() if a == "rel_bias" else b) for a, b in kw.items()}
        want = reference.hstu_attention_naive(q.double(), k.double(), v.double(), off, alpha=alpha, **kw64)
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            got = hstu_attention(*(t.to(dtype) for t in (q, k, v)), off, alpha=alpha, backend="triton", **kw)
            err = rel_err(got, want)
            ok &= err < tol
            print(f"{'lognormal16k':34} {'jagged ' + mask:22} {str(dtype)[6:]:6} {err:.2e} "
                  f"{'ok' if err < tol else 'FAIL'}")
            rec("hstu_attention_check", dict(shape="lognormal_16k_H4_D128", kernel="jagged", dtype=str(dtype)[6:],
                                             mask=mask), "rel_err_vs_fp64", err, "ratio")
    qlens = [max(1, L // 3) for L in lengths]
    qs = torch.cat([q[int(off[i + 1]) - n:int(off[i + 1])] for i, n in enumerate(qlens)])
    qsl = torch.tensor([0] + qlens, device=DEV).cumsum(0)
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        cache, table, seq_lens = paged_from_jagged(k.to(dtype), v.to(dtype), lengths, page=16)
        want = reference.hstu_attention_paged_naive(qs.double(), cache.double(), table, qsl, seq_lens, alpha=alpha,
                                                    rel_bias=bias.double())
        got = hstu_attention_paged(qs.to(dtype), cache, table, qsl, seq_lens, alpha=alpha, rel_bias=bias,
                                   backend="triton")
        err = rel_err(got, want)
        ok &= err < tol
        print(f"{'lognormal16k chunked':34} {'paged bias':22} {str(dtype)[6:]:6} {err:.2e} "
              f"{'ok' if err < tol else 'FAIL'}")
        rec("hstu_attention_check", dict(shape="lognormal_16k_H4_D128_qlen_third", kernel="paged",
                                         dtype=str(dtype)[6:], mask="causal+bias"), "rel_err_vs_fp64", err, "ratio")
    return ok


def run_bench(rec, torch_ref: bool = True) -> list[dict]:
    rows = []
    for name, lengths, H, D in shapes():
        q, k, v, off = make_inputs(lengths, H, D, torch.bfloat16)
        alpha = 1.0 / math.sqrt(D)
        bias, bias129 = 0.1 * torch.randn(H, 256, device=DEV), 0.1 * torch.randn(H, 129, device=DEV)
        cache, table, seq_lens = paged_from_jagged(k, v, lengths)
        cache16, table16, _ = paged_from_jagged(k, v, lengths, page=16)
        fns = {
            "triton": lambda: hstu_attention(q, k, v, off, alpha=alpha, backend="triton"),
            "triton_cold_plan": lambda: (triton_jagged._WORK_CACHE.clear(),
                                         hstu_attention(q, k, v, off, alpha=alpha, backend="triton")),
            "triton_rel_bias": lambda: hstu_attention(q, k, v, off, alpha=alpha, rel_bias=bias, backend="triton"),
            "triton_rel_bias_r129": lambda: hstu_attention(q, k, v, off, alpha=alpha, rel_bias=bias129,
                                                           backend="triton"),
            "paged": lambda: hstu_attention_paged(q, cache, table, off, seq_lens, alpha=alpha, backend="triton"),
            "paged_p16": lambda: hstu_attention_paged(q, cache16, table16, off, seq_lens, alpha=alpha,
                                                      backend="triton"),
            "paged_rel_bias_r129": lambda: hstu_attention_paged(q, cache, table, off, seq_lens, alpha=alpha,
                                                                rel_bias=bias129, backend="triton"),
        }
        if torch_ref:
            fns["torch_padded"] = lambda: hstu_attention(q, k, v, off, alpha=alpha, backend="torch")
        fl = flops(lengths, H, D)
        row = dict(shape=name, B=len(lengths), T=sum(lengths), H=H, D=D)
        for kern, fn in fns.items():
            ms = bench_ms(fn)
            tf = fl / ms / 1e9
            row[kern] = (ms, tf)
            cfg = dict(shape=name, B=len(lengths), tokens=sum(lengths), H=H, D=D, dtype="bf16", mask="causal",
                       kernel=kern, page_size={"paged": PAGE, "paged_p16": 16, "paged_rel_bias_r129": PAGE}.get(kern),
                       tile=list(triton_jagged.pick_config(D, None, triton_paged.CONFIGS if "paged" in kern else
                                                           triton_jagged.BIAS_CONFIGS if "bias" in kern else None))
                       if kern != "torch_padded" else None)
            rec("hstu_attention", cfg, "median_ms", ms, "ms")
            rec("hstu_attention", cfg, "tflops", tf, "TFLOP/s")
        rows.append(row)
        print(f"{name:34} " + " ".join(f"{k}={v[0]:.3f}ms/{v[1]:.0f}TF" for k, v in row.items()
                                        if isinstance(v, tuple)), flush=True)
        del q, k, v, cache, cache16
        torch.cuda.empty_cache()
    return rows


SWEEP = {  # jagged candidates; a 5th entry True = warp-specialized main loop
    128: [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 4, 3),
          (128, 64, 4, 3), (64, 64, 4, 3, True), (128, 64, 8, 3, True), (128, 128, 8, 2, True)],
    256: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 4), (64, 64, 4, 3), (128, 32, 8, 3, True),
          (128, 64, 8, 2, True)],
}
SWEEP_PAGED = {  # BLOCK_N divides the page size (64)
    128: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4), (64, 32, 4, 3)],
    256: [(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
}


def sweep(rec, apply: bool = False, kernels=("jagged", "paged")):
    """Time candidate tile configs of the jagged and paged kernels; with apply, use the best (summed TFLOP/s over
    the shapes of a head dim) for the rest of the run."""
    cases = [("B32_L1024_H4_D128", [1024] * 32, 4, 128), ("B16_L2048_H4_D128", [2048] * 16, 4, 128),
             ("B32_L1024_H2_D256", [1024] * 32, 2, 256)]
    score: dict = {}
    for name, lengths, H, D in cases:
        q, k, v, off = make_inputs(lengths, H, D, torch.bfloat16)
        cache, table, seq_lens = paged_from_jagged(k, v, lengths)
        fl = flops(lengths, H, D)
        for kern, cands in (("jagged", SWEEP[D]), ("paged", SWEEP_PAGED[D])):
            if kern not in kernels:
                continue
            res = []
            for cfg in cands:
                if kern == "jagged":
                    fn = lambda: triton_jagged.hstu_attention_triton(q, k, v, off, alpha=0.1, config=cfg)
                else:
                    fn = lambda: triton_paged.hstu_attention_paged_triton(q, cache, table, off, seq_lens, alpha=0.1,
                                                                           config=cfg)
                try:
                    ms = bench_ms(fn)
                except Exception as e:  # out of shared memory / registers, or no warp specialization here
                    print(f"  {name} {kern} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
                    continue
                tf = fl / ms / 1e9
                res.append((tf, cfg))
                score[(kern, D, cfg)] = score.get((kern, D, cfg), 0.0) + tf
                rec("hstu_attention_sweep", dict(shape=name, kernel=kern, tile=list(cfg), dtype="bf16",
                                                 page_size=PAGE if kern == "paged" else None), "tflops", tf, "TFLOP/s")
            res.sort(key=lambda r: -r[0])
            print(f"sweep {name} {kern}: " + ", ".join(f"{c}={t:.0f}" for t, c in res[:6]), flush=True)
        del q, k, v, cache
    if apply:
        for (kern, D, cfg), tf in sorted(score.items(), key=lambda kv: kv[1]):
            (triton_jagged.CONFIGS if kern == "jagged" else triton_paged.CONFIGS)[D] = cfg  # best is set last
        print("using jagged", triton_jagged.CONFIGS, "paged", triton_paged.CONFIGS, flush=True)


GLN_ROWS = 131072
GLN_DIMS = (512, 768)
GLN_SWEEP = [(1, 4), (2, 4), (4, 4), (4, 8), (8, 4), (8, 8), (16, 8)]  # (BLOCK_M, num_warps)


def gln_inputs(T, d, dtype, seed=0):
    """x (T, d), int64 groups in [0, 3), weight / bias (3, d) and a gate that is a column slice of (T, 4d)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (2.0 * torch.randn(T, d, device=DEV, generator=g) + 0.5).to(dtype)
    groups = torch.randint(0, 3, (T,), device=DEV, generator=g)
    weight = (1.0 + 0.3 * torch.randn(3, d, device=DEV, generator=g)).to(dtype)
    bias = (0.3 * torch.randn(3, d, device=DEV, generator=g)).to(dtype)
    gate = torch.randn(T, 4 * d, device=DEV, generator=g).to(dtype)[:, d:2 * d]
    return x, groups, weight, bias, gate


def gln_bytes(T, d, dtype, gate: bool) -> float:
    return float(T * d * dtype.itemsize * (3 if gate else 2) + T * 8)


def check_group_norm(rec) -> bool:
    """Fused kernel vs an fp64 reference: bf16 and fp32, d 512 / 768 / 1000, with and without the gate."""
    ok = True
    for d in GLN_DIMS + (1000,):
        x, groups, weight, bias, gate = gln_inputs(8192, d, torch.bfloat16, seed=1)
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            for u in (None, gate):
                args = [t.to(dtype) for t in (x, weight, bias)]
                ud = None if u is None else u.to(dtype)
                want = reference.group_layer_norm_torch(x.double(), groups, weight.double(), bias.double(), 1e-5,
                                                        None if u is None else u.double())
                got = group_layer_norm(args[0], groups, args[1], args[2], 1e-5, gate=ud, backend="triton")
                err = rel_err(got, want)
                ok &= err < tol
                name = f"group_norm T8192 d{d}" + (" gate" if u is not None else "")
                print(f"{name:34} {'fused':22} {str(dtype)[6:]:6} {err:.2e} {'ok' if err < tol else 'FAIL'}")
                rec("group_layer_norm_check", dict(T=8192, d=d, dtype=str(dtype)[6:], gate=u is not None),
                    "rel_err_vs_fp64", err, "ratio")
    return ok


def run_bench_group_norm(rec) -> list[dict]:
    rows = []
    for d in GLN_DIMS:
        x, groups, weight, bias, gate = gln_inputs(GLN_ROWS, d, torch.bfloat16)
        for u in (None, gate):
            fns = {"fused": lambda: group_layer_norm(x, groups, weight, bias, gate=u, backend="triton"),
                   "unfused": lambda: group_layer_norm(x, groups, weight, bias, gate=u, backend="torch")}
            nbytes = gln_bytes(GLN_ROWS, d, torch.bfloat16, u is not None)
            row = dict(T=GLN_ROWS, d=d, gate=u is not None)
            for kern, fn in fns.items():
                ms = bench_ms(fn)
                row[kern] = ms
                cfg = dict(T=GLN_ROWS, d=d, dtype="bf16", gate=u is not None, kernel=kern,
                           tile=list(group_norm.pick_config(d)) if kern == "fused" else None)
                rec("group_layer_norm", cfg, "median_ms", ms, "ms")
                rec("group_layer_norm", cfg, "gbps", nbytes / ms / 1e6, "GB/s")
            speedup = row["unfused"] / row["fused"]
            rec("group_layer_norm", dict(T=GLN_ROWS, d=d, dtype="bf16", gate=u is not None), "speedup", speedup,
                "x")
            rows.append(row)
            print(f"group_norm T{GLN_ROWS} d{d} bf16 {'gate   ' if u is not None else 'no gate'} "
                  f"fused={row['fused']:.3f}ms/{nbytes / row['fused'] / 1e6:.0f}GB/s "
                  f"unfused={row['unfused']:.3f}ms/{nbytes / row['unfused'] / 1e6:.0f}GB/s "
                  f"speed-up {speedup:.2f}x", flush=True)
        del x, groups, weight, bias, gate
        torch.cuda.empty_cache()
    return rows


def sweep_group_norm(rec, apply: bool = False) -> None:
    """Time (BLOCK_M, num_warps) candidates of the fused kernel (bf16, with the gate); with apply, use the best per
    BLOCK_D for the rest of the run."""
    for d in GLN_DIMS:
        x, groups, weight, bias, gate = gln_inputs(GLN_ROWS, d, torch.bfloat16)
        nbytes = gln_bytes(GLN_ROWS, d, torch.bfloat16, True)
        res = []
        for cfg in GLN_SWEEP:
            ms = bench_ms(lambda: group_norm.group_layer_norm_triton(x, groups, weight, bias, 1e-5, gate,
                                                                     config=cfg))
            res.append((nbytes / ms / 1e6, cfg))
            rec("group_layer_norm_sweep", dict(T=GLN_ROWS, d=d, dtype="bf16", gate=True, tile=list(cfg)), "gbps",
                nbytes / ms / 1e6, "GB/s")
        res.sort(key=lambda r: -r[0])
        print(f"sweep group_norm d{d}: " + ", ".join(f"{c}={g:.0f}GB/s" for g, c in res), flush=True)
        if apply:
            group_norm.CONFIGS[triton.next_power_of_2(d)] = res[0][1]
        del x, groups, weight, bias, gate
    if apply:
        print("using group_norm", group_norm.CONFIGS, flush=True)


LS_SHAPES = [(M, K, N) for K, N in ((512, 2048), (1024, 4096)) for M in (16384, 65536, 131072)]  # (M, K, N)
LS_FP32_SHAPES = [(65536, 512, 2048)]  # the engines' default dtype is fp32
# Rows of a few thousand: fewer default tiles than SMs, so fused_linear.SMALL_GRID_CONFIGS applies.
LS_SMALL_SHAPES = [(1024, 512, 2048), (2048, 512, 2048), (1024, 1024, 4096)]
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Compiled for sm_90 (Triton 3.9, bf16): all fit the
# 227 KiB of shared memory without register spills; 96 KiB ones (128 x 128 x 64 / 3 stages, 64 x 128 x 64 / 4) leave
# room for two programs per SM, so one's epilogue can overlap the other's main loop.
LS_SWEEP = [
    (128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 256, 64, 1, 8, 3), (128, 256, 32, 8, 8, 4),
    (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 3), (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4),
    (128, 128, 64, 8, 8, 4), (128, 128, 128, 8, 8, 3), (64, 256, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
]

LS_CHECK = [  # (name, M, K, N, options) for --check
    ("M16387_K512_N2048", 16387, 512, 2048, dict()), ("M65536_K1024_N4096", 65536, 1024, 4096, dict()),
    ("M1000_K512_N2048", 1000, 512, 2048, dict()), ("M4099_K520_N2040", 4099, 520, 2040, dict()),
    ("M16384_K512_N2048 no bias", 16384, 512, 2048, dict(bias=False)),
    ("M16384_K512_N2048 x slice", 16384, 512, 2048, dict(slice=True)),
]


def ls_inputs(M, K, N, dtype, seed=0):
    """x (M, K) ~N(0, 1), weight (N, K) scaled so x @ weight.T is ~N(0, 1), bias (N,) ~N(0, 0.25)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(M, K, device=DEV, generator=g).to(dtype)
    weight = (torch.randn(N, K, device=DEV, generator=g) / math.sqrt(K)).to(dtype)
    bias = (0.5 * torch.randn(N, device=DEV, generator=g)).to(dtype)
    return x, weight, bias


def ls_flops(M, K, N) -> float:
    return 2.0 * M * K * N


def ls_tile(M, K, N, dtype=torch.bfloat16) -> list[int]:
    """The config the fused kernel picks for this shape on this GPU."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return list(fused_linear.pick_config(M, N, K, dtype, sm_count=sms))


def check_linear_silu(rec) -> bool:
    """Fused kernel vs an fp64 reference, bf16 and fp32: ragged M, N and K; bias None; x a column slice of a wider
    tensor; the d_model 512 and 1024 projections (default tiles) and a few thousand rows (small-grid tiles)."""
    ok = True
    for name, M, K, N, kw in LS_CHECK:
        x, weight, bias = ls_inputs(M, K, N, torch.bfloat16, seed=1)
        if kw.get("bias") is False:
            bias = None
        want = reference.linear_silu_torch(x.double(), weight.double(), None if bias is None else bias.double())
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            args = [None if t is None else t.to(dtype) for t in (x, weight, bias)]
            if kw.get("slice"):  # the same values as columns 32..32+K of a (M, K + 64) tensor
                wide = torch.zeros(M, K + 64, device=DEV, dtype=dtype)
                wide[:, 32:32 + K] = args[0]
                args[0] = wide[:, 32:32 + K]
            runs = {"fused": lambda: linear_silu(*args, backend="triton"),
                    "cublas_linear_silu": lambda: reference.linear_silu_torch(*args)}
            for kern, fn in runs.items():
                err = rel_err(fn(), want)
                good = err < tol
                if kern == "fused":
                    ok &= good
                print(f"{'linear_silu ' + name:34} {kern:22} {str(dtype)[6:]:6} {err:.2e} "
                      f"{('ok' if good else 'FAIL') if kern == 'fused' else '(for scale)'}")
                rec("linear_silu_check", dict(shape=name, M=M, K=K, N=N, kernel=kern, dtype=str(dtype)[6:],
                                              bias=bias is not None, x_slice=bool(kw.get("slice")),
                                              tile=ls_tile(M, K, N, dtype) if kern == "fused" else None),
                    "rel_err_vs_fp64", err, "ratio")
        del x, weight, bias, want
        torch.cuda.empty_cache()
    return ok


def run_bench_linear_silu(rec) -> list[dict]:
    """LS_SHAPES in bf16, then LS_FP32_SHAPES in fp32 (exact, and with TF32 allowed) to check which fp32 case
    kernels.linear_silu's "auto" should give to the fused kernel."""
    rows = []
    cases = [(shape, torch.bfloat16, False) for shape in LS_SHAPES]
    cases += [(shape, torch.float32, tf32) for shape in LS_FP32_SHAPES for tf32 in (False, True)]
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    for (M, K, N), dtype, tf32 in cases:
        torch.backends.cuda.matmul.allow_tf32 = tf32  # cuBLAS and the fused kernel both follow it
        x, weight, bias = ls_inputs(M, K, N, dtype)
        fns = {"cublas_linear": lambda: torch.nn.functional.linear(x, weight, bias),
               "cublas_linear_silu": lambda: torch.nn.functional.silu(torch.nn.functional.linear(x, weight, bias)),
               "fused": lambda: linear_silu(x, weight, bias, backend="triton")}
        fl = ls_flops(M, K, N)
        dt = "bf16" if dtype == torch.bfloat16 else ("fp32_tf32" if tf32 else "fp32")
        row = dict(M=M, K=K, N=N, dtype=dt)
        for kern, fn in fns.items():
            ms = bench_ms(fn)
            row[kern] = ms
            cfg = dict(M=M, K=K, N=N, dtype=dt, bias=True, kernel=kern,
                       tile=ls_tile(M, K, N, dtype) if kern == "fused" else None)
            rec("linear_silu", cfg, "median_ms", ms, "ms")
            rec("linear_silu", cfg, "tflops", fl / ms / 1e9, "TFLOP/s")
        speedup = row["cublas_linear_silu"] / row["fused"]
        rec("linear_silu", dict(M=M, K=K, N=N, dtype=dt, bias=True), "speedup", speedup, "x")
        rows.append(row)
        print(f"linear_silu M{M} K{K} N{N} {dt} " + " ".join(f"{k}={row[k]:.3f}ms/{fl / row[k] / 1e9:.0f}TF"
                                                             for k in fns)
              + f" speed-up {speedup:.2f}x (tile {ls_tile(M, K, N, dtype)})", flush=True)
        del x, weight, bias
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return rows


LA_SHAPES = [(M, 512, 512) for M in (16384, 65536, 131072)]  # (M, K, N): the d_model 512 output projection


def run_bench_linear_add(rec) -> bool:
    """The output projection with its residual add (kernels.linear_add), bf16, on LA_SHAPES: cuBLAS F.linear, cuBLAS
    F.linear then the add (the unfused path) and the fused kernel; each checked against fp64 first. True if the
    fused kernel is within bf16 tolerance everywhere."""
    ok = True
    for M, K, N in LA_SHAPES:
        x, weight, bias = ls_inputs(M, K, N, torch.bfloat16, seed=2)
        residual = torch.randn(M, N, device=DEV, generator=torch.Generator(device=DEV).manual_seed(3)).to(x.dtype)
        want = reference.linear_add_torch(*(t.double() for t in (x, weight, bias, residual)))
        err = rel_err(linear_add(x, weight, bias, residual, backend="triton"), want)
        ok &= err < 1e-2
        fns = {"cublas_linear": lambda: torch.nn.functional.linear(x, weight, bias),
               "cublas_linear_add": lambda: residual + torch.nn.functional.linear(x, weight, bias),
               "fused": lambda: linear_add(x, weight, bias, residual, backend="triton")}
        fl = ls_flops(M, K, N)
        row = {kern: bench_ms(fn) for kern, fn in fns.items()}
        for kern, ms in row.items():
            cfg = dict(M=M, K=K, N=N, dtype="bf16", bias=True, kernel=kern,
                       tile=ls_tile(M, K, N) if kern == "fused" else None)
            rec("linear_add", cfg, "median_ms", ms, "ms")
            rec("linear_add", cfg, "tflops", fl / ms / 1e9, "TFLOP/s")
        rec("linear_add", dict(M=M, K=K, N=N, dtype="bf16", bias=True, kernel="fused"), "rel_err_vs_fp64", err,
            "ratio")
        speedup = row["cublas_linear_add"] / row["fused"]
        rec("linear_add", dict(M=M, K=K, N=N, dtype="bf16", bias=True), "speedup", speedup, "x")
        print(f"linear_add M{M} K{K} N{N} bf16 " + " ".join(f"{k}={ms:.3f}ms/{fl / ms / 1e9:.0f}TF"
                                                            for k, ms in row.items())
              + f" speed-up {speedup:.2f}x, rel err {err:.1e} {'ok' if err < 1e-2 else 'FAIL'}", flush=True)
        del x, weight, bias, residual, want
        torch.cuda.empty_cache()
    return ok


def sweep_linear_silu(rec, apply: bool = False) -> None:
    """Time the LS_SWEEP configs of the fused kernel (bf16) on LS_SHAPES and LS_SMALL_SHAPES. With apply, for the
    rest of the run: the best per (K, N) of LS_SHAPES (summed TFLOP/s over M) becomes fused_linear.SHAPE_CONFIGS[(K,
    N)], the best over LS_SMALL_SHAPES SMALL_GRID_CONFIGS for bf16 and fp16. A config that fails anywhere is out."""
    groups: dict = {}
    for M, K, N in LS_SHAPES:
        groups.setdefault((K, N), []).append((M, K, N))
    groups["small grid"] = LS_SMALL_SHAPES
    for key, shapes in groups.items():
        score: dict = {}
        for M, K, N in shapes:
            x, weight, bias = ls_inputs(M, K, N, torch.bfloat16)
            fl = ls_flops(M, K, N)
            res = []
            for cfg in LS_SWEEP:
                try:
                    ms = bench_ms(lambda: fused_linear.linear_silu_triton(x, weight, bias, config=cfg))
                except Exception as e:  # out of shared memory / registers
                    print(f"  linear_silu M{M} K{K} N{N} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
                    score[cfg] = float("-inf")
                    continue
                tf = fl / ms / 1e9
                res.append((tf, cfg))
                score[cfg] = score.get(cfg, 0.0) + tf
                rec("linear_silu_sweep", dict(M=M, K=K, N=N, dtype="bf16", bias=True, tile=list(cfg)), "tflops", tf,
                    "TFLOP/s")
            res.sort(key=lambda r: -r[0])
            default = tuple(ls_tile(M, K, N))
            print(f"sweep linear_silu M{M} K{K} N{N}: " + ", ".join(f"{c}={t:.0f}" for t, c in res[:6])
                  + "".join(f"; default {c}={t:.0f}" for t, c in res if c == default), flush=True)
            del x, weight, bias
            torch.cuda.empty_cache()
        best = max(score, key=score.get) if score else None
        if apply and best is not None and score[best] > float("-inf"):
            if key == "small grid":
                fused_linear.SMALL_GRID_CONFIGS[torch.bfloat16] = fused_linear.SMALL_GRID_CONFIGS[torch.float16] = best
            else:
                fused_linear.SHAPE_CONFIGS[key] = best
    if apply:
        print("using linear_silu (K, N) ->", fused_linear.SHAPE_CONFIGS, "small grid",
              fused_linear.SMALL_GRID_CONFIGS[torch.bfloat16], flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare every kernel with fp64 on every shape")
    ap.add_argument("--sweep", action="store_true", help="time candidate tile configs and use the best")
    ap.add_argument("--sweep-kernels", default="jagged,paged,group_norm,linear_silu",
                    help="which kernels --sweep tunes")
    ap.add_argument("--bench-kernels", default="attention,group_norm,linear_silu",
                    help="which kernels --check and the benchmark cover")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-torch", action="store_true", help="skip the padded PyTorch reference timings")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU")
        return 2
    device = torch.cuda.get_device_name()
    flags = [f"--{n.replace('_', '-')}" for n in ("check", "sweep", "no_bench", "no_torch") if getattr(args, n)]
    if args.sweep:
        flags.append(f"--sweep-kernels {args.sweep_kernels}")
    if args.bench_kernels != ap.get_default("bench_kernels"):
        flags.append(f"--bench-kernels {args.bench_kernels}")
    command = " ".join(["python -m kernels.bench"] + flags + (["--out", "bench/results.jsonl"] if args.out else []))
    rec = Recorder(args.out, device, args.commit, command)
    print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    ok = True
    sweep_kernels, bench_kernels = args.sweep_kernels.split(","), args.bench_kernels.split(",")
    if args.sweep:
        if {"jagged", "paged"} & set(sweep_kernels):
            sweep(rec, apply=True, kernels=sweep_kernels)
        if "group_norm" in sweep_kernels:
            sweep_group_norm(rec, apply=True)
        if "linear_silu" in sweep_kernels:
            sweep_linear_silu(rec, apply=True)
    if args.check:
        if "attention" in bench_kernels:
            ok &= check(rec)
        if "group_norm" in bench_kernels:
            ok &= check_group_norm(rec)
        if "linear_silu" in bench_kernels:
            ok &= check_linear_silu(rec)
        print("check:", "all ok" if ok else "FAILURES", flush=True)
    if not args.no_bench:
        if "attention" in bench_kernels:
            run_bench(rec, torch_ref=not args.no_torch)
        if "group_norm" in bench_kernels:
            run_bench_group_norm(rec)
        if "linear_silu" in bench_kernels:
            run_bench_linear_silu(rec)
            ok &= run_bench_linear_add(rec)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
