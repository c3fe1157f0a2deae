"""The whole job: `python -m batch.run` and run_job end to end, counts in the manifest, bad input."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hydra import compose, initialize_config_dir

from batch.config import to_job_config
from batch.errors import BatchError, ConfigError, InputError
from batch.run import absolute_paths, run_job

from conftest import REPO, make_events, write_hive

SAMPLE_CHECKPOINT = REPO / "data/samples/checkpoint"
PARTITION = "dt=2026-11-27"


def config(events: Path, checkpoint: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        raw = compose("config", overrides=["model=custom", f"model.checkpoint={checkpoint}", f"data.path={events}",
                                           f"output.path={out}", "engine.device=cpu", *overrides])
    return absolute_paths(to_job_config(raw))


def cli(*args: str, log_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTGR_LOG_DIR": str(log_dir), "OMP_NUM_THREADS": "2"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "batch.run", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def published(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / PARTITION / "part-0.parquet")


def manifest(out: Path) -> dict:
    return json.loads((out.parent / f"{out.name}_manifests" / PARTITION / "manifest.json").read_text())


def recs(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select("user_id", "rank", "item_id", "score").sort("user_id", "rank")


def assert_same_recs(a: pl.DataFrame, b: pl.DataFrame) -> None:
    a, b = recs(a), recs(b)
    assert a.select("user_id", "rank", "item_id").equals(b.select("user_id", "rank", "item_id"))
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-5, atol=1e-5)


def test_cli_end_to_end_on_a_tiny_log(tmp_path, events_dir, tiny_checkpoint, events_frame):
    out = tmp_path / "recs"
    proc = cli("model=custom", f"model.checkpoint={tiny_checkpoint}", f"data.path={events_dir}", "engine=torch",
               "output.top_k=20", "data.num_shards=4", f"output.path={out}", log_dir=tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = published(out)
    users = events_frame["user_id"].unique().sort().to_list()
    assert got["user_id"].unique().sort().to_list() == users
    assert got.group_by("user_id").agg(pl.col("rank").sort()).get_column("rank").to_list() == \
        [list(range(1, 21))] * len(users)
    assert (got.sort("user_id", "rank").group_by("user_id", maintain_order=True)
            .agg(pl.col("score").diff().drop_nulls().max()).get_column("score").max() <= 0)  # best first
    m = manifest(out)
    assert m["users"]["scored"] == len(users) and m["output"]["rows"] == got.height == 20 * len(users)
    assert m["input"]["rows_read"] == events_frame.height and m["model"]["checkpoint_hash"]
    assert set(m["timings_seconds"]) >= {"load_checkpoint", "scan", "read", "sequences", "score", "write"}
    assert (tmp_path / "logs").exists() and "shard 3 done" in proc.stderr


def test_shard_count_and_token_budget_do_not_change_results(tmp_path, events_dir, tiny_checkpoint):
    runs = {}
    for name, overrides in {"one": ["data.num_shards=1"], "four": ["data.num_shards=4"],
                            "small_budget": ["data.num_shards=3", "engine.batch_tokens=40"],
                            "more_shards_than_users": ["data.num_shards=64"]}.items():
        out = tmp_path / name
        run_job(config(events_dir, tiny_checkpoint, out, "output.top_k=15", *overrides))
        runs[name] = published(out)
    assert_same_recs(runs["one"], runs["four"])
    assert_same_recs(runs["one"], runs["small_budget"])
    assert_same_recs(runs["one"], runs["more_shards_than_users"])  # empty shards are fine


def test_a_failing_shard_stops_the_overlapped_pipeline_and_publishes_nothing(tmp_path, events_dir, tiny_checkpoint,
                                                                           monkeypatch):
    from batch.engines.torch_engine import TorchEngine

    out = tmp_path / "recs"
    run_job(config(events_dir, tiny_checkpoint, out, "data.num_shards=2"))
    before = published(out)
    scored, real_score = [], TorchEngine.score

    def score_then_fail(self, batch, top_k, exclude_seen):
        scored.append(len(batch))
        if len(scored) == 3:
            raise RuntimeError("device lost")
        return real_score(self, batch, top_k, exclude_seen)

    monkeypatch.setattr(TorchEngine, "score", score_then_fail)
    with pytest.raises(RuntimeError, match="device lost"):
        run_job(config(events_dir, tiny_checkpoint, out, "data.num_shards=5", "output.top_k=3"))
    assert len(scored) == 3  # shards after the failing one are never scored
    assert_same_recs(published(out), before)  # the previous output is intact
    assert sorted(p.name for p in (out / PARTITION).iterdir()) == ["part-0.parquet"]  # no staged leftovers


def test_manifest_times_each_stage_and_its_span(tmp_path, events_dir, tiny_checkpoint):
    out = tmp_path / "recs"
    run_job(config(events_dir, tiny_checkpoint, out, "data.num_shards=3"))
    m = manifest(out)
    spans = m["timeline"]
    assert {"read", "sequences", "wait_for_data", "score", "write"} <= set(spans) <= set(m["timings_seconds"])
    assert all(s["start"] <= s["end"] for s in spans.values())
    assert spans["read"]["start"] <= spans["score"]["start"] <= spans["write"]["start"]
    assert spans["score"]["end"] <= spans["write"]["end"]
    # The rows are counted after the partitioning pass, so the readers (and the first shard) never wait for it.
    assert spans["partition"]["end"] <= spans["count"]["start"] and m["input"]["rows_read"] > 0


def test_string_user_ids_and_nested_output(tmp_path, events_frame, events_dir, tiny_checkpoint):
    strings = write_hive(events_frame.with_columns(pl.format("u{}", "user_id").alias("user_id")), tmp_path / "ev")
    run_job(config(strings, tiny_checkpoint, tmp_path / "s", "data.num_shards=3", "output.format=nested"))
    run_job(config(events_dir, tiny_checkpoint, tmp_path / "i", "data.num_shards=2"))
    nested = published(tmp_path / "s").explode("recs").unnest("recs")
    ints = published(tmp_path / "i").with_columns(pl.format("u{}", "user_id").alias("user_id"))
    assert nested["user_id"].n_unique() == ints["user_id"].n_unique()
    assert_same_recs(nested, ints)


def test_dirty_rows_are_dropped_counted_and_reported(tmp_path, tiny_checkpoint, events_frame):
    frame = events_frame.with_columns(
        user_id=pl.when(pl.int_range(pl.len()) % 10 == 0).then(None).otherwise(pl.col("user_id")),
        watch_percentage=pl.when(pl.col("user_id") == 7).then(2.0).otherwise(pl.col("watch_percentage")),
        video_id=pl.when(pl.int_range(pl.len()) % 10 == 1).then(123456789).otherwise(pl.col("video_id")))
    events = write_hive(frame, tmp_path / "events")
    out = tmp_path / "recs"
    m = run_job(config(events, tiny_checkpoint, out))
    nulls = frame["user_id"].null_count()
    user7 = frame.filter(pl.col("user_id") == 7).height
    assert m["input"]["rows_dropped"] == {"null_user_id": nulls, "watch_percentage_out_of_range": user7}
    assert m["input"]["rows_clean"] == frame.height - nulls - user7
    assert m["users"]["skipped"] == {"all_rows_dropped": 1} and m["users"]["in"] == m["users"]["scored"] + 1
    assert m["input"]["rows_unknown_item"] == m["events"]["oov_items"] > 0
    assert 7 not in published(out)["user_id"].to_list()


def _break(kind: str, events: Path, checkpoint: Path, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A broken input of the given kind: (events, checkpoint, extra overrides)."""
    part = events / "dt=2026-11-26" / "part-0.parquet"
    if kind == "missing_column":
        pl.read_parquet(part).drop("is_liked").write_parquet(part)
    elif kind == "wrong_type":
        pl.read_parquet(part).with_columns(pl.col("video_id").cast(pl.String)).write_parquet(part)
    elif kind == "corrupt_file":
        part.write_bytes(b"PAR1garbagegarbage")
    elif kind == "empty_input":
        events = tmp_path / "empty"
        events.mkdir()
    elif kind == "no_rows_in_window":
        return events, checkpoint, ["data.run_date=2026-12-25", "data.lookback_days=20"]
    elif kind == "all_rows_dirty":
        events = write_hive(make_events(num_users=3).with_columns(pl.lit(-1.0).alias("watch_duration")),
                            tmp_path / "dirty")
    elif kind == "missing_checkpoint":
        checkpoint = tmp_path / "no-such-checkpoint"
    elif kind == "unknown_column_in_filter":
        return events, checkpoint, ["data.filter='colour = 1'"]
    return events, checkpoint, []


@pytest.mark.parametrize("kind, error, message", [
    ("missing_column", InputError, r"dt=2026-11-26/part-0\.parquet: missing column 'is_liked'"),
    ("wrong_type", InputError, r"part-0\.parquet: column 'video_id' has type (large_)?string, expected integer"),
    ("corrupt_file", InputError, r"dt=2026-11-26/part-0\.parquet: not a readable Parquet file"),
    ("empty_input", InputError, "no Parquet files found"),
    ("no_rows_in_window", InputError, "run window"),
    ("all_rows_dirty", InputError, r"no usable rows .*negative_watch_duration"),
    ("missing_checkpoint", InputError, "model.checkpoint: .*no-such-checkpoint.* does not exist"),
    ("unknown_column_in_filter", ConfigError, "data.filter"),
])
def test_bad_input_fails_clearly_and_keeps_published_output(tmp_path, events_dir, tiny_checkpoint, kind, error,
                                                            message):
    out = tmp_path / "recs"
    run_job(config(events_dir, tiny_checkpoint, out))
    before, before_manifest = (out / PARTITION / "part-0.parquet").read_bytes(), manifest(out)
    events, checkpoint, overrides = _break(kind, events_dir, tiny_checkpoint, tmp_path)
    with pytest.raises(error, match=message):
        run_job(config(events, checkpoint, out, *overrides))
    assert (out / PARTITION / "part-0.parquet").read_bytes() == before and manifest(out) == before_manifest
    assert sorted(p.name for p in out.iterdir()) == [PARTITION]


def test_an_input_without_usable_rows_fails_before_the_engine_starts(tmp_path, events_dir, tiny_checkpoint,
                                                                     monkeypatch):
    import batch.run

    def no_engine(*args):
        raise AssertionError("the engine was started")

    monkeypatch.setattr(batch.run, "build_engine", no_engine)
    events, checkpoint, _ = _break("all_rows_dirty", events_dir, tiny_checkpoint, tmp_path)
    with pytest.raises(InputError, match=r"no usable rows .*negative_watch_duration"):
        run_job(config(events, checkpoint, tmp_path / "recs"))
    with pytest.raises(AssertionError, match="engine was started"):  # a usable input gets that far
        run_job(config(events_dir, tiny_checkpoint, tmp_path / "recs"))


def test_checkpoint_that_disagrees_with_the_preset_is_refused(tmp_path, events_dir, tiny_checkpoint):
    with pytest.raises(InputError, match=r"has d_model=16 but model preset 'tiny' says model\.arch\.d_model=64"):
        run_job(config(events_dir, tiny_checkpoint, tmp_path / "recs", "model=tiny"))
    with pytest.raises(ConfigError, match="model.arch.colour is not an MTGR hyper-parameter"):
        run_job(config(events_dir, tiny_checkpoint, tmp_path / "recs", "+model.arch.colour=1"))


def test_cli_bad_input_exits_non_zero_with_one_line(tmp_path, events_dir):
    proc = cli(f"data.path={events_dir}", f"model.checkpoint={tmp_path / 'missing'}", f"output.path={tmp_path}/o",
               log_dir=tmp_path / "logs")
    assert proc.returncode == 1 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "missing" in errors[0] and "does not exist" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not (SAMPLE_CHECKPOINT / "config.json").exists(), reason="sample checkpoint not trained yet")
def test_cli_on_the_committed_sample(tmp_path):
    """The documented command on the committed sample (max_seq_len trimmed to keep the test fast on CPU)."""
    out = tmp_path / "recs"
    proc = cli("engine=torch", "output.top_k=20", "data.num_shards=4", f"output.path={out}", "data.max_seq_len=101",
               log_dir=tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = published(out)
    m = manifest(out)
    assert m["users"]["scored"] == got["user_id"].n_unique() >= 1900 and got.height == 20 * m["users"]["scored"]
    assert m["input"]["files_read"] == 14 and m["model"]["preset"] == "tiny"
