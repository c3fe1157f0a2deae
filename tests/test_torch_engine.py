"""The PyTorch engine: token-budget packing, exact seen-item exclusion, deterministic top-K."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from batch.config import Device, DType, TorchEngineConfig
from batch.engines.base import TopK, UserBatch, recommendations_table
from batch.engines.torch_engine import TorchEngine, deterministic_topk, pack_by_tokens, resolve_device
from batch.errors import ConfigError
from batch.events import normalize
from batch.model import load_checkpoint
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


def test_pack_by_tokens_respects_the_budget_and_covers_everyone():
    lengths = np.array([5, 5, 5, 12, 1, 1, 3])
    assert pack_by_tokens(lengths, 10) == [(0, 2), (2, 3), (3, 4), (4, 7)]  # 12 > budget: a batch of its own
    assert pack_by_tokens(lengths, 1000) == [(0, 7)] and pack_by_tokens(np.array([], int), 10) == []


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
