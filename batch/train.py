"""``python -m batch.train``: train an MTGR checkpoint on a behaviour log (next-item prediction).

Holds out each user's last event (the split ``batch.evaluate`` scores), trains on the rest with full or sampled
softmax and AdamW, seeded and deterministic on CPU, logs loss, events/s and ETA, evaluates at the end and writes a
checkpoint directory.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from enum import Enum

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from hydra.utils import to_absolute_path
from omegaconf import MISSING, OmegaConf

from batch.config import ModelConfig
from batch.dataset import build_item_vocab, encode, read_user_sequences
from batch.evaluate import evaluate
from batch.model import MTGR, MTGRConfig, TokenLayout, save_checkpoint

log = logging.getLogger("batch.train")


class Loss(str, Enum):
    full = "full"
    sampled = "sampled"


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING  # the model preset (conf/model): its arch is what gets trained
    data_path: str = "data/samples/events"
    columns: dict[str, str] = field(default_factory=dict)
    out: str = "data/samples/checkpoint"
    model_version: str = "mtgr-tiny-sample-v1"
    epochs: int = 24
    batch_tokens: int = 8192
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    loss: Loss = Loss.full
    num_negatives: int = 512
    seed: int = 0
    device: str = "auto"
    log_every: int = 20


def next_item_labels(tokens: np.ndarray, offsets: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """Label of each position: the next event's item index at action tokens, -1 elsewhere (and for OOV)."""
    labels = np.full(len(tokens), -1, dtype=np.int64)
    is_action = (tokens >= layout.action_offset) & (tokens < layout.item_offset)
    pos = np.flatnonzero(is_action)
    user_end = np.repeat(offsets[1:], np.diff(offsets))[pos]
    pos = pos[pos + 1 < user_end]
    nxt = tokens[pos + 1]
    ok = nxt >= layout.item_offset
    labels[pos[ok]] = nxt[ok] - layout.item_offset
    return labels


def token_batches(offsets: np.ndarray, budget: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled users packed greedily into batches of at most ``budget`` tokens (one user may exceed it alone)."""
    lengths = np.diff(offsets)
    batches, current, used = [], [], 0
    for u in rng.permutation(len(lengths)):
        if current and used + lengths[u] > budget:
            batches.append(np.array(current))
            current, used = [], 0
        current.append(u)
        used += lengths[u]
    if current:
        batches.append(np.array(current))
    return batches


def gather(tokens: np.ndarray, offsets: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and offsets of a subset of users, as one jagged batch."""
    parts = [np.arange(offsets[u], offsets[u + 1]) for u in users]
    lengths = np.array([len(p) for p in parts])
    return np.concatenate(parts), np.concatenate([[0], np.cumsum(lengths)])


def loss_fn(model: MTGR, hidden: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Next-item cross-entropy: full softmax over all items, or sampled softmax with uniform negatives."""
    if cfg.loss == Loss.full:
        return F.cross_entropy(model.item_logits(hidden), labels)
    items = model.embed.item.weight
    hidden = model.final_norm(hidden)  # as item_logits does
    negatives = torch.randint(0, items.shape[0], (cfg.num_negatives,), device=hidden.device)
    pos = (hidden * items[labels]).sum(-1, keepdim=True)
    neg = hidden @ items[negatives].t()
    neg = neg.masked_fill(negatives[None, :] == labels[:, None], float("-inf"))  # accidental hits
    return F.cross_entropy(torch.cat([pos, neg], 1), torch.zeros_like(labels))


def train(cfg: TrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    arch = MTGRConfig(**OmegaConf.to_container(cfg.model.arch, resolve=True))
    arch.model_version = cfg.model_version

    seqs = read_user_sequences(to_absolute_path(cfg.data_path), arch, dict(cfg.columns))
    history, _ = seqs.split_last()
    layout = TokenLayout(arch)
    vocab = build_item_vocab(history, layout)
    arch.num_items = len(vocab)
    arch.num_categories = int(max(vocab.categories.max(initial=0), 0)) + 1
    model = MTGR(arch).to(device)
    model.embed.item_category.copy_(torch.as_tensor(np.clip(vocab.categories + 1, 0, arch.num_categories)))
    tokens, offsets = encode(history, vocab, layout)
    labels = next_item_labels(tokens, offsets, layout)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training %s: %d users, %d events, %d items, %d parameters, device %s", cfg.model_version,
             len(history), int((labels >= 0).sum()), len(vocab), n_params, device)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(token_batches(offsets, cfg.batch_tokens, np.random.default_rng(0)))
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                              * 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    start, step, events_done = time.perf_counter(), 0, 0
    for epoch in range(cfg.epochs):
        model.train()
        for users in token_batches(offsets, cfg.batch_tokens, rng):
            tok, off = gather(tokens, offsets, users)
            lab = torch.as_tensor(labels[tok], device=device)
            hidden = model(torch.as_tensor(tokens[tok], device=device), torch.as_tensor(off, device=device))
            keep = lab >= 0
            loss = loss_fn(model, hidden[keep], lab[keep], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            events_done += int(keep.sum())
            if step % cfg.log_every == 0 or step == total:
                elapsed = time.perf_counter() - start
                log.info("epoch %d/%d step %d/%d loss %.4f  %.0f events/s  ETA %.0fs", epoch + 1, cfg.epochs, step,
                         total, loss.item(), events_done / elapsed, elapsed / step * (total - step))

    result = evaluate(model, vocab, seqs)
    out = to_absolute_path(cfg.out)
    digest = save_checkpoint(out, model.cpu(), vocab)
    log.info("wrote checkpoint %s (sha256 %s)", cfg.out, digest[:12])
    return result


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: TrainConfig) -> None:
    result = train(cfg)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
