"""Load the configured checkpoint and check it against the model preset it claims to be."""

from __future__ import annotations

import dataclasses

from batch.config import ModelConfig
from batch.errors import ConfigError, InputError
from batch.model import Checkpoint, CheckpointError, MTGRConfig, load_checkpoint

# Vocabulary sizes come from the training data, so presets carry placeholders for them.
DATA_DERIVED = ("num_items", "num_categories")


def open_checkpoint(cfg: ModelConfig) -> Checkpoint:
    """The checkpoint at ``model.checkpoint``; InputError if unreadable, if it disagrees with ``model.arch``."""
    try:
        ckpt = load_checkpoint(cfg.checkpoint)
    except CheckpointError as e:
        raise InputError(f"model.checkpoint: {e}") from None
    check_arch(cfg, ckpt.config)
    return ckpt


def check_arch(cfg: ModelConfig, config: MTGRConfig) -> None:
    """Every ``model.arch`` key (but the vocabulary sizes) must equal the checkpoint's config.json."""
    actual = dataclasses.asdict(config)
    for key, expected in cfg.arch.items():
        if key not in actual:
            raise ConfigError(f"model.arch.{key} is not an MTGR hyper-parameter: expected one of {sorted(actual)}")
        if key not in DATA_DERIVED and _plain(expected) != actual[key]:
            raise InputError(f"checkpoint {cfg.checkpoint!r} has {key}={actual[key]!r} but model preset "
                             f"{cfg.name!r} says model.arch.{key}={_plain(expected)!r}")


def _plain(value):
    """Lists of dicts as written in YAML compare equal to dataclasses.asdict output."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
