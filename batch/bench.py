"""``python -m batch.bench``: the whole job, Parquet in and out, timed per engine on a synthetic log at scale.

1. Writes a synthetic log (``batch.synth``; skewed history lengths and item popularity) and a random-weight
   checkpoint of a model preset (``conf/model/<preset>.yaml``, arch keys overridable). Both are cached in
   ``workdir`` by their spec.
2. Measures the card's bf16 matrix-product peak (8192^3, CUDA events) when a GPU is present.
3. Runs ``python -m batch.run`` once per entry of ``runs`` (engine overrides; ``job`` applies to all) on the same
   data, sampling GPU utilisation and memory with nvidia-smi, and reads each run's manifest.
4. Reports per run: users/s and tokens/s (tokens = positions the model processes), model TFLOP/s and MFU
   (``batch.model.flops``), GPU busy and host CPU busy shares during the engine phase, peak GPU memory, the time split
   read / sequences / score / write / engine waiting for data, and the ratio of the ``ratio`` runs; and how far
   each run's recommendations agree with the first run's (``topk_agreement``: a fast engine must also be right).
   Throughput is over the data pipeline: the input scan plus engine ready to last write, which leaves out the
   fixed start-up (checkpoint load, engine start) that a nightly run pays once; start-up is reported beside it.
   The row count and the partitioning pass run while the engine starts (what they take beyond it is the
   pipeline's wait for data); tokens/s with both counted in full is reported too.
5. Optionally times the seed document's shape (batch 8 x 500 tokens) on the seed presets (``seed_table``).

Appends one JSON line per number to ``results`` and prints a table. Numbers are measured, never asserted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import hydra
import numpy as np
import polars as pl
import pyarrow as pa
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import to_absolute_path
from omegaconf import OmegaConf

from batch.model import MTGR, ItemVocab, MTGRConfig, ProfileFeature, TokenLayout, save_checkpoint
from batch.model.flops import scoring_flops
from batch.synth import LogSpec, write_log

log = logging.getLogger("batch.bench")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchConfig:
    preset: str = "dlrmv3"  # conf/model/<preset>.yaml: the architecture; weights are random
    arch: dict[str, Any] = field(default_factory=dict)  # scalar overrides of the preset's arch, e.g. num_items
    users: int = 100_000
    events_median: float = 1000.0  # events per user: lognormal(log(median), sigma), clipped to [min, max]
    events_sigma: float = 0.35
    min_events: int = 20
    max_events: int = 4000  # longer histories are cut to the model's max_seq_len by the job, as in production
    days: int = 28
    run_date: str = "2026-11-01"
    workdir: str = "outputs/bench"
    job: list[str] = field(default_factory=lambda: ["data.num_shards=8", "output.top_k=100"])
    runs: dict[str, list[str]] = field(default_factory=dict)  # run name -> job overrides; empty = DEFAULT_RUNS
    ratio: list[str] = field(default_factory=lambda: ["vllm", "torch"])  # report runs[0] / runs[1]
    seed_table: bool = False  # also time batch 8 x 500 tokens on seed_light and seed_high
    results: Optional[str] = "bench/results.jsonl"  # null = print only
    label: str = ""  # free text stored with every result line (e.g. the tuning step)
    run_timeout_s: Optional[int] = None  # a run that takes longer is stopped and recorded as timed out
    profile: list[str] = field(default_factory=list)  # runs made under cProfile instead (vLLM in one process)
    seed: int = 0
    sample_ms: int = 100  # nvidia-smi and host CPU sampling period
    # Start NVIDIA's MPS control daemon for the runs (pipe and log directories under workdir; stopped at the end),
    # so the kernels of an engine pool's processes (engine.instances > 1) share the GPU instead of time-slicing it.
    mps: bool = False


DEFAULT_RUNS = {"torch": ["engine=torch", "engine.dtype=bfloat16"], "vllm": ["engine=vllm_high_throughput"]}


def _schema():
    node = OmegaConf.structured(BenchConfig)
    for key in ("arch", "runs"):  # free-form mappings: `runs={a: [...], b: [...]}` names its own runs
        OmegaConf.set_struct(node[key], False)
    return node


ConfigStore.instance().store(name="bench_schema", node=_schema())


# -- inputs --------------------------------------------------------------------------------------------------------

def preset_config(preset: str, overrides: dict[str, Any]) -> MTGRConfig:
    """The MTGRConfig of ``conf/model/<preset>.yaml`` with scalar ``overrides`` applied."""
    path = REPO / "conf" / "model" / f"{preset}.yaml"
    if not path.exists():
        raise SystemExit(f"bench: no model preset {preset!r} (expected {path.relative_to(REPO)})")
    arch = {**OmegaConf.to_container(OmegaConf.load(path).arch), **overrides}
    arch["profile_features"] = [ProfileFeature(**p) for p in arch.get("profile_features", [])]
    return MTGRConfig(**arch, model_version=f"random-{preset}")


def random_checkpoint(path: Path, cfg: MTGRConfig, seed: int) -> Path:
    """A random-weight checkpoint (cached by config); item embeddings and biases scaled so that next-item
    scores are well separated, as in a trained model."""
    marker = path / "_spec.json"
    spec = json.dumps({"config": dataclasses.asdict(cfg), "seed": seed}, sort_keys=True)
    if marker.exists() and marker.read_text() == spec:
        return path
    torch.manual_seed(seed)
    model = MTGR(cfg)
    with torch.no_grad():
        model.embed.item.weight.mul_(4.0)
        for layer in model.layers:
            layer.rel_bias.normal_(0, 0.5)
    rng = np.random.default_rng(seed)
    categories = rng.integers(1, max(cfg.num_categories, 1) + 1, cfg.num_items)
    items = ItemVocab(pa.array(np.arange(cfg.num_items, dtype=np.int64)), categories, TokenLayout(cfg).item_offset)
    save_checkpoint(str(path), model, items)
    marker.write_text(spec)
    return path


# -- measurement ---------------------------------------------------------------------------------------------------

class GpuSampler:
    """nvidia-smi utilisation (%) and memory used (MiB) of GPU 0, stamped with this clock, every ``ms``."""

    def __init__(self, ms: int):
        self.samples: list[tuple[float, float, float]] = []
        cmd = ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
               f"--loop-ms={ms}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def window(self, start: float, end: float) -> np.ndarray:
        """(n, 3) samples taken in [start, end]."""
        s = np.array(self.samples or [(0.0, 0.0, 0.0)])
        return s[(s[:, 0] >= start) & (s[:, 0] <= end)]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class CpuSampler:
    """Share of all host CPUs busy (not idle or waiting for I/O, from /proc/stat), stamped with this clock, every
    ``ms``: whether the engine's host work had CPUs to run on. None of it where /proc/stat is missing."""

    def __init__(self, ms: int):
        self.samples: list[tuple[float, float]] = []
        self.ms = ms
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        if os.path.exists("/proc/stat"):
            self.thread.start()

    @staticmethod
    def _times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all jiffies; idle + iowait

    def _read(self) -> None:
        total, idle = self._times()
        while not self._stop.wait(self.ms / 1e3):
            t, i = self._times()
            if t > total:
                self.samples.append((time.time(), 1.0 - (i - idle) / (t - total)))
            total, idle = t, i

    def mean(self, start: float, end: float) -> float | None:
        """Mean busy share of the samples taken in [start, end]; None if there are none."""
        inside = [busy for t, busy in self.samples if start <= t <= end]
        return float(np.mean(inside)) if inside else None

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()


def matmul_peak_tflops(n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 matrix-product rate of this GPU (random operands, after warm-up)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def seed_table_ms(preset: str, batch: int = 8, tokens: int = 500, iters: int = 30) -> float:
    """Median ms of one scoring pass (forward, item head at the last position, top-10) of a random-weight preset
    on ``batch`` users of ``tokens`` tokens, bf16 on the GPU (float32 on CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset_config(preset, {})
    model = MTGR(cfg).to(device, dtype).eval()
    model.embed.build_table()
    lay = TokenLayout(cfg)
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(lay.action_offset, lay.vocab_size, (batch * tokens,), generator=gen).to(device)
    offsets = torch.arange(0, batch * tokens + 1, tokens, device=device)
    times = []
    iters, warmup = (iters, 3) if device.type == "cuda" else (2, 1)  # a CPU pass of seed_high takes seconds
    with torch.inference_mode():
        for i in range(iters + warmup):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            hidden = model(tok, offsets)
            torch.topk(model.item_logits(hidden[model.last_positions(offsets)]).float(), 10)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


# -- one run of the job --------------------------------------------------------------------------------------------

def run_job(cfg: BenchConfig, name: str, overrides: list[str], events: Path, ckpt: Path, work: Path,
            sampler: GpuSampler | None, profile: Path | None = None,
            cpu: CpuSampler | None = None) -> dict[str, Any] | None:
    """Run ``python -m batch.run`` with ``overrides``; returns its manifest plus the bench's own observations,
    or None if it ran past ``cfg.run_timeout_s``. With ``profile``, the job runs under cProfile (vLLM's engine core
    in the same process, so the profile sees it) and writes its stats there."""
    out = work / "out" / name
    arch = [f"++model.arch.{k}={v}" for k, v in cfg.arch.items()]
    python = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
    cmd = [*python, "-m", "batch.run", f"model={cfg.preset}", f"model.checkpoint={ckpt}", *arch,
           f"data.path={events}", f"data.run_date={cfg.run_date}", f"data.lookback_days={cfg.days}",
           f"output.path={out}", f"hydra.run.dir={work / 'logs' / name}", *cfg.job, *overrides]
    log.info("run %s: %s", name, shlex.join(cmd[1:]))
    logfile = work / "logs" / f"{name}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if profile:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    base_mem = sampler.samples[-1][2] if sampler and sampler.samples else 0.0
    t0 = time.time()
    with open(logfile, "w") as f:
        # A session of its own, so a timeout stops vLLM's engine core too (it would hold the GPU for later runs).
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=cfg.run_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.error("run %s stopped after %ss (run_timeout_s)", name, cfg.run_timeout_s)
            return None
    t1 = time.time()
    if proc.returncode != 0:
        tail = logfile.read_text()[-4000:]
        raise SystemExit(f"bench: run {name!r} failed with exit code {proc.returncode}; log {logfile}:\n{tail}")
    manifest_path = out.parent / f"{out.name}_manifests" / f"dt={cfg.run_date}" / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["bench"] = {"wall_s": t1 - t0, "log": str(logfile)}
    score = m["timeline"]["score"]
    # The run's samples beside its manifest's timeline (Unix seconds), to see what the host and GPU did when.
    trace = {"gpu": sampler.window(t0, t1).tolist() if sampler else [],
             "cpu": [x for x in cpu.samples if t0 <= x[0] <= t1] if cpu else [], "timeline": m["timeline"]}
    (work / "logs" / f"{name}.samples.json").write_text(json.dumps(trace))
    m["bench"]["samples"] = str(work / "logs" / f"{name}.samples.json")
    if cpu is not None:
        m["bench"]["cpu_busy"] = cpu.mean(score["start"], score["end"])
    if sampler is not None:
        busy = sampler.window(score["start"], score["end"])
        job = sampler.window(t0, t1)
        m["bench"].update(gpu_busy=float(busy[:, 1].mean() / 100) if len(busy) else None, gpu_samples=len(busy),
                          gpu_peak_mem_gib=float((job[:, 2].max() - base_mem) / 1024) if len(job) else None)
    return m


def summarise(m: dict[str, Any], lengths: np.ndarray, model_cfg: MTGRConfig, peak: float | None) -> dict[str, Any]:
    """Throughput, FLOP rate and time split of one run from its manifest."""
    t, span = m["timings_seconds"], m["timeline"]
    # The data pipeline: the input scan, then from the engine being ready to the last shard written (the row
    # count, the partitioning pass and the first shards run while the engine starts, as in production). Those
    # passes grow with the input while start-up does not, so tokens/s with them counted in full is reported too.
    pipeline = t["scan"] + span["write"]["end"] - span["engine_start"]["end"]
    engine = span["score"]["end"] - span["score"]["start"]
    users, tokens = int(len(lengths)), float(lengths.sum())
    flops = scoring_flops(model_cfg, lengths)["total"]
    s = {
        "users_per_s": users / pipeline,
        "tokens_per_s": tokens / pipeline,
        "tokens_per_s_with_partition": tokens / (pipeline + t.get("count", 0.0) + t.get("partition", 0.0)),
        "tflops": flops / pipeline / 1e12,
        "engine_tokens_per_s": tokens / engine,
        "engine_tflops": flops / engine / 1e12,
        "pipeline_s": pipeline,
        "startup_s": t["load_checkpoint"] + t["engine_start"],
        "job_wall_s": m["bench"]["wall_s"],
        **{f"{k}_s": t.get(k, 0.0) for k in ("scan", "count", "partition", "read", "sequences", "score",
                                             "wait_for_data", "write")},
    }
    if peak:
        s["mfu"] = s["tflops"] / peak
        s["engine_mfu"] = s["engine_tflops"] / peak
    for k in ("gpu_busy", "gpu_peak_mem_gib", "cpu_busy"):
        if m["bench"].get(k) is not None:
            s[k] = m["bench"][k]
    return s


UNITS = {"users_per_s": "users/s", "tokens_per_s": "tokens/s", "engine_tokens_per_s": "tokens/s",
         "tokens_per_s_with_partition": "tokens/s",
         "tflops": "TFLOP/s", "engine_tflops": "TFLOP/s", "mfu": "fraction", "engine_mfu": "fraction",
         "gpu_busy": "fraction", "gpu_peak_mem_gib": "GiB", "cpu_busy": "fraction of host CPUs"}


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


@contextlib.contextmanager
def mps_daemon(work: Path) -> Iterator[None]:
    """NVIDIA's MPS control daemon, private to this benchmark, for the block; jobs started inside connect to it."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        raise SystemExit("bench: mps=true needs nvidia-cuda-mps-control (the NVIDIA driver's tools) on PATH")
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(work / "mps" / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(work / "mps" / "log")}
    before = {k: os.environ.get(k) for k in env}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    subprocess.run([control, "-d"], check=True)
    log.info("MPS daemon started (pipe %s)", env["CUDA_MPS_PIPE_DIRECTORY"])
    try:
        yield
    finally:
        subprocess.run([control], input="quit\n", text=True, check=False)
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def git_commit() -> str:
    if os.environ.get("MTGR_COMMIT"):  # a copied tree (GPU host) may carry a stale .git
        return os.environ["MTGR_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short=8", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Run the benchmark; returns the result records (also appended to ``cfg.results``)."""
    work = Path(to_absolute_path(cfg.workdir))
    model_cfg = preset_config(cfg.preset, dict(cfg.arch))
    spec = LogSpec(users=cfg.users, events_median=cfg.events_median, events_sigma=cfg.events_sigma,
                   min_events=cfg.min_events, max_events=cfg.max_events, num_items=model_cfg.num_items,
                   run_date=cfg.run_date, days=cfg.days, seed=cfg.seed)
    t0 = time.perf_counter()
    events = write_log(spec, work / "events")
    log.info("log: %s users, %s events (%.0fs)", f"{len(events):,}", f"{int(events.sum()):,}", time.perf_counter() - t0)
    t0 = time.perf_counter()
    ckpt = random_checkpoint(work / f"checkpoint-{cfg.preset}", model_cfg, cfg.seed)
    log.info("checkpoint: %s (%.0fs)", ckpt, time.perf_counter() - t0)
    lay = TokenLayout(model_cfg)
    used = np.minimum(events, lay.max_events(model_cfg.max_seq_len))  # the job keeps each user's last events
    events_used, lengths = int(used.sum()), lay.prefix_len + 2 * used

    device, commit = device_name(), git_commit()
    command = "python -m batch.bench " + shlex.join(sys.argv[1:])
    shape = (f"preset {cfg.preset} {json.dumps(cfg.arch, sort_keys=True) if cfg.arch else ''} "
             f"(d_model {model_cfg.d_model}, {model_cfg.num_layers} layers, {model_cfg.num_heads} heads, "
             f"{model_cfg.num_items:,} items); {len(events):,} users, mean {events.mean():.0f} events/user in the log, "
             f"mean {lengths.mean():.0f} tokens/user scored; job {' '.join(cfg.job)}")
    if cfg.mps:
        shape += "; CUDA MPS daemon on"
    if cfg.label:
        shape += f"; {cfg.label}"
    records: list[dict[str, Any]] = []

    def record(config: str, metric: str, value: float, unit: str) -> None:
        records.append({"bench": "e2e", "config": config, "metric": metric, "value": value, "unit": unit,
                        "device": device, "commit": commit, "command": command,
                        "date": dt.date.today().isoformat()})
        if cfg.results:  # as soon as measured: a later run that fails loses nothing
            with open(to_absolute_path(cfg.results), "a") as f:
                f.write(json.dumps(records[-1]) + "\n")

    with mps_daemon(work) if cfg.mps else contextlib.nullcontext():
        return _measure(cfg, work, ckpt, model_cfg, events_used, lengths, shape, record, records)


def _measure(cfg: BenchConfig, work: Path, ckpt: Path, model_cfg: MTGRConfig, events_used: int, lengths: np.ndarray,
             shape: str, record: Callable[[str, str, float, str], None],
             records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs, the ratio and the seed table of :func:`bench`."""
    peak = None
    if torch.cuda.is_available():
        peak = matmul_peak_tflops()
        record("bf16 matmul 8192x8192x8192, random operands", "matmul_peak", peak, "TFLOP/s")
        torch.cuda.empty_cache()
    sampler = GpuSampler(cfg.sample_ms) if torch.cuda.is_available() else None
    cpu = CpuSampler(cfg.sample_ms)
    summaries = {}
    try:
        runs = cfg.runs or DEFAULT_RUNS
        for name, overrides in runs.items():
            if name in cfg.profile:
                continue  # profiled below: a profiled run's timings are not representative
            m = run_job(cfg, name, list(overrides), work / "events", ckpt, work, sampler, cpu=cpu)
            if m is None:
                record(f"{shape}; run {name}: {' '.join(overrides)}", "timed_out", float(cfg.run_timeout_s), "s")
                continue
            if m["events"]["used"] != events_used:
                raise SystemExit(f"bench: run {name!r} used {m['events']['used']} events, expected {events_used}")
            s = summaries[name] = summarise(m, lengths, model_cfg, peak)
            for metric, value in s.items():
                record(f"{shape}; run {name}: {' '.join(overrides)}", metric, value,
                       UNITS.get(metric, "s" if metric.endswith("_s") else ""))
        for name in cfg.profile:
            stats = work / "profiles" / f"{name}.prof"
            stats.parent.mkdir(parents=True, exist_ok=True)
            if name in runs and run_job(cfg, f"{name}-profile", list(runs[name]), work / "events", ckpt, work, None, stats):
                print_profile(stats, name)
    finally:
        cpu.close()
        if sampler is not None:
            sampler.close()
    ref = next(iter(summaries), None)
    for name in list(summaries)[1:]:
        published = [work / "out" / r / f"dt={cfg.run_date}" / "part-0.parquet" for r in (ref, name)]
        overlap, same = topk_agreement(*published)
        record(f"{shape}; run {name} against run {ref}", "topk_overlap", overlap, "fraction of items")
        record(f"{shape}; run {name} against run {ref}", "topk_same_order", same, "fraction of users")
    a, b = cfg.ratio if len(cfg.ratio) == 2 else (None, None)
    if a in summaries and b in summaries:
        record(f"{shape}; {a} / {b}", f"{a}_over_{b}_tokens_per_s",
               summaries[a]["tokens_per_s"] / summaries[b]["tokens_per_s"], "ratio")
    if cfg.seed_table:
        for preset in ("seed_light", "seed_high"):
            ms = seed_table_ms(preset)
            record(f"preset {preset}, random weights, batch 8 x 500 tokens, forward + head + top-10, "
                   f"{'bf16' if torch.cuda.is_available() else 'float32'}", "seed_table_latency", ms, "ms")
    print_table(summaries, records)
    return records


def topk_agreement(ref: Path, other: Path) -> tuple[float, float]:
    """(mean share of each user's ref top-K items that ``other`` also recommends, share of users whose top-K is the
    same list in the same order) between two published long-format outputs; a user missing from one counts as no
    agreement."""
    def lists(path: Path) -> pl.DataFrame:
        return (pl.read_parquet(path, columns=["user_id", "rank", "item_id"]).drop_nulls("item_id")
                .sort("user_id", "rank").group_by("user_id", maintain_order=True).agg("item_id"))

    both = lists(ref).join(lists(other), on="user_id", how="full", suffix="_other", coalesce=True)
    a, b = pl.col("item_id").fill_null([]), pl.col("item_id_other").fill_null([])
    scores = both.select(overlap=(a.list.set_intersection(b).list.len() / a.list.len().clip(1)),
                         same=(a == b) & a.list.len().gt(0))
    return float(scores["overlap"].mean()), float(scores["same"].mean())


def print_table(summaries: dict[str, dict[str, Any]], records: list[dict[str, Any]]) -> None:
    cols = ["users_per_s", "tokens_per_s", "tflops", "mfu", "engine_tokens_per_s", "gpu_busy", "cpu_busy",
            "gpu_peak_mem_gib", "pipeline_s", "startup_s", "count_s", "partition_s", "read_s", "sequences_s",
            "score_s", "wait_for_data_s", "write_s"]
    print("run".ljust(10) + "".join(c.rjust(max(len(c), 10) + 2) for c in cols))
    for name, s in summaries.items():
        cells = [f"{s[c]:,.3f}" if isinstance(s.get(c), float) and abs(s[c]) < 10 else
                 (f"{s[c]:,.0f}" if c in s else "-") for c in cols]
        print(name.ljust(10) + "".join(v.rjust(max(len(c), 10) + 2) for c, v in zip(cols, cells)))
    for r in records:
        if r["metric"] in ("matmul_peak", "seed_table_latency", "topk_overlap", "topk_same_order") \
                or "_over_" in r["metric"]:
            print(f"{r['metric']}: {r['value']:.3f} {r['unit']}  ({r['config'][-60:]})")


def print_profile(stats: Path, name: str, lines: int = 45) -> None:
    """The functions with the most cumulative and own time in a cProfile dump."""
    import pstats

    print(f"== profile of run {name} ({stats})")
    p = pstats.Stats(str(stats))
    p.sort_stats("cumulative").print_stats(lines)
    p.sort_stats("tottime").print_stats(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(raw) -> None:
    cfg: BenchConfig = OmegaConf.to_object(raw)
    bench(cfg)


if __name__ == "__main__":
    main()
