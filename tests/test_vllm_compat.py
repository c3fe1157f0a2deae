"""batch/engines/vllm/compat.py and the plugin: the vLLM version differences, on the installed vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from batch.engines.vllm import compat  # noqa: E402
from batch.engines.vllm.plugin import BACKEND_CLASS, register  # noqa: E402


def test_backend_name_follows_the_registry_api(monkeypatch):
    assert compat.backend_name() == (compat.BACKEND_NAME if compat.supports_named_backends() else "CUSTOM")
    monkeypatch.setattr(compat, "supports_named_backends", lambda: False)  # vLLM 0.26: CUSTOM only
    assert compat.backend_name() == "CUSTOM"


def test_register_is_reentrant_and_resolves_our_classes():
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register()
    register()  # vLLM calls it in every process, sometimes twice in one
    assert "MTGRForItemScoring" in ModelRegistry.get_supported_archs()
    assert AutoConfig.for_model("mtgr").model_type == "mtgr"
    member = AttentionBackendEnum[compat.backend_name()]
    assert member.get_path() == BACKEND_CLASS
    from batch.engines.vllm.attention import HSTUAttentionBackend

    assert HSTUAttentionBackend.get_name() == compat.backend_name()
    # Model Runner V2 asks the backend for the cache shape: K and V side by side per head.
    assert HSTUAttentionBackend.get_kv_cache_shape(7, 16, 2, 32) == (7, 2, 16, 64)


def test_layer_kv_cache_accepts_a_tensor_or_a_list():
    kv = torch.zeros(2, 1, 4, 8)
    assert compat.layer_kv_cache(SimpleNamespace(kv_cache=kv)) is kv
    assert compat.layer_kv_cache(SimpleNamespace(kv_cache=[kv])) is kv


def test_shutdown_uses_the_engine_core_client():
    calls = []
    llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: calls.append(1))))
    compat.shutdown(llm)
    compat.shutdown(SimpleNamespace())  # nothing to stop
    assert calls == [1]
