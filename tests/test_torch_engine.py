"""The PyTorch engine: token-budget packing, exact seen-item exclusion, deterministic top-K."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from batch.config import Device, DType, TorchEngineConfig
from batch.engines.base import TopK, UserBatch, recommendations_table
from batch.engines import torch_engine as torch_engine_module
from batch.engines.torch_engine import (RESERVE_BYTES, TorchEngine, candidate_topk, deterministic_topk, free_memory,
                                        mask_seen_items, pack_batches, resolve_device)
from batch.errors import ConfigError
from batch.events import normalize
from batch.model import load_checkpoint
from batch.model.memory import BatchMemory, scoring_batch_memory
from batch.sequences import SequenceBuilder

from conftest import NUM_ITEMS, make_events


@pytest.fixture(scope="module")
def seqs(checkpoint, schema):
    frame = make_events(num_users=12, seed=5)
    return SequenceBuilder(checkpoint, schema).build(normalize(frame.lazy(), schema).collect())


def engine(checkpoint, batch_tokens=4096) -> TorchEngine:
    return TorchEngine(TorchEngineConfig(device=Device.cpu, batch_tokens=batch_tokens), checkpoint)


def reference_scores(checkpoint, batch: UserBatch) -> np.ndarray:
    """Each user alone through the model (no packing at all)."""
    model = checkpoint.model
    rows = []
    with torch.inference_mode():
        for b in range(len(batch)):
            one = batch.select(slice(b, b + 1))
            tokens, offsets = torch.from_numpy(one.tokens), torch.from_numpy(one.offsets)
            rows.append(model.item_logits(model(tokens, offsets)[model.last_positions(offsets)])[0].numpy())
    return np.stack(rows)


def test_pack_batches_respects_the_budget_and_covers_everyone():
    lengths = np.array([5, 5, 5, 12, 1, 1, 3])
    assert pack_batches(lengths, 10) == [(0, 2), (2, 3), (3, 4), (4, 7)]  # 12 > budget: a batch of its own
    assert pack_batches(lengths, 1000) == [(0, 7)] and pack_batches(np.array([], int), 10) == []


def test_pack_batches_respects_the_memory_estimate_too():
    lengths = np.array([5, 5, 5, 12, 1, 1, 3])
    cost = BatchMemory(per_token=10, per_user=100)  # two users of 1 token fit 250 bytes, two of 5 do not
    assert pack_batches(lengths, 1000, cost, 250) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6), (6, 7)]
    assert pack_batches(lengths, 10, cost, 10**9) == pack_batches(lengths, 10)  # a loose bound changes nothing
    assert pack_batches(lengths, 1000, cost, None) == [(0, 7)]  # free memory unknown: tokens only


def test_the_memory_estimate_grows_with_items_width_and_precision(tiny_checkpoint):
    cfg = load_checkpoint(str(tiny_checkpoint)).config
    fp32, bf16 = scoring_batch_memory(cfg, 4), scoring_batch_memory(cfg, 2)
    assert fp32.per_token == 2 * bf16.per_token - 5 * 8 - 1 and fp32.per_user > bf16.per_user
    wide = scoring_batch_memory(type(cfg)(**{**cfg.__dict__, "num_items": 10 * cfg.num_items}), 2)
    assert wide.per_user - bf16.per_user == 2 * 2 * 9 * cfg.num_items  # logits + top-K scratch, per extra item
    assert bf16.bytes(100, 3) == 100 * bf16.per_token + 3 * bf16.per_user


def test_free_memory_is_known_on_linux_cpu():
    free = free_memory(torch.device("cpu"))
    assert free is None or 0 < free < 1 << 50


def test_free_memory_on_cpu_respects_a_cgroup_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_engine_module, "CGROUP_DIR", str(tmp_path))
    (tmp_path / "memory.max").write_text("3000000\n")
    (tmp_path / "memory.current").write_text("1000000\n")
    assert free_memory(torch.device("cpu")) == 2_000_000  # the container's 2 MB, not the host's MemAvailable
    (tmp_path / "memory.max").write_text("max\n")  # no limit: MemAvailable as before
    monkeypatch.setattr(torch_engine_module, "CGROUP_DIR", str(tmp_path / "none"))
    without = free_memory(torch.device("cpu"))
    monkeypatch.setattr(torch_engine_module, "CGROUP_DIR", str(tmp_path))
    assert abs(free_memory(torch.device("cpu")) - without) < 1 << 28  # both MemAvailable, read moments apart


def test_batch_budget_is_the_fraction_of_free_memory_after_the_reserve(checkpoint, monkeypatch):
    eng = engine(checkpoint)
    monkeypatch.setattr(torch_engine_module, "free_memory", lambda device: RESERVE_BYTES + 3000)
    assert eng.memory_fraction == 0.5 and eng.batch_budget() == 1500 and eng.batch_budget(reserved=1000) == 1000
    monkeypatch.setattr(torch_engine_module, "free_memory", lambda device: 10)
    assert eng.batch_budget() == 0  # never negative
    monkeypatch.setattr(torch_engine_module, "free_memory", lambda device: None)
    assert eng.batch_budget() is None


def test_a_small_memory_budget_cuts_batches_by_users_without_changing_results(checkpoint, seqs, monkeypatch):
    want = engine(checkpoint, batch_tokens=100_000).score(seqs.batch, 10, True)
    eng = engine(checkpoint, batch_tokens=100_000)
    cost = eng.batch_memory
    lengths = seqs.batch.lengths
    budget = cost.bytes(2 * int(lengths.max()), 2)  # room for two of the longest users: 12 users need 3+ batches
    cuts = []
    real = torch_engine_module.pack_batches
    monkeypatch.setattr(TorchEngine, "batch_budget", lambda self, reserved=0: budget)
    monkeypatch.setattr(torch_engine_module, "pack_batches", lambda *a: cuts.append(real(*a)) or cuts[-1])
    got = eng.score(seqs.batch, 10, True)
    assert len(cuts) == 1 and len(cuts[0]) >= 3 and cuts[0][0][0] == 0 and cuts[0][-1][1] == len(lengths)
    assert all(cost.bytes(int(lengths[a:b].sum()), b - a) <= budget for a, b in cuts[0])
    assert all(cost.bytes(int(lengths[a:b + 1].sum()), b + 1 - a) > budget for a, b in cuts[0][:-1])  # full
    assert np.array_equal(got.items, want.items)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_an_engine_that_cannot_fit_one_user_fails_at_start(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch_engine_module, "free_memory", lambda device: RESERVE_BYTES + 1000)
    with pytest.raises(ConfigError, match=r"engine\.memory_fraction=0\.5 .*one user of max_seq_len"):
        TorchEngine(TorchEngineConfig(device=Device.cpu), load_checkpoint(str(tiny_checkpoint)))


def test_deterministic_topk_breaks_ties_by_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    values, index = deterministic_topk(logits, 3)
    assert index.tolist() == [[1, 2, 4], [0, 1, 2]] and values[0].tolist() == [3.0, 3.0, 3.0]
    rng = torch.Generator().manual_seed(0)
    many = torch.randint(0, 4, (50, 30), generator=rng).float()  # lots of ties everywhere
    values, index = deterministic_topk(many, 7)
    full = torch.sort(many, dim=1, descending=True, stable=True)
    assert torch.equal(index, full.indices[:, :7]) and torch.equal(values, full.values[:, :7])


def test_scores_match_the_model_user_by_user(checkpoint, seqs):
    k = 5
    top = engine(checkpoint).score(seqs.batch, k, exclude_seen=False)
    ref = torch.from_numpy(reference_scores(checkpoint, seqs.batch))
    values, index = deterministic_topk(ref, k)
    assert np.array_equal(top.items, index.numpy())
    np.testing.assert_allclose(top.scores, values.numpy(), rtol=1e-5, atol=1e-5)


def test_seen_items_are_excluded_exactly_for_histories_longer_than_k(checkpoint, seqs):
    k = 8
    top = engine(checkpoint).score(seqs.batch, k, exclude_seen=True)
    ref = reference_scores(checkpoint, seqs.batch)
    layout = checkpoint.layout
    long_histories = 0
    for b in range(len(seqs.batch)):
        tokens = seqs.batch.tokens[seqs.batch.offsets[b]: seqs.batch.offsets[b + 1]]
        seen = np.unique(tokens[tokens >= layout.item_offset] - layout.item_offset)
        long_histories += len(seen) > k
        assert not set(top.items[b].tolist()) & set(seen.tolist())
        masked = ref[b].copy()
        masked[seen] = -np.inf
        expected = np.lexsort((np.arange(NUM_ITEMS), -masked))[:k]  # score desc, then item index asc
        assert top.items[b].tolist() == expected.tolist()
    assert long_histories >= 3


def test_result_does_not_depend_on_the_token_budget(checkpoint, seqs):
    results = [engine(checkpoint, budget).score(seqs.batch, 10, True) for budget in (1, 40, 100_000)]
    for other in results[1:]:
        assert np.array_equal(other.items, results[0].items)
        np.testing.assert_allclose(other.scores, results[0].scores, rtol=1e-5, atol=1e-5)


def test_fewer_eligible_items_than_k_leaves_empty_slots(checkpoint, seqs):
    top = engine(checkpoint).score(seqs.batch, NUM_ITEMS + 5, exclude_seen=True)
    assert (top.items[:, NUM_ITEMS:] == -1).all() and np.isneginf(top.scores[:, NUM_ITEMS:]).all()
    table = recommendations_table(seqs.batch.user_ids, top, checkpoint.items.item_ids)
    per_user = table.group_by("user_id").aggregate([("rank", "count")]).column("rank_count").to_pylist()
    seen = [len(np.unique(seqs.batch.tokens[seqs.batch.offsets[b]:seqs.batch.offsets[b + 1]]
                          [seqs.batch.tokens[seqs.batch.offsets[b]:seqs.batch.offsets[b + 1]]
                           >= checkpoint.layout.item_offset])) for b in range(len(seqs.batch))]
    assert sorted(per_user) == sorted(NUM_ITEMS - s for s in seen)


def test_recommendations_table_has_the_writer_columns(checkpoint):
    top = TopK(items=np.array([[3, 1, -1]]), scores=np.array([[2.5, 1.0, -np.inf]], dtype=np.float32))
    table = recommendations_table(pa.array(["u1"]), top, checkpoint.items.item_ids)
    assert table.schema.names == ["user_id", "rank", "item_id", "score"]
    assert table.column("rank").type == pa.int16() and table.column("score").type == pa.float32()
    assert table.to_pylist() == [{"user_id": "u1", "rank": 1, "item_id": 1003, "score": 2.5},
                                 {"user_id": "u1", "rank": 2, "item_id": 1001, "score": 1.0}]


def test_cuda_without_a_gpu_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="engine.device=cuda"):
        resolve_device(Device.cuda)
    assert resolve_device(Device.auto).type == "cpu"


@pytest.mark.parametrize("dtype", [DType.bfloat16, DType.float16])
def test_half_precision_runs_and_still_excludes_seen_items(tiny_checkpoint, seqs, dtype):
    fresh = load_checkpoint(str(tiny_checkpoint))  # the engine casts the model it is given
    top = TorchEngine(TorchEngineConfig(device=Device.cpu, dtype=dtype), fresh).score(seqs.batch, 5, True)
    assert fresh.model.embed.item.weight.dtype == getattr(torch, dtype.value)
    assert np.isfinite(top.scores).all() and (top.items >= 0).all()
    for b in range(len(seqs.batch)):
        tokens = seqs.batch.tokens[seqs.batch.offsets[b]: seqs.batch.offsets[b + 1]]
        assert not set(top.items[b].tolist()) & set((tokens - fresh.layout.item_offset).tolist())


# --- the engine keeps its results on the device until the end of a shard; they must not change by a single bit ---


def legacy_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's former top-k (float32 logits, full stable sort of every row tied at the k-th score)."""
    values, index = torch.topk(logits, k, dim=1)
    order = index.argsort(dim=1)
    index, values = index.gather(1, order), values.gather(1, order)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    index, values = index.gather(1, order), values.gather(1, order)
    tied = (logits >= values[:, -1:]).sum(dim=1) > k
    if tied.any():
        full = torch.sort(logits[tied], dim=1, descending=True, stable=True)
        values[tied], index[tied] = full.values[:, :k], full.indices[:, :k]
    return values, index


def legacy_score(eng: TorchEngine, batch: UserBatch, top_k: int, exclude_seen: bool) -> TopK:
    """The engine's former loop: a host copy in and out per batch, boolean-indexed mask, float32 top-k."""
    model, k = eng.model, min(top_k, eng.num_items)
    items = np.full((len(batch), top_k), -1, dtype=np.int64)
    scores = np.full((len(batch), top_k), -np.inf, dtype=np.float32)
    with torch.inference_mode():
        for start, stop in pack_batches(batch.lengths, eng.batch_tokens):
            sub = batch.select(slice(start, stop))
            tokens, offsets = torch.from_numpy(sub.tokens), torch.from_numpy(sub.offsets)
            # the same forward as the engine (last rows only): this test is about the top-K and masking loop
            logits = model.item_logits(model(tokens, offsets, last_only=True)).float()
            if exclude_seen:
                user = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())
                is_item = tokens >= eng.item_offset
                logits[user[is_item], tokens[is_item] - eng.item_offset] = float("-inf")
            values, index = legacy_topk(logits, k)
            items[start:stop, :k], scores[start:stop, :k] = index.numpy(), values.numpy()
    items[~np.isfinite(scores)] = -1
    scores[items < 0] = -np.inf
    return TopK(items, scores)


def assert_identical(got: TopK, want: TopK) -> None:
    assert np.array_equal(got.items, want.items)
    assert got.scores.dtype == np.float32 and np.array_equal(got.scores.view(np.int32), want.scores.view(np.int32))


def prototype_checkpoint(tiny_checkpoint, dtype: DType, groups: int = 3):
    """Item embeddings that repeat ``groups`` distinct rows (item i has row i % groups): scores tie massively."""
    ckpt = load_checkpoint(str(tiny_checkpoint))
    with torch.no_grad():
        weight = ckpt.model.embed.item.weight
        weight.copy_(weight[torch.arange(len(weight)) % groups])
    return ckpt


@pytest.mark.parametrize("dtype", [DType.float32, DType.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_results_are_bit_identical_to_the_former_engine(tiny_checkpoint, seqs, dtype, ties):
    ckpt = prototype_checkpoint(tiny_checkpoint, dtype) if ties else load_checkpoint(str(tiny_checkpoint))
    eng = TorchEngine(TorchEngineConfig(device=Device.cpu, dtype=dtype), ckpt)
    for budget in (1, 40, 100_000):
        eng.batch_tokens = budget
        for exclude_seen in (False, True):
            for top_k in (1, 5, 20):
                want = legacy_score(eng, seqs.batch, top_k, exclude_seen)
                for slack in (None, 0, 1, 3):  # 0: every row takes the deferred full sort
                    eng.tie_slack = slack
                    assert_identical(eng.score(seqs.batch, top_k, exclude_seen), want)


def test_deliberate_ties_go_to_lower_item_indices(tiny_checkpoint, seqs):
    ckpt = prototype_checkpoint(tiny_checkpoint, DType.float32)
    eng = TorchEngine(TorchEngineConfig(device=Device.cpu, batch_tokens=40), ckpt)
    ref = reference_scores(ckpt, seqs.batch)
    groups = ref[:, :3]  # item i scores exactly as item i % 3
    assert np.array_equal(ref, groups[:, np.arange(NUM_ITEMS) % 3])
    k = 10
    for slack in (None, 0, 2, 30):
        eng.tie_slack = slack
        top = eng.score(seqs.batch, k, exclude_seen=False)
        for b in range(len(seqs.batch)):
            best = int(np.argmax(groups[b]))  # a group of 22 items: the k slots are its 10 lowest indices
            assert top.items[b].tolist() == list(range(best, best + 3 * k, 3))
            assert (top.scores[b] == top.scores[b, 0]).all()


def test_one_copy_to_the_host_per_shard_without_ties(checkpoint, seqs, monkeypatch):
    eng = engine(checkpoint, batch_tokens=40)
    assert len(pack_batches(seqs.batch.lengths, 40)) > 3
    calls = []
    real = TorchEngine._to_host
    monkeypatch.setattr(TorchEngine, "_to_host", lambda self, *t: calls.append(len(t)) or real(self, *t))
    eng.score(seqs.batch, 5, exclude_seen=True)
    assert calls == [3]  # scores, items and the exact flags of every batch, together


def test_empty_batch_and_zero_k(checkpoint, seqs):
    empty = seqs.batch.select(slice(0, 0))
    top = engine(checkpoint).score(empty, 5, True)
    assert top.items.shape == (0, 5) and top.scores.shape == (0, 5)
    top = engine(checkpoint).score(seqs.batch, 0, True)
    assert top.items.shape == (len(seqs.batch), 0)


def test_candidate_topk_flags_rows_whose_tie_may_run_past_the_candidates():
    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0, 0.0],  # tie of 3 at the 3rd score
                           [5.0, 4.0, 3.0, 2.0, 2.0, 1.0, 0.0, 0.0],  # no tie at the 3rd score
                           [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])  # one tie over the whole row
    full = torch.sort(logits, dim=1, descending=True, stable=True)
    # exact needs a candidate below the k-th score: the tie of 3 at row 0 fits 5 candidates but only 6 prove it
    for slack, want in [(0, [False, False, False]), (1, [False, True, False]), (2, [False, True, False]),
                        (3, [True, True, False]), (5, [True, True, True])]:  # slack 5: all 8 are candidates
        values, index, exact = candidate_topk(logits, 3, slack)
        assert exact.tolist() == want
        rows = torch.tensor(want)
        assert torch.equal(index[rows], full.indices[rows, :3]) and torch.equal(values[rows], full.values[rows, :3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_top_k_in_half_precision_selects_as_on_a_float32_copy(dtype):
    rng = torch.Generator().manual_seed(1)
    logits = (torch.randn(40, 500, generator=rng) * 3).to(dtype)  # coarse values: many ties
    logits[:5, 100:] = float("-inf")
    for k in (1, 7, 60, 450):
        half_values, half_index = deterministic_topk(logits, k, slack=4)
        values, index = legacy_topk(logits.float(), k)
        assert torch.equal(half_index, index) and torch.equal(half_values.float(), values)


def test_deterministic_topk_is_exact_for_any_slack():
    rng = torch.Generator().manual_seed(0)
    many = torch.randint(0, 4, (50, 30), generator=rng).float()
    full = torch.sort(many, dim=1, descending=True, stable=True)
    for slack in (0, 1, 2, 5, 100):
        values, index = deterministic_topk(many, 7, slack)
        assert torch.equal(index, full.indices[:, :7]) and torch.equal(values, full.values[:, :7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mask_seen_items_sets_exactly_the_seen_cells_and_keeps_every_other_bit(dtype):
    item_offset, num_items = 10, 12
    tokens = torch.tensor([3, 10, 15, 15, 1,  # user 0: items 0, 5 (twice)
                           2, 4,  # user 1: no items
                           21, 10, 21])  # user 3 (user 2 is empty): items 11, 0
    offsets = torch.tensor([0, 5, 7, 7, 10])
    rng = torch.Generator().manual_seed(2)
    logits = torch.randn(4, num_items, generator=rng).to(dtype)
    logits[0, 1], logits[1, 0], logits[3, 3], logits[3, 0] = -0.0, float("inf"), -0.0, float("inf")
    want = logits.clone()
    for b, seen in enumerate([[0, 5], [], [], [11, 0]]):
        want[b, seen] = float("-inf")
    mask_seen_items(logits, tokens, offsets, item_offset)
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(logits.view(bits), want.view(bits))
