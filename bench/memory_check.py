"""Check the torch engine's batch memory estimate against the measured peak on a CUDA device.

The torch engine cuts batches so that ``batch.model.memory``'s estimate of a batch's peak fits a share of the free
memory. This scores one batch per shape (many short users, where the item logits dominate; typical users; one user
of the longest length) with a random-weight checkpoint of a preset, and compares the allocator's peak during the
call with the estimate (the batch's plus what the call keeps for the whole shard). The estimate must not be below
the measured peak (else batches could overrun the budget) and should not be far above it (else they are cut
smaller than they need be).

    python bench/memory_check.py --preset dlrmv3 --results bench/results.jsonl
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch.bench import device_name, preset_config, random_checkpoint  # noqa: E402
from batch.config import Device, DType, TorchEngineConfig  # noqa: E402
from batch.engines.torch_engine import TorchEngine  # noqa: E402
from batch.model import TokenLayout, load_checkpoint  # noqa: E402
from batch.synth import token_batch  # noqa: E402

MIB = float(1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dlrmv3")
    ap.add_argument("--dtype", default="bfloat16", choices=[d.value for d in DType])
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--shapes", nargs="+", default=["4096x8", "64x1000", "1xmax"],
                    help="USERSxEVENTS per user; EVENTS 'max' = the checkpoint's longest history")
    ap.add_argument("--work", default="/tmp/mtgr-memory-check")
    ap.add_argument("--results", default="bench/results.jsonl")
    ap.add_argument("--commit", default=os.environ.get("MTGR_COMMIT", "unknown"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("memory_check needs a CUDA device (the estimate is of device memory)")

    cfg = preset_config(a.preset, {})
    ckpt = load_checkpoint(str(random_checkpoint(Path(a.work) / f"checkpoint-{a.preset}", cfg, 0)))
    layout = TokenLayout(cfg)
    engine = TorchEngine(TorchEngineConfig(device=Device.cuda, dtype=DType(a.dtype), batch_tokens=1 << 40,
                                           memory_fraction=1.0), ckpt)
    device, command = device_name(), "python bench/memory_check.py " + " ".join(sys.argv[1:])
    print(f"preset {a.preset} (d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_items:,} items), {a.dtype}, "
          f"top-{a.top_k}; {engine.batch_memory}", flush=True)
    worst = 0.0
    for shape in a.shapes:
        users, _, events = shape.partition("x")
        longest = layout.max_events(cfg.max_seq_len)
        n_events = longest if events == "max" else min(int(events), longest)
        batch = token_batch(layout, cfg.num_items, np.full(int(users), n_events, dtype=np.int64), seed=0)
        tokens = int(batch.offsets[-1])
        estimate = engine.batch_memory.bytes(tokens, len(batch)) + engine.resident_bytes(batch, a.top_k)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        engine.score(batch, a.top_k, True)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        ratio = estimate / measured
        worst = max(worst, measured / estimate)
        config = (f"preset {a.preset}, {a.dtype}, top-{a.top_k}; one batch of {len(batch)} users x "
                  f"{tokens // len(batch)} tokens ({tokens} tokens)")
        print(f"  {shape:>10s}: {tokens:8d} tokens, measured peak {measured / MIB:9.1f} MiB, estimate "
              f"{estimate / MIB:9.1f} MiB, estimate/measured {ratio:5.2f}", flush=True)
        with open(a.results, "a") as f:
            rows = (("measured_peak", measured / MIB, "MiB"), ("estimated_peak", estimate / MIB, "MiB"),
                    ("estimate_over_measured", ratio, "ratio"))
            for metric, value, unit in rows:
                f.write(json.dumps(dict(bench="memory_check", config=config, metric=metric, value=round(value, 4),
                                        unit=unit, device=device, commit=a.commit, command=command,
                                        date=dt.date.today().isoformat())) + "\n")
    print("estimate covers every measured peak" if worst <= 1.0 else
          f"UNDER-ESTIMATE: a measured peak is {worst:.2f}x the estimate", flush=True)
    sys.exit(0 if worst <= 1.0 else 1)


if __name__ == "__main__":
    main()
