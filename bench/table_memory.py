"""Peak memory of building the inference embedding table (``MixedTypeEmbedding.build_table``), in one piece and in
chunks.

Every engine builds the table at start-up, each vLLM pool instance its own. In one piece, the features and MLP
activations of the whole vocabulary were alive at once; on an H100 twelve vLLM engines starting together ran out of
memory there (issue 6, step 20). Each mode runs in a fresh process: on CUDA the allocator's peak above what the
embedding held before, on CPU the peak resident memory (VmHWM, reset first) above the resident memory before.

    python bench/table_memory.py --preset dlrmv3 --chunks 0 65536    # 0 = one piece
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch.bench import device_name, preset_config  # noqa: E402
from batch.model.mtgr import MixedTypeEmbedding  # noqa: E402
from batch.model.tokens import TokenLayout  # noqa: E402

MIB = float(1 << 20)


def _rss(field: str) -> float:
    """VmRSS or VmHWM of this process in bytes."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return float(line.split()[1]) * 1024


def measure(preset: str, dtype: str, chunk: int, device: str) -> float:
    """Bytes that build_table(chunk) needed beyond what the embedding held before (table included)."""
    cfg = preset_config(preset, {})
    torch.manual_seed(0)
    embed = MixedTypeEmbedding(cfg).to(device, getattr(torch, dtype)).eval()
    chunk = chunk or TokenLayout(cfg).vocab_size
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        embed.build_table(chunk)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size to the current one
    base = _rss("VmRSS")
    embed.build_table(chunk)
    return _rss("VmHWM") - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dlrmv3")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 1 << 16], help="tokens per chunk; 0 = one piece")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--results", default="bench/results.jsonl")
    ap.add_argument("--commit", default=os.environ.get("MTGR_COMMIT", "unknown"))
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: measure this chunk, print
    a = ap.parse_args()
    if a.one is not None:
        print(measure(a.preset, a.dtype, a.one, a.device))
        return
    cfg = preset_config(a.preset, {})
    vocab = TokenLayout(cfg).vocab_size
    table = vocab * cfg.d_model * torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    command = "python bench/table_memory.py " + " ".join(sys.argv[1:])
    device = device_name() if a.device == "cuda" else f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    print(f"preset {a.preset}: vocabulary {vocab:,} x d_model {cfg.d_model}, {a.dtype} table {table / MIB:,.0f} MiB")
    for chunk in a.chunks:
        child = [sys.executable, __file__, "--preset", a.preset, "--dtype", a.dtype, "--device", a.device,
                 "--one", str(chunk)]
        peak = float(subprocess.run(child, check=True, capture_output=True, text=True).stdout.split()[-1])
        mode = "one piece" if chunk == 0 else f"chunks of {chunk:,} tokens"
        print(f"  {mode:>24s}: peak {peak / MIB:9,.0f} MiB above the embedding's weights = {peak / table:5.2f} tables")
        config = f"preset {a.preset}, {a.dtype}, {a.device}; build_table in {mode} (vocabulary {vocab:,})"
        with open(a.results, "a") as f:
            for metric, value, unit in (("build_table_peak", peak / MIB, "MiB"), ("peak_over_table", peak / table,
                                                                                   "ratio")):
                f.write(json.dumps(dict(bench="table_memory", config=config, metric=metric, value=round(value, 3),
                                        unit=unit, device=device, commit=a.commit, command=command,
                                        date=dt.date.today().isoformat())) + "\n")


if __name__ == "__main__":
    main()
