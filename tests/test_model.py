"""MTGR model, token vocabulary and checkpoint tests (CPU)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from batch.model import (OOV_ITEM, MTGR, CheckpointError, EventArrays, ItemVocab, MTGRConfig, ProfileFeature,
                         TokenLayout, load_checkpoint, save_checkpoint)

CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "model")


def small_config(**kw) -> MTGRConfig:
    base = dict(d_model=32, num_layers=2, num_heads=2, max_seq_len=128, num_items=50, num_categories=5,
                feature_dim=8, profile_features=[ProfileFeature("age_group", 4)])
    base.update(kw)
    return MTGRConfig(**base)


def random_model(cfg: MTGRConfig, seed: int = 0) -> MTGR:
    torch.manual_seed(seed)
    model = MTGR(cfg)
    with torch.no_grad():  # non-trivial values everywhere, also where training would start at zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.embed.item_category.copy_(torch.randint(0, cfg.num_categories + 1, (cfg.num_items,)))
    return model.eval()


def random_events(layout: TokenLayout, lengths: list[int], seed: int = 0) -> tuple[EventArrays, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    cfg = layout.config
    events = EventArrays(
        item_tokens=rng.integers(layout.item_offset, layout.vocab_size, n),
        flags=rng.random((n, len(cfg.action_flags))) < 0.3,
        watch_percentage=np.where(rng.random(n) < 0.1, np.nan, rng.random(n)),
        watch_duration=rng.exponential(60.0, n),
        timestamp=np.cumsum(rng.integers(1, 10_000, n)),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )
    profile = rng.integers(-1, 6, (len(lengths), len(cfg.profile_features)))
    return events, profile


def scores_of(model: MTGR, tokens: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        off = torch.as_tensor(offsets)
        hidden = model(torch.as_tensor(tokens), off)
        return model.item_logits(hidden[model.last_positions(off)])


def test_layout_ranges_are_disjoint_and_items_last():
    lay = TokenLayout(small_config())
    assert 4 == lay.profile_offset < lay.action_offset < lay.item_offset < lay.vocab_size
    assert lay.vocab_size - lay.item_offset == 50
    assert lay.num_action_tokens == 8 * lay.pct_radix * lay.dur_radix * lay.gap_radix


def test_encode_layout_and_action_features_roundtrip():
    cfg = small_config()
    lay = TokenLayout(cfg)
    events, profile = random_events(lay, [3, 1, 4])
    tokens, offsets = lay.encode(events, profile)
    assert offsets.tolist() == [0, 1 + 6, 1 + 6 + 1 + 2, 1 + 6 + 3 + 1 + 8]
    for u in range(3):
        seq = tokens[offsets[u]:offsets[u + 1]]
        assert lay.profile_offset <= seq[0] < lay.action_offset
        items, actions = seq[1::2], seq[2::2]
        ev = slice(events.offsets[u], events.offsets[u + 1])
        assert items.tolist() == events.item_tokens[ev].tolist()
        code = actions - lay.action_offset
        gap = code % lay.gap_radix
        assert gap[0] == 0 and (gap[1:] > 0).all()  # first event has no previous event
        bits = code // (lay.gap_radix * lay.dur_radix * lay.pct_radix)
        expect = (events.flags[ev] * (1 << np.arange(3))).sum(1)
        assert bits.tolist() == expect.tolist()
        pct = code // (lay.gap_radix * lay.dur_radix) % lay.pct_radix
        assert ((pct == 0) == np.isnan(events.watch_percentage[ev])).all()


def test_profile_out_of_range_maps_to_unknown_slot():
    lay = TokenLayout(small_config())
    toks = lay.profile_tokens(np.array([[0], [3], [4], [-1]]))
    assert toks[:, 0].tolist() == [lay.profile_offset + 1, lay.profile_offset + 4, lay.profile_offset,
                                   lay.profile_offset]


def test_unknown_items_map_to_oov():
    vocab = ItemVocab(pa.array([10, 20, 30], pa.int64()), np.array([1, 2, 3]), item_offset=100)
    assert vocab.lookup([20, 99, None, 10]).tolist() == [101, OOV_ITEM, OOV_ITEM, 100]
    svocab = ItemVocab(pa.array(["a", "b"]), np.array([0, 0]), item_offset=7)
    assert svocab.lookup(pa.array(["b", "zz"])).tolist() == [8, OOV_ITEM]
    assert svocab.raw_ids(np.array([1, 0])).to_pylist() == ["b", "a"]


def test_user_scores_do_not_depend_on_batch():
    cfg = small_config()
    model = random_model(cfg)
    lay = TokenLayout(cfg)
    events, profile = random_events(lay, [5, 40, 1, 60])
    tokens, offsets = lay.encode(events, profile)
    together = scores_of(model, tokens, offsets)
    for u in range(4):
        alone = scores_of(model, tokens[offsets[u]:offsets[u + 1]], np.array([0, offsets[u + 1] - offsets[u]]))
        torch.testing.assert_close(alone[0], together[u], rtol=0, atol=1e-5)


def test_scores_at_t_do_not_change_when_events_are_appended():
    cfg = small_config()
    model = random_model(cfg, seed=1)
    lay = TokenLayout(cfg)
    events, profile = random_events(lay, [30])
    tokens, _ = lay.encode(events, profile)
    with torch.no_grad():
        full = model(torch.as_tensor(tokens), torch.tensor([0, len(tokens)]))
        for t in (1, 2, 11, 30):  # the action token of the t-th event sits at index 2 * t
            prefix = model(torch.as_tensor(tokens[:2 * t + 1]), torch.tensor([0, 2 * t + 1]))
            torch.testing.assert_close(model.item_logits(prefix[-1:]), model.item_logits(full[2 * t:2 * t + 1]),
                                       rtol=0, atol=1e-5)


def test_inference_table_matches_feature_path():
    cfg = small_config()
    model = random_model(cfg)
    tokens = torch.arange(TokenLayout(cfg).vocab_size)
    direct, _ = model.embed(tokens)
    for chunk in (len(tokens), 7):  # in one piece, and in chunks that do not divide the vocabulary
        model.embed.build_table(chunk)
        cached, _ = model.embed(tokens)
        torch.testing.assert_close(direct, cached)


def make_checkpoint(path: str, cfg: MTGRConfig | None = None) -> MTGR:
    cfg = cfg or small_config()
    model = random_model(cfg)
    vocab = ItemVocab(pa.array(np.arange(1000, 1000 + cfg.num_items), pa.int64()),
                      model.embed.item_category.numpy() - 1, TokenLayout(cfg).item_offset)
    save_checkpoint(path, model, vocab)
    return model


def test_checkpoint_roundtrip_gives_identical_scores(tmp_path):
    model = make_checkpoint(str(tmp_path / "ck"))
    ckpt = load_checkpoint(str(tmp_path / "ck"))
    lay = TokenLayout(model.config)
    tokens, offsets = lay.encode(*random_events(lay, [7, 20]))
    torch.testing.assert_close(scores_of(ckpt.model, tokens, offsets), scores_of(model, tokens, offsets),
                               rtol=0, atol=0)
    assert len(ckpt.content_hash) == 64 and ckpt.identity.startswith(model.config.model_version + "@")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "mtgr" and config["architectures"] == ["MTGRForItemScoring"]
    assert config["vocab_size"] == lay.vocab_size and config["format_version"] == 1
    assert ckpt.items.lookup([1000, 5])[0] == lay.item_offset


def test_checkpoint_loads_every_tensor_from_its_file_in_the_models_dtype_and_leaves_the_table_to_engines(tmp_path):
    model = make_checkpoint(str(tmp_path / "ck"))
    save_checkpoint(str(tmp_path / "bf16"), copy.deepcopy(model).to(torch.bfloat16),
                    load_checkpoint(str(tmp_path / "ck")).items)
    for name, expected in (("ck", model), ("bf16", copy.deepcopy(model).to(torch.bfloat16).float())):
        loaded = load_checkpoint(str(tmp_path / name)).model
        assert loaded.embed.table is None and not loaded.training
        want = dict([*expected.named_parameters(), *expected.named_buffers()])
        got = dict([*loaded.named_parameters(), *loaded.named_buffers()])
        assert got.keys() == want.keys()  # the non-persistent buffers (relative-position buckets) too
        for key, tensor in got.items():
            assert tensor.device.type == "cpu" and tensor.dtype == want[key].dtype, key
            torch.testing.assert_close(tensor, want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("breakage, message", [
    ("missing_dir", "does not exist"),
    ("missing_weights", "missing model.safetensors"),
    ("missing_items", "missing items.parquet"),
    ("format_version", "format_version 99 is not supported"),
    ("model_type", "model_type is 'llama'"),
    ("shape", "has shape"),
    ("bad_json", "not valid JSON"),
])
def test_bad_checkpoints_fail_with_a_message_naming_the_problem(tmp_path, breakage, message):
    path = tmp_path / "ck"
    make_checkpoint(str(path))
    cfg_file = path / "config.json"
    raw = json.loads(cfg_file.read_text())
    if breakage == "missing_dir":
        shutil.rmtree(path)
    elif breakage == "missing_weights":
        os.remove(path / "model.safetensors")
    elif breakage == "missing_items":
        os.remove(path / "items.parquet")
    elif breakage in ("format_version", "model_type"):
        raw.update(format_version=99) if breakage == "format_version" else raw.update(model_type="llama")
        cfg_file.write_text(json.dumps(raw))
    elif breakage == "shape":
        raw.update(d_model=48, hidden_size=48)
        cfg_file.write_text(json.dumps(raw))
    elif breakage == "bad_json":
        cfg_file.write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(str(path))


@pytest.mark.parametrize("preset", ["tiny", "mtgr_small", "mtgr_medium", "mtgr_large", "seed_high", "seed_light",
                                    "dlrmv3"])
def test_presets_state_their_real_parameter_count(preset):
    path = os.path.join(CONF, f"{preset}.yaml")
    text = open(path).read()
    stated = re.search(r"# parameters: ([\d,]+) in all, ([\d,]+) besides", text)
    cfg = MTGRConfig(**yaml.safe_load(text)["arch"])
    with torch.device("meta"):
        model = MTGR(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert int(stated.group(1).replace(",", "")) == total
    assert int(stated.group(2).replace(",", "")) == total - model.embed.item.weight.numel()


def test_seed_presets_have_the_seed_vocab_size():
    for preset, vocab in (("seed_high", 50000), ("seed_light", 30000)):
        arch = yaml.safe_load(open(os.path.join(CONF, f"{preset}.yaml")))["arch"]
        assert TokenLayout(MTGRConfig(**arch)).vocab_size == vocab
