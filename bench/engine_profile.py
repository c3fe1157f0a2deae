"""Engine-only throughput and a kernel-time breakdown (torch.profiler) of engine=torch and engine=vllm.

Scores synthetic users (token sequences from batch.synth.token_batch, history lengths log-normal as in the job
benchmark) with a random-weight checkpoint of a preset, without the Polars stage or Parquet: the ceiling the whole
job can reach. For each engine: a warm-up, one timed ``score`` of all users (tokens/s, users/s), then
``score`` of the first ``--profile-users`` users under torch.profiler, summarised by kernel family (attention,
matmul, group norm, top-K/sort, ...), with the share of the profiled wall time the GPU spent in kernels.

vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the profiler sees its kernels.

``--compile MODE ..`` (engine=torch) replaces that engine's run by torch.compile modes, run one after another on the
same users: ``off`` (the plain engine: the baseline, put it first), ``default``, ``max-autotune-no-cudagraphs``,
``reduce-overhead`` (CUDA graphs). Each gets a fresh engine whose model, ``_logits`` (final LayerNorm, item head,
seen-item mask) and ``candidate_topk`` are compiled with dynamic=True (every jagged batch has another token count);
a timed warm-up (``compile_s``), then ``--compile-passes`` timed scores of all users: pass 1 meets batch shapes not
seen before, as a job does (tokens_per_s); later ones repeat them (tokens_per_s_repeat, the best; CUDA graphs warm
up, record, and only then replay a shape); graph breaks and top-K agreement with ``off``; no torch.profiler. A
failing mode prints its error, records ``compile_failed`` and the next mode runs.
Our Triton kernels' entry points (as batch.model.mtgr calls them) run under torch.compiler.disable, wrapped here and
not in kernels/: dynamo would trace their launch code (caches keyed by tensor identity, stream-capture checks), likely
to break or bake in stale state. So the modes compile the glue only, and our kernels run as in ``off``, one graph break
per call; ``--compile-kernels traced`` lets dynamo try them.

    python bench/engine_profile.py --preset dlrmv3 --users 4000 --engines torch vllm --results bench/results.jsonl
    python bench/engine_profile.py --preset dlrmv3 --users 4000 --engines torch --compile off default reduce-overhead
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import re
import shutil
import sys
import time
import traceback
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


COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead")
# batch.model.mtgr's names for the functions of kernels/ that launch our Triton kernels on CUDA.
KERNEL_ENTRY_POINTS = ("group_layer_norm", "hstu_attention", "linear_silu", "linear_add")
# Users scored before the timed passes of a --compile mode: a first compile may specialise sizes that the second
# batch then makes dynamic (seen: the users dimension of _logits), and a batch of one user gets its own graph.
WARM_UP_USERS = ((0, 64), (64, 101), (101, 102))


@contextlib.contextmanager
def compiled(engine, mode: str, opaque_kernels: bool):
    """The torch engine with its model, ``_logits`` and torch_engine.candidate_topk compiled in ``mode`` for the
    block (``off``: as it is); with ``opaque_kernels`` batch.model.mtgr's kernel entry points are wrapped in
    torch.compiler.disable. The module globals are restored on leaving (the engine is closed after)."""
    import batch.engines.torch_engine as te
    import batch.model.mtgr as mtgr

    saved = {name: getattr(mtgr, name) for name in KERNEL_ENTRY_POINTS}
    saved_topk = te.candidate_topk
    try:
        if mode != "off":
            if opaque_kernels:
                for name, fn in saved.items():
                    setattr(mtgr, name, torch.compiler.disable(fn))
            kw = dict(mode=mode, dynamic=True)
            engine.model = torch.compile(engine.model, **kw)  # an OptimizedModule: .embed, .item_logits pass through
            engine._logits = torch.compile(engine._logits, **kw)
            te.candidate_topk = torch.compile(saved_topk, **kw)
        yield engine
    finally:
        te.candidate_topk = saved_topk
        for name, fn in saved.items():
            setattr(mtgr, name, fn)


def dynamo_counts() -> dict[str, object]:
    """Graph breaks (all, and those at functions wrapped in torch.compiler.disable: our kernels' entry points), their
    most frequent reasons and the graphs compiled since the last torch._dynamo.reset / counters.clear."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return dict(graph_breaks=sum(breaks.values()), disabled=sum(n for r, n in breaks.items() if "disable" in str(r)),
                reasons=[(n, short_reason(r)) for r, n in breaks.most_common(4)],
                graphs=counters["stats"]["unique_graphs"], cudagraph_skips=counters["inductor"]["cudagraph_skips"])


def short_reason(reason) -> str:
    """A graph break's reason on one line: its first line and the object it names (addresses dropped)."""
    lines = [x.strip() for x in str(reason).splitlines() if x.strip()]
    detail = next((x.split(":", 1)[1].strip() for x in lines[1:] if x.startswith("Developer debug context:")), "")
    return re.sub(r" at 0x[0-9a-f]+", "", f"{lines[0] if lines else ''}{': ' + detail if detail else ''}")[:160]


def no_cxx_hint() -> str:
    """A hint when inductor's CPU code can't be built here (no C++ compiler), else ''."""
    if torch.cuda.is_available():
        return ""
    names = dict.fromkeys((os.environ.get("CXX", "g++"), "g++", "clang++"))
    if any(shutil.which(n) for n in names):
        return ""
    return f"  (no C++ compiler on PATH ({', '.join(names)}): inductor needs one to build CPU kernels)"


def compare_compile_modes(ckpt, users, a, run: str, tokens: int, flops: float, record) -> None:
    """--compile: each mode on a fresh torch engine, one after another on the same users (see the docstring)."""
    from torch._dynamo.utils import counters

    base_items = None
    for mode in a.compile:
        cfg = f"{run}; compile={mode}" + (", kernels traced" if mode != "off" and a.compile_kernels == "traced" else "")
        print(f"\n== {cfg}", flush=True)
        rows: list[tuple[str, str, float, str]] = []  # recorded once the mode has run to the end

        def note(metric: str, value: float, unit: str, suffix: str = "") -> None:
            print(f"  {metric:28s} {value:14.6g} {unit}", flush=True)
            rows.append((cfg + suffix, metric, value, unit))

        mark = mode == "reduce-overhead"  # CUDA graph trees: one step per score call (see timed_score)
        engine = None
        torch._dynamo.reset()
        counters.clear()
        try:
            t0 = time.perf_counter()
            engine = build("torch", ckpt, a)
            note("engine_start_s", time.perf_counter() - t0, "s")
            with compiled(engine, mode, a.compile_kernels == "opaque"):
                s = 0.0
                for lo, hi in WARM_UP_USERS:  # batches of other sizes: recompiles for dynamic dims happen here
                    if lo < a.users:
                        s += timed_score(engine, users.select(slice(lo, hi)), a.top_k, mark)[0]
                note("compile_s", s, "s", "; warm-up scores of 64, 37 and 1 users (compilation)")
                warm_graphs = counters["stats"]["unique_graphs"]
                times = []
                for i in range(a.compile_passes):
                    s, out = timed_score(engine, users, a.top_k, mark)
                    times.append(s)
                    print(f"  pass {i + 1}: {s:.3f} s, {tokens / s:,.0f} tokens/s", flush=True)
                    if i == 0:
                        first = out
            note("tokens_per_s", tokens / times[0], "tokens/s")
            note("users_per_s", a.users / times[0], "users/s")
            note("model_tflops", flops / times[0] / 1e12, "TFLOP/s")
            if len(times) > 1:
                note("tokens_per_s_repeat", tokens / min(times[1:]), "tokens/s",
                     f"; best of passes 2-{len(times)} over the same users (batch shapes seen before)")
            if mode == "off":
                base_items = first.items
            elif base_items is not None and base_items.shape == first.items.shape:
                note("topk_equal_users", float((first.items == base_items).all(axis=1).mean()), "fraction",
                     "; users whose top-K items equal compile=off's, in order")
                note("topk_overlap", topk_overlap(first.items, base_items), "fraction",
                     "; share of compile=off's top-K items among each user's top-K, mean over users")
            if mode != "off":
                c = dynamo_counts()
                note("graph_breaks", c["graph_breaks"], "count")
                skips = c["cudagraph_skips"]
                print(f"  graph breaks: {c['graph_breaks']}, {c['disabled']} of them at torch.compiler.disable'd "
                      f"functions; graphs compiled: {warm_graphs} in the warm-up, {c['graphs'] - warm_graphs} more "
                      "in the timed passes (recompiles)"
                      + (f"; graphs run without CUDA graphs: {skips} (TORCH_LOGS=perf_hints says why)" if skips
                         else ""), flush=True)
                for n, reason in c["reasons"]:
                    print(f"    {n:4d}x {reason}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure of a mode is a result; the next mode runs
            lines = [x for x in f"{e}".splitlines() if x.strip()] or [""]
            print(f"  compile={mode} FAILED: {type(e).__module__}.{type(e).__name__}: " + "\n    ".join(lines[:8]),
                  flush=True)
            if a.compile_traceback:
                traceback.print_exc()
            hint = no_cxx_hint()
            if hint:
                print(hint, flush=True)
            if rows:
                print(f"  (not recorded: {', '.join(r[1] for r in rows)})", flush=True)
            rows = []
            record(f"{cfg}; failed: {type(e).__name__}: {lines[0][:200]}", "compile_failed", 1, "count")
        else:
            for row in rows:
                record(*row, echo=False)
        finally:
            if engine is not None:
                engine.close()
            del engine
            torch._dynamo.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def topk_overlap(items: np.ndarray, base: np.ndarray, chunk: int = 1024) -> float:
    """Mean over users of the share of ``base``'s items (B, K) that are also among ``items``'s row (any order)."""
    if items.size == 0:
        return 1.0
    hits = sum(int((items[i: i + chunk, :, None] == base[i: i + chunk, None, :]).any(axis=1).sum())
               for i in range(0, len(items), chunk))
    return hits / base.size


def timed_score(engine, users, top_k: int, mark_step: bool):
    """(seconds, TopK) of one ``score`` of ``users``. ``mark_step``: a CUDA-graph-tree step begins here and not at
    each compiled call (the default in inference), which would free the outputs of the score's earlier batches that
    TorchEngine keeps on the device until its one copy to the host."""
    if mark_step:
        torch.compiler.cudagraph_mark_step_begin()
    sync()
    t0 = time.perf_counter()
    out = engine.score(users, top_k, True)
    sync()
    return time.perf_counter() - t0, out


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
    ap.add_argument("--compile", nargs="+", choices=COMPILE_MODES, metavar="MODE",
                    help=f"engine=torch: compare torch.compile modes instead of its profile ({', '.join(COMPILE_MODES)}"
                         "; reduce-overhead = CUDA graphs; put off first, the baseline)")
    ap.add_argument("--compile-passes", type=int, default=3,
                    help="timed scores of all users per compile mode (3: CUDA graphs warm up, record, then replay)")
    ap.add_argument("--compile-kernels", choices=("opaque", "traced"), default="opaque",
                    help="opaque: our Triton kernels' entry points run outside the graphs (torch.compiler.disable)")
    ap.add_argument("--compile-traceback", action="store_true", help="print the whole traceback of a failed mode")
    ap.add_argument("--work", default="/tmp/mtgr-engine-profile")
    ap.add_argument("--results", default="bench/results.jsonl")
    ap.add_argument("--label", default="")
    ap.add_argument("--commit", default=os.environ.get("MTGR_COMMIT", "unknown"))
    a = ap.parse_args()
    if a.compile_passes < 1:
        ap.error("--compile-passes must be >= 1")
    if a.compile and "torch" not in a.engines:
        ap.error("--compile measures engine=torch: name torch in --engines")

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

    def record(config: str, metric: str, value: float, unit: str, echo: bool = True) -> None:
        row = dict(bench="engine_profile", config=config, metric=metric, value=value, unit=unit, device=device,
                   commit=a.commit, command=command, date=dt.date.today().isoformat())
        if echo:
            print(f"  {metric:28s} {value:14.6g} {unit}", flush=True)
        with open(a.results, "a") as f:
            f.write(json.dumps(row) + "\n")

    for name in a.engines:
        extra = f" {' '.join(a.vllm)}" if name == "vllm" and a.vllm else ""
        run = f"{shape}; engine={name} {a.batch_tokens} tokens/batch{extra}"
        if a.compile and name == "torch":
            compare_compile_modes(ckpt, users, a, run, tokens, flops, record)
            continue
        t0 = time.perf_counter()
        engine = build(name, ckpt, a)
        start_s = time.perf_counter() - t0
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
