"""GPU check of engine=vllm against engine=torch (issue 4): parity, bf16 agreement, throughput.

1. fp32 parity on a tiny-preset model: same top-K items in the same order, scores within 1e-4, with users longer
   than the vLLM step budget (chunked prefill) and prefix caching on.
2. bf16 top-10 agreement (mean |vLLM top-10 & torch top-10| / 10) and throughput (users/s, tokens/s) on a
   seed_light-sized model (random weights) over synthetic users, engine=vllm with the high-throughput preset vs
   engine=torch.

The engines are driven directly on synthetic token sequences: the Polars data stage is not part of this check.
Writes one JSON line per number to --results (keys of bench/results.jsonl) and prints a summary table.

    python3 bench/vllm_gpu_check.py --commit "$(git rev-parse HEAD)" [--users 20000] [--results bench/results.jsonl]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch.config import Device, DType, TorchEngineConfig, VllmEngineConfig  # noqa: E402
from batch.engines.base import TopK, UserBatch  # noqa: E402
from batch.engines.torch_engine import TorchEngine  # noqa: E402
from batch.model import MTGRConfig, ProfileFeature, TokenLayout, load_checkpoint  # noqa: E402
from batch.bench import random_checkpoint  # noqa: E402

TINY = dict(d_model=64, num_layers=2, num_heads=2, max_seq_len=1024, num_items=1500, num_categories=31,
            feature_dim=16, profile_features=[ProfileFeature("age_group", 7)])
SEED_LIGHT = dict(d_model=768, num_layers=16, num_heads=12, max_seq_len=1024, num_items=21036, num_categories=100,
                  feature_dim=16, profile_features=[ProfileFeature("age_group", 7)])
HIGH_THROUGHPUT = dict(gpu_memory_utilization=0.95, max_num_batched_tokens=8192, max_num_seqs=512,
                       dtype=DType.bfloat16)


def make_checkpoint(path: Path, arch: dict, seed: int = 0) -> Path:
    """A random-weight checkpoint of ``arch`` (see batch.bench.random_checkpoint)."""
    return random_checkpoint(path, MTGRConfig(**arch, model_version=f"random-{seed}"), seed)


def synthetic_users(layout: TokenLayout, num_items: int, num_users: int, max_len: int, median_events: float,
                    seed: int) -> UserBatch:
    """Token sequences [profile] + [item, action] per event; event counts log-normal around the median."""
    rng = np.random.default_rng(seed)
    p = layout.prefix_len
    max_events = (max_len - p) // 2
    events = np.clip(rng.lognormal(np.log(median_events), 0.9, num_users).astype(np.int64), 1, max_events)
    lengths = p + 2 * events
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    tokens = np.empty(int(offsets[-1]), dtype=np.int64)
    is_profile = (np.arange(len(tokens)) - np.repeat(offsets[:-1], lengths)) < p
    slot = np.arange(len(tokens)) - np.repeat(offsets[:-1], lengths) - p
    n_prof, n_ev = int(is_profile.sum()), int((~is_profile).sum())
    tokens[is_profile] = layout.profile_offset + rng.integers(0, max(layout.num_profile_tokens_total, 1), n_prof)
    ev_tokens = np.where(slot[~is_profile] % 2 == 0,
                         layout.item_offset + rng.zipf(1.3, n_ev) % num_items,
                         layout.action_offset + rng.integers(0, layout.num_action_tokens, n_ev))
    tokens[~is_profile] = ev_tokens
    return UserBatch(pa.array(np.arange(num_users)), tokens, offsets)


def torch_run(ckpt_dir: Path, dtype: DType, users: UserBatch, k: int) -> tuple[TopK, float]:
    engine = TorchEngine(TorchEngineConfig(device=Device.cuda, dtype=dtype, batch_tokens=16384),
                         load_checkpoint(str(ckpt_dir)))
    engine.score(users.select(slice(0, min(256, len(users)))), k, True)  # warm-up (Triton compiles)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    top = engine.score(users, k, True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return top, seconds


def vllm_run(ckpt_dir: Path, cfg: VllmEngineConfig, users: UserBatch, k: int) -> tuple[TopK, float, float]:
    from batch.engines.vllm.engine import VllmEngine

    t0 = time.perf_counter()
    ckpt = load_checkpoint(str(ckpt_dir))
    engine = VllmEngine(cfg, ckpt.path, ckpt.config)
    init_s = time.perf_counter() - t0
    engine.score(users.select(slice(0, min(256, len(users)))), k, True)  # warm-up
    t0 = time.perf_counter()
    top = engine.score(users, k, True)
    seconds = time.perf_counter() - t0
    engine.close()
    del engine
    gc.collect()
    return top, seconds, init_s


def agreement(a: TopK, b: TopK) -> float:
    """Mean share of b's top-K items that are also in a's top-K."""
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a.items.tolist(), b.items.tolist())]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--parity-users", type=int, default=400)
    ap.add_argument("--work", default="/tmp/mtgr-vllm-check")
    ap.add_argument("--results", default="bench/results.jsonl")
    ap.add_argument("--commit", default=os.environ.get("MTGR_COMMIT", "unknown"))
    ap.add_argument("--command", default=" ".join(sys.argv))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name()
    import vllm

    device = f"{card}, vLLM {vllm.__version__}, torch {torch.__version__}"
    date = dt.date.today().isoformat()
    rows: list[dict] = []

    def record(config: str, metric: str, value: float, unit: str) -> None:
        rows.append(dict(bench="vllm_engine", config=config, metric=metric, value=value, unit=unit, device=device,
                         commit=a.commit, command=a.command, date=date))
        print(f"  {config:58s} {metric:24s} {value:14.6g} {unit}", flush=True)

    # 1. fp32 parity, tiny preset: chunked prefill (step 256 < users up to 1024 tokens) and prefix caching on.
    tiny = make_checkpoint(work / "tiny", TINY)
    lay = TokenLayout(MTGRConfig(**TINY))
    users = synthetic_users(lay, TINY["num_items"], a.parity_users, TINY["max_seq_len"], 120, seed=1)
    want, _ = torch_run(tiny, DType.float32, users, 10)
    cfg = VllmEngineConfig(dtype=DType.float32, max_num_batched_tokens=256, max_num_seqs=64,
                           enable_prefix_caching=True, kv_cache_memory_bytes=2 << 30, max_logprobs=10)
    got, _, _ = vllm_run(tiny, cfg, users, 10)
    finite = np.isfinite(want.scores)
    same_order = float(np.mean((got.items == want.items).all(axis=1)))
    max_diff = float(np.abs(got.scores[finite] - want.scores[finite]).max())
    name = (f"tiny fp32, {len(users)} users, {(users.lengths > 256).sum()} over the 256-token step, "
            "prefix caching on")
    record(name, "top10_same_order_share", same_order, "fraction of users")
    record(name, "max_abs_score_diff", max_diff, "logit")
    parity_ok = same_order == 1.0 and max_diff <= 1e-4 and (np.isfinite(got.scores) == finite).all()

    # 2. bf16 agreement and throughput, seed_light-sized model, high-throughput preset.
    big = make_checkpoint(work / "seed_light", SEED_LIGHT)
    lay = TokenLayout(MTGRConfig(**SEED_LIGHT))
    users = synthetic_users(lay, SEED_LIGHT["num_items"], a.users, SEED_LIGHT["max_seq_len"], 100, seed=2)
    tokens = int(users.lengths.sum())
    desc = f"seed_light arch random weights, bf16, {len(users)} users, {tokens} tokens, top-10"
    t_top, t_s = torch_run(big, DType.bfloat16, users, 10)
    v_top, v_s, v_init = vllm_run(big, VllmEngineConfig(**HIGH_THROUGHPUT, max_logprobs=10), users, 10)
    agree = agreement(v_top, t_top)
    record(desc, "top10_agreement_bf16", agree, "fraction of items")
    for engine, s in (("engine=torch batch_tokens=16384", t_s), ("engine=vllm high_throughput preset", v_s)):
        record(f"{desc}, {engine}", "users_per_s", len(users) / s, "users/s")
        record(f"{desc}, {engine}", "tokens_per_s", tokens / s, "tokens/s")
    record(f"{desc}, engine=vllm high_throughput preset", "engine_start_s", v_init, "s")

    with open(a.results, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    ok = parity_ok and agree >= 0.99
    print(f"parity fp32: {'PASS' if parity_ok else 'FAIL'}; bf16 top-10 agreement {agree:.4f} "
          f"({'PASS' if agree >= 0.99 else 'FAIL'}); card {card}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
