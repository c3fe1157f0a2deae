"""The end-to-end benchmark's own parts: synthetic log, FLOP count, and one small run of the whole thing."""

from __future__ import annotations

import json
import os
import time
from functools import partial

import numpy as np
import polars as pl
import pytest

from batch.bench import BenchConfig, CpuSampler, bench, preset_config
from batch.model import MTGRConfig
from batch.model.flops import scoring_flops
from batch.synth import LogSpec, history_lengths, write_log

SPEC = LogSpec(users=300, events_median=40, events_sigma=0.8, min_events=3, max_events=120, num_items=500,
               run_date="2026-11-01", days=7, seed=3, users_per_file=128)


def test_synthetic_log_is_reproducible_skewed_and_in_the_window(tmp_path):
    a = write_log(SPEC, tmp_path / "a", threads=2)
    b = write_log(SPEC, tmp_path / "b", threads=1)
    assert np.array_equal(a, history_lengths(SPEC)) and np.array_equal(a, b)
    assert a.min() >= 3 and a.max() <= 120 and a.std() > 5  # lengths vary, within the clip
    for name in ("part-00000.parquet", "part-00002.parquet"):
        assert pl.read_parquet(tmp_path / "a" / name).equals(pl.read_parquet(tmp_path / "b" / name))
    log = pl.read_parquet(tmp_path / "a" / "*.parquet")
    assert log.height == a.sum() and log["user_id"].n_unique() == SPEC.users
    assert sorted(log.group_by("user_id").len()["len"].to_list()) == sorted(a.tolist())
    ts = log["timestamp"]
    assert str(ts.min()) >= "2026-10-25" and str(ts.max()) < "2026-11-01"
    top = log["video_id"].value_counts(sort=True)["count"]
    assert top[:5].sum() > 5 * log.height / SPEC.num_items * 5  # popular items are far above uniform
    assert not log["timestamp"].is_sorted()  # rows come unsorted, as in a real log


def test_flops_count_each_part_of_the_model():
    cfg = MTGRConfig(d_model=8, num_layers=3, num_heads=2, num_items=100)
    f = scoring_flops(cfg, np.array([1, 4]))
    assert f["linear"] == 3 * 5 * 2 * (8 * 32 + 8 * 8)  # 5 tokens through U/V/Q/K and output projections
    assert f["attention"] == 3 * (1 + 10) * 2 * 2 * 8  # 1 + 10 causal pairs, Q.K and A.V
    assert f["head"] == 2 * 2 * 8 * 100 and f["total"] == f["linear"] + f["attention"] + f["head"]


def test_presets_resolve_with_overrides():
    cfg = preset_config("dlrmv3", {"num_items": 1234})
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.num_items) == (512, 5, 4, 128, 1234)
    with pytest.raises(SystemExit, match="no model preset"):
        preset_config("nope", {})


def test_bench_runs_the_job_and_records_every_number(tmp_path):
    results = tmp_path / "results.jsonl"
    cfg = BenchConfig(preset="tiny", users=120, events_median=30, min_events=2, max_events=700,
                      workdir=str(tmp_path / "work"), job=["data.num_shards=2", "output.top_k=5"],
                      runs={"small": ["engine=torch", "engine.batch_tokens=512"], "big": ["engine=torch"]},
                      ratio=["small", "big"], results=str(results), label="test")
    records = bench(cfg)
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert lines == records
    by = {(r["config"].split("; run ")[-1].split(":")[0], r["metric"]): r["value"] for r in records}
    for run in ("small", "big"):
        assert by[(run, "users_per_s")] > 0 and by[(run, "tokens_per_s")] > by[(run, "users_per_s")]
        assert by[(run, "score_s")] > 0 and by[(run, "pipeline_s")] > 0
    assert any(r["metric"] == "small_over_big_tokens_per_s" and r["value"] > 0 for r in records)
    assert all(set(r) == {"bench", "config", "metric", "value", "unit", "device", "commit", "command", "date"}
               for r in records)
    for run in ("small", "big"):  # both runs published the same recommendations, and left their samples
        assert (tmp_path / "work" / "out" / run / "dt=2026-11-01" / "part-0.parquet").exists()
        trace = json.loads((tmp_path / "work" / "logs" / f"{run}.samples.json").read_text())
        assert trace["timeline"]["score"]["end"] > trace["timeline"]["score"]["start"] and trace["gpu"] == []
    a, b = (pl.read_parquet(tmp_path / "work" / "out" / r / "dt=2026-11-01" / "part-0.parquet")
            .sort("user_id", "rank").select("user_id", "item_id") for r in ("small", "big"))
    assert a.equals(b)
    agree = {r["metric"]: r["value"] for r in records if "against run small" in r["config"]}
    assert agree == {"topk_overlap": 1.0, "topk_same_order": 1.0}


def test_cpu_sampler_sees_a_busy_cpu():
    cpu = CpuSampler(10)
    try:
        t0 = time.time()
        while time.time() - t0 < 0.3:  # one CPU busy (of os.cpu_count())
            sum(range(1000))
        t1 = time.time()
    finally:
        cpu.close()
    assert all(0.0 <= busy <= 1.0 for _, busy in cpu.samples)
    assert cpu.mean(t0, t1) >= 0.5 / os.cpu_count()
    assert cpu.mean(t1 + 60, t1 + 61) is None  # no samples in that window


def test_mps_daemon_starts_and_stops_around_the_runs(tmp_path, monkeypatch):
    from batch.bench import mps_daemon

    calls = tmp_path / "calls"
    tool = tmp_path / "bin" / "nvidia-cuda-mps-control"
    tool.parent.mkdir()
    tool.write_text(f'#!/bin/sh\necho "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat)" >> {calls}\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    with mps_daemon(tmp_path / "work"):
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "work" / "mps" / "pipe")
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    start, stop = calls.read_text().splitlines()
    assert start.startswith("args=-d pipe=") and stop.endswith("stdin=quit")


def test_mps_without_the_driver_tools_is_a_clear_error(tmp_path, monkeypatch):
    from batch.bench import mps_daemon

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit, match="nvidia-cuda-mps-control"):
        with mps_daemon(tmp_path):
            pass


def test_topk_agreement_between_two_outputs(tmp_path):
    from batch.bench import topk_agreement

    def write(name, rows):
        path = tmp_path / f"{name}.parquet"
        pl.DataFrame(rows, schema=["user_id", "rank", "item_id"], orient="row").write_parquet(path)
        return path

    ref = write("ref", [(1, 1, 10), (1, 2, 11), (2, 1, 20), (2, 2, 21), (3, 1, 30), (3, 2, None)])
    # user 1 the same; user 2 same items, swapped; user 3 one of one item kept; user 4 only in other
    other = write("other", [(2, 1, 21), (2, 2, 20), (1, 2, 11), (1, 1, 10), (3, 1, 30), (3, 2, 31), (4, 1, 40)])
    overlap, same = topk_agreement(ref, other)
    assert overlap == pytest.approx((1 + 1 + 1 + 0) / 4)
    assert same == pytest.approx(1 / 4)
    assert topk_agreement(ref, ref) == (1.0, 1.0)


def test_pool_timeline_splits_the_instances_idle_time_and_finds_the_shard_ends(tmp_path):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("pool_timeline", REPO / "bench" / "pool_timeline.py")
    timeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timeline)
    t0 = 1796659200.0  # 2026-12-01 12:00:00 UTC

    def log_of(chunks: list[tuple[int, float, float]]) -> np.ndarray:
        lines = []
        for instance, start, end in chunks:  # prompts and results take 0.1 s of each chunk
            t = t0 + end
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + f",{round(t % 1 * 1000):03d}"
            lines.append(f"{stamp} INFO [instance {instance}] batch.engines.vllm: vllm: 10 users, 900 tokens: prompts "
                         f"0.10s, generate {end - start - 0.2:.2f}s, results 0.10s")
        (tmp_path / "run.log").write_text("\n".join([*lines, "2026-12-01 12:00:01,000 INFO batch.run: other"]))
        return timeline.read_chunks(tmp_path / "run.log")

    gpu = [[t0 + t / 10, 50.0 if t < 10 else 100.0, 0.0] for t in range(100)]
    samples = {"gpu": gpu, "timeline": {"score": {"start": t0, "end": t0 + 10}}}
    # One shard: instance 1 waits a second for its second chunk (a turnaround), then ends a second after instance 0.
    found = timeline.summarise(log_of([(0, 0, 5), (0, 5, 10), (1, 0, 5), (1, 6, 11)]), samples, shards=1)
    assert found["chunks"] == 4 and found["users_per_chunk"] == 10
    near = partial(pytest.approx, abs=1e-3)  # times are Unix seconds logged to the millisecond
    assert found["instance_idle_share"] == near(0.05) and found["instance_idle_share_max"] == near(0.1)
    assert found["idle_share_turnarounds"] == near(0.05) and found["idle_share_shard_ends"] == near(0)
    assert found["turnaround_ms_median"] == near(500) and found["shard_end_tail_ms_mean"] == near(1000)
    assert found["gpu_busy_first_second"] == pytest.approx(0.5, abs=0.06) and found["gpu_busy"] == near(0.95)
    # Two shards handed over at 4-5 s: every wait is at a shard's end, none is a turnaround.
    found = timeline.summarise(log_of([(0, 0, 4), (0, 5, 9), (1, 0, 3.5), (1, 5, 8)]), samples, shards=2)
    assert found["idle_share_shard_ends"] == near(5.5 / 20) and found["idle_share_turnarounds"] == near(0)
    assert found["shard_end_tail_ms_mean"] == near(750)
