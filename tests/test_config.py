"""Hydra composition, the schemas and validation errors: in-process (compose) and through `python -m batch.run`."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from batch.config import (Compression, EngineName, JobConfig, OutputFormat, TorchEngineConfig,
                          to_job_config, window)
from batch.engines import build_engine
from batch.errors import ConfigError

from conftest import REPO

CONF = str(REPO / "conf")


def job(*overrides: str) -> JobConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_job_config(compose("config", overrides=list(overrides)))


def compose_error(*overrides: str) -> str:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as info:
            compose("config", overrides=list(overrides))
    return f"{info.value} {info.value.__cause__}"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch.run", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "MTGR_LOG_DIR": os.environ.get("MTGR_TEST_LOG_DIR", "/tmp/mtgr-logs"),
                               **(env or {})}, timeout=120)


def test_defaults_point_at_the_sample():
    cfg = job()
    assert cfg.data.path == "data/samples/events" and cfg.data.run_date == "2026-11-27"
    assert cfg.model.checkpoint == "data/samples/checkpoint" and cfg.model.name == "tiny"
    assert cfg.output.path == "outputs/recommendations" and cfg.output.format == OutputFormat.long
    assert isinstance(cfg.engine, TorchEngineConfig) and cfg.engine.name == EngineName.torch
    assert cfg.output.exclude_seen and cfg.output.compression == Compression.zstd
    start, end = window(cfg.data)  # the sample's days 2026-11-13..2026-11-26 are all inside
    days = sorted(p.name for p in (REPO / "data/samples/events").glob("dt=*"))
    assert days and all(start <= dt.date.fromisoformat(d[3:]) < end for d in days)


def test_overrides_reach_the_dataclasses():
    """Every key option that --help lists."""
    cfg = job("data.num_shards=4", "output.top_k=20", "engine.batch_tokens=512", "engine.dtype=bfloat16",
              "output.format=nested", "data.columns.item_id=movie_id", "data.filter='category != 3'",
              "data.path=s3://b/logs", "data.run_date=2026-01-31", "data.lookback_days=7", "data.max_seq_len=256",
              "model.checkpoint=/ckpt", "engine=torch", "engine.device=cpu", "output.path=gs://b/recs",
              "output.exclude_seen=false", "output.compression=snappy", "output.storage_options={anon: true}")
    assert (cfg.data.num_shards, cfg.output.top_k, cfg.engine.batch_tokens) == (4, 20, 512)
    assert (cfg.data.path, cfg.data.run_date, cfg.data.lookback_days, cfg.data.max_seq_len) == \
        ("s3://b/logs", "2026-01-31", 7, 256)
    assert (cfg.model.checkpoint, cfg.engine.device, cfg.output.path) == ("/ckpt", "cpu", "gs://b/recs")
    assert not cfg.output.exclude_seen and cfg.output.compression == "snappy"
    assert cfg.output.storage_options == {"anon": True}
    assert cfg.output.format == "nested" and cfg.engine.dtype.value == "bfloat16"  # str-Enums compare to strings
    assert cfg.data.columns["item_id"] == "movie_id" and cfg.data.filter == "category != 3"


def test_free_form_mappings_accept_new_keys():
    cfg = job("data.storage_options={aws_endpoint_url: 'http://127.0.0.1:9000', aws_region: eu-west-1}",
              "output.storage_options={aws_region: eu-west-1}", "data.columns={item_id: movie, age_group: age}")
    assert cfg.data.storage_options == {"aws_endpoint_url": "http://127.0.0.1:9000", "aws_region": "eu-west-1"}
    assert cfg.data.columns["item_id"] == "movie" and cfg.data.columns["user_id"] == "user_id"
    assert cfg.output.storage_options == {"aws_region": "eu-west-1"}


def test_daily_preset_runs_as_of_today_and_needs_a_path():
    cfg = job("data=daily", "data.path=s3://bucket/logs")
    assert cfg.data.run_date == dt.date.today().isoformat() and cfg.data.num_shards == 16
    with pytest.raises(ConfigError, match="data.path"):
        job("data=daily")


def test_every_model_preset_composes():
    presets = sorted(p.stem for p in (REPO / "conf/model").glob("*.yaml"))
    assert "tiny" in presets
    for name in presets:
        cfg = job(f"model={name}", "model.checkpoint=/some/dir")
        assert cfg.model.name == name and cfg.model.arch["d_model"] > 0


def test_unknown_key_names_the_key():
    assert "nmu_shards" in compose_error("data.nmu_shards=3")
    with pytest.raises(ConfigError, match=r"output\.colour is not a configuration key.*top_k"):
        job("+output.colour=red")  # `+` bypasses the schema while composing; validation catches it


def test_bad_enum_lists_allowed_values():
    message = compose_error("output.format=wide")
    assert "wide" in message and "long" in message and "nested" in message
    assert "cpu" in compose_error("engine.device=tpu")


def test_bad_type_names_the_key():
    assert "num_shards" in compose_error("data.num_shards=abc")


@pytest.mark.parametrize("override, key", [
    ("data.num_shards=0", "data.num_shards"), ("output.top_k=0", "output.top_k"),
    ("data.lookback_days=0", "data.lookback_days"), ("data.run_date=2026-13-01", "data.run_date"),
    ("data.max_seq_len=1", "data.max_seq_len"), ("engine.batch_tokens=0", "engine.batch_tokens"),
    ("engine.memory_fraction=0", "engine.memory_fraction"), ("engine.memory_fraction=1.5", "engine.memory_fraction"),
    ("data.filter='category ==== 1'", "data.filter"),
])
def test_bad_range_names_key_and_allowed(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        job(override)
    assert "expected" in str(info.value) or "predicate" in str(info.value)


def test_missing_mandatory_value_is_a_config_error():
    with pytest.raises(ConfigError, match="model.checkpoint"):
        job("model=mtgr_small")  # presets other than tiny leave checkpoint as ???


def test_engine_vllm_without_vllm_installed_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed: `import vllm` fails
    for name in [m for m in sys.modules if m.startswith("batch.engines.vllm")]:
        monkeypatch.delitem(sys.modules, name)
    cfg = job("engine=vllm")
    with pytest.raises(ConfigError, match="engine=vllm needs vLLM .*use engine=torch"):
        build_engine(cfg.engine, checkpoint=None)


def test_run_dir_follows_mtgr_log_dir(monkeypatch):
    monkeypatch.setenv("MTGR_LOG_DIR", "/var/log/mtgr")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("/var/log/mtgr/")
    assert cfg.hydra.job.chdir is False


def test_resolved_config_round_trips():
    cfg = job("data.num_shards=2")
    plain = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    assert plain["data"]["num_shards"] == 2 and plain["engine"]["name"] == "torch"


# -- the real command line (a subprocess each: keep these few) ----------------------------------------------------

def test_cli_help_lists_groups_and_key_options():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for text in ("== Config groups ==", "engine: torch", "data.num_shards", "output.top_k", "hydra.run.dir",
                 "model.checkpoint"):
        assert text in out.stdout


def test_cli_unknown_key_fails_without_traceback():
    out = run_cli("data.nmu_shards=3")
    assert out.returncode != 0
    assert "nmu_shards" in out.stderr and "Traceback" not in out.stderr


def test_cli_bad_range_is_one_line(tmp_path):
    out = run_cli("output.top_k=0", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "output.top_k=0" in errors[0] and "Traceback" not in out.stderr
    assert "output.top_k=0" in (tmp_path / "run.log").read_text()  # hydra.run.dir took the override


@pytest.mark.parametrize("instances", ["0", "65"])
def test_vllm_instances_out_of_range_is_rejected(instances):
    with pytest.raises(ConfigError, match=r"engine\.instances=.*expected an integer in \[1, 64\]"):
        job("engine=vllm", f"engine.instances={instances}")
    assert job("engine=vllm_high_throughput", "engine.instances=4").engine.instances == 4
