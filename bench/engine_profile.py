"""Engine-only throughput and a kernel-time breakdown (torch.profiler) of engine=torch and engine=vllm.

Scores synthetic users (token sequences from batch.synth.token_batch, history lengths log-normal as in the job
benchmark) with a random-weight checkpoint of a preset, without the Polars stage or Parquet: the ceiling the whole
job can reach. For each engine: a warm-up, one timed ``score`` of all users (tokens/s, users/s), then
``score`` of the first ``--profile-users`` users under torch.profiler, summarised by kernel family (attention,
matmul, group norm, top-K/sort, ...), with the share of the profiled wall time the GPU spent in kernels.

vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the profiler sees its kernels.

    python bench/engine_profile.py --preset dlrmv3 --users 4000 --engines torch vllm --results bench/results.jsonl
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch.bench import device_name, preset_config, random_checkpoint  # noqa: E402
from batch.config import Device, DType, TorchEngineConfig, VllmEngineConfig  # noqa: E402
from batch.model import TokenLayout, load_checkpoint  # noqa: E402
from batch.model.flops import scoring_flops  # noqa: E402
from batch.synth import token_batch  # noqa: E402

# kernel family <- substrings of the kernel name (first match wins, lower case)
FAMILIES = [
    ("attention", ("hstu",)),
    ("group_norm", ("group_layer_norm", "_gln", "group_ln")),
    ("kv_cache_write", ("write_kv",)),
    ("sampler", ("_ranks_", "gumbel", "sample")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90", "sm80", "ampere", "gemv", "splitk")),
    ("topk_sort", ("topk", "sort", "radix", "bitonic", "segmented")),
    ("scatter_gather", ("scatter", "gather", "index", "embedding")),
    ("copy", ("memcpy", "memset", "copy")),
    ("elementwise", ("elementwise", "vectorized", "silu", "reduce", "unrolled")),
]


def family(name: str) -> str:
    low = name.lower()
    return next((fam for fam, keys in FAMILIES if any(k in low for k in keys)), "other")


def kernel_times(prof) -> dict[str, float]:
    """Self device time (ms) of every CUDA kernel / memcpy name in the profile."""
    from torch.autograd import DeviceType

    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type == DeviceType.CUDA:
            out[e.key] += e.self_device_time_total / 1e3
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(engine: str, ckpt, args):
    if engine == "torch":
        from batch.engines.torch_engine import TorchEngine

        return TorchEngine(TorchEngineConfig(device=Device.auto, dtype=DType.bfloat16,
                                             batch_tokens=args.batch_tokens), ckpt)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: the profiler sees it
    from batch.engines.vllm.engine import build_vllm_engine

    base = VllmEngineConfig(gpu_memory_utilization=0.9, max_num_batched_tokens=args.batch_tokens, max_num_seqs=512,
                            dtype=DType.bfloat16)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(args.vllm)))
    return build_vllm_engine(cfg, ckpt.path, ckpt.config)


def host_profile(engine, users, top_k: int, lines: int = 40) -> None:
    """Where the host's time goes while ``users`` are scored (vLLM's engine core runs in this thread)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    engine.score(users, top_k, True)
    sync()
    prof.disable()
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(lines)
        print(f"\n-- cProfile by {key}\n" + "\n".join(out.getvalue().splitlines()[6:]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dlrmv3")
    ap.add_argument("--arch", nargs="*", default=[], help="model overrides key=int")
    ap.add_argument("--users", type=int, default=4000)
    ap.add_argument("--profile-users", type=int, default=400)
    ap.add_argument("--events-median", type=float, default=1000)
    ap.add_argument("--events-sigma", type=float, default=0.35)
    ap.add_argument("--engines", nargs="+", default=["torch", "vllm"])
    ap.add_argument("--batch-tokens", type=int, default=65536, help="torch batch_tokens / vLLM max_num_batched_tokens")
    ap.add_argument("--vllm", nargs="*", default=[], help="VllmEngineConfig overrides key=value")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--cprofile", action="store_true", help="also run the profiled users under cProfile (host time)")
    ap.add_argument("--work", default="/tmp/mtgr-engine-profile")
    ap.add_argument("--results", default="bench/results.jsonl")
    ap.add_argument("--label", default="")
    ap.add_argument("--commit", default=os.environ.get("MTGR_COMMIT", "unknown"))
    a = ap.parse_args()

    cfg = preset_config(a.preset, {k: int(v) for k, v in (x.split("=", 1) for x in a.arch)})
    ckpt = load_checkpoint(str(random_checkpoint(Path(a.work) / f"checkpoint-{a.preset}", cfg, 0)))
    lay = TokenLayout(cfg)
    rng = np.random.default_rng(0)
    events = np.clip(np.round(rng.lognormal(np.log(a.events_median), a.events_sigma, a.users)), 1,
                     lay.max_events(cfg.max_seq_len)).astype(np.int64)
    users = token_batch(lay, cfg.num_items, events, seed=0)
    tokens = int(users.lengths.sum())
    flops = scoring_flops(cfg, users.lengths)["total"]
    device = device_name()
    command = "python bench/engine_profile.py " + " ".join(sys.argv[1:])
    shape = (f"preset {a.preset} {' '.join(a.arch)} (d_model {cfg.d_model}, {cfg.num_layers} layers, "
             f"{cfg.num_items:,} items), {a.users} users, mean {tokens / a.users:.0f} tokens/user, top-{a.top_k}, "
             f"bf16{'; ' + a.label if a.label else ''}")
    print(shape, flush=True)

    def record(config: str, metric: str, value: float, unit: str) -> None:
        row = dict(bench="engine_profile", config=config, metric=metric, value=value, unit=unit, device=device,
                   commit=a.commit, command=command, date=dt.date.today().isoformat())
        print(f"  {metric:28s} {value:14.6g} {unit}", flush=True)
        with open(a.results, "a") as f:
            f.write(json.dumps(row) + "\n")

    for name in a.engines:
        t0 = time.perf_counter()
        engine = build(name, ckpt, a)
        start_s = time.perf_counter() - t0
        extra = f" {' '.join(a.vllm)}" if name == "vllm" and a.vllm else ""
        run = f"{shape}; engine={name} {a.batch_tokens} tokens/batch{extra}"
        print(f"\n== {run}", flush=True)
        record(run, "engine_start_s", start_s, "s")
        engine.score(users.select(slice(0, 64)), a.top_k, True)
        sync()
        t0 = time.perf_counter()
        engine.score(users, a.top_k, True)
        sync()
        s = time.perf_counter() - t0
        record(run, "tokens_per_s", tokens / s, "tokens/s")
        record(run, "users_per_s", a.users / s, "users/s")
        record(run, "model_tflops", flops / s / 1e12, "TFLOP/s")

        if getattr(engine, "instances", 1) > 1:  # an EnginePool: its kernels run in other processes
            print("engine.instances > 1: no kernel profile (the engines run in child processes)", flush=True)
            engine.close()
            continue
        sub = users.select(slice(0, a.profile_users))
        sub_tokens = int(sub.lengths.sum())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            engine.score(sub, a.top_k, True)
            sync()
            wall_ms = (time.perf_counter() - t0) * 1e3
        times = kernel_times(prof)
        busy = sum(times.values())
        print(f"profiled {a.profile_users} users, {sub_tokens} tokens: wall {wall_ms:.1f} ms, kernels {busy:.1f} ms")
        record(run + f"; profiled {a.profile_users} users", "gpu_kernel_share", busy / wall_ms, "fraction of wall")
        by_family: dict[str, float] = defaultdict(float)
        for k, ms in times.items():
            by_family[family(k)] += ms
        for fam, ms in sorted(by_family.items(), key=lambda t: -t[1]):
            record(run + f"; profiled {a.profile_users} users; family {fam}", "kernel_ms_per_1m_tokens",
                   ms / sub_tokens * 1e6, "ms")
        print(f"\n  {'kernel':100s} {'ms':>9s} {'share':>6s}")
        for k, ms in sorted(times.items(), key=lambda t: -t[1])[:30]:
            print(f"  {k[:100]:100s} {ms:9.2f} {ms / busy:6.1%}")
        print(flush=True)
        if a.cprofile:
            host_profile(engine, sub, a.top_k)
        engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
