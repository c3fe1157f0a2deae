"""Scoring engines behind one interface (:class:`Engine`); pick one with ``engine=torch|vllm``."""

from __future__ import annotations

from batch.config import EngineConfig, EngineName
from batch.engines.base import Engine, TopK, UserBatch
from batch.errors import ConfigError
from batch.model import Checkpoint

__all__ = ["Engine", "TopK", "UserBatch", "build_engine"]


def build_engine(cfg: EngineConfig, checkpoint: Checkpoint) -> Engine:
    """The engine named by ``cfg.name``, loaded with ``checkpoint``'s model (vLLM is imported only here, lazily)."""
    if cfg.name == EngineName.torch:
        from batch.engines.torch_engine import TorchEngine

        return TorchEngine(cfg, checkpoint)
    if cfg.name == EngineName.vllm:
        try:
            from batch.engines.vllm.engine import build_vllm_engine
        except ModuleNotFoundError as e:
            raise ConfigError(f"engine=vllm needs vLLM ({e}): install the cpu or gpu extra "
                              "(see README), or use engine=torch") from None
        return build_vllm_engine(cfg, checkpoint.path, checkpoint.config)
    raise ConfigError(f"engine.name={cfg.name!r} is invalid: expected one of {[n.value for n in EngineName]}")
