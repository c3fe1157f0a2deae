"""vLLM plugin (entry point group ``vllm.general_plugins``): vLLM calls :func:`register` in every process."""

from __future__ import annotations

from batch.model.config import ARCHITECTURE, MODEL_TYPE

MODEL_CLASS = "batch.engines.vllm.model:MTGRForItemScoring"
BACKEND_CLASS = "batch.engines.vllm.attention.HSTUAttentionBackend"


def register() -> None:
    """Register the ``mtgr`` config, the model class and the paged HSTU backend; safe to call repeatedly."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from . import compat
    from .hf_config import MTGRHFConfig

    AutoConfig.register(MODEL_TYPE, MTGRHFConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)  # lazy: no torch/CUDA work at import
    compat.register_attention_backend(BACKEND_CLASS)
