"""``python -m batch.evaluate``: leave-last-event-out ranking quality of a checkpoint vs popularity.

Protocol: for every user with at least two events (time order), the model reads all events but the last and ranks
every item in the checkpoint's vocabulary, excluding the user's earlier items; the held-out last item's rank gives
HR@10, NDCG@10, HR@50, NDCG@50 and MRR. A held-out item that cannot be ranked (unknown to the vocabulary, or one of
the user's earlier items) counts as a miss. The popularity baseline ranks items by their count in the histories,
on the same split with the same exclusions. Ends by printing one JSON line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore

from batch.dataset import UserSequences, encode, item_index, read_user_sequences
from batch.model import MTGR, ItemVocab, load_checkpoint

log = logging.getLogger("batch.evaluate")
CUTOFFS = (10, 50)


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    """HR@k, NDCG@k and MRR of 1-based ranks (0 = the target could not be ranked: a miss)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks > 0
    out: dict[str, float] = {}
    for k in CUTOFFS:
        within = hit & (ranks <= k)
        out[f"hr@{k}"] = float(within.mean())
        out[f"ndcg@{k}"] = float(np.where(within, 1.0 / np.log2(np.maximum(ranks, 1.0) + 1.0), 0.0).mean())
    out["mrr"] = float(np.where(hit, 1.0 / np.maximum(ranks, 1.0), 0.0).mean())
    return out


def target_ranks(scores: torch.Tensor, seen: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """Rank of each target among items not seen by that user (1 = best; 0 = target unrankable)."""
    scores = scores.clone()
    ranks = np.zeros(len(targets), dtype=np.int64)
    for u, (s, t) in enumerate(zip(seen, targets)):
        scores[u, torch.as_tensor(s, dtype=torch.long)] = float("-inf")
        if t >= 0 and t not in set(s.tolist()):
            ranks[u] = int((scores[u] > scores[u, t]).sum()) + 1
    return ranks


@torch.no_grad()
def model_ranks(model: MTGR, vocab: ItemVocab, history: UserSequences, targets: np.ndarray,
                batch_users: int = 256) -> np.ndarray:
    """Target ranks under the model for every user of ``history``."""
    model.eval()
    layout = model.embed.layout
    tokens, offsets = encode(history, vocab, layout)
    device = next(model.parameters()).device
    ranks = []
    for start in range(0, len(offsets) - 1, batch_users):
        end = min(start + batch_users, len(offsets) - 1)
        tok = torch.as_tensor(tokens[offsets[start]:offsets[end]], device=device)
        off = torch.as_tensor(offsets[start:end + 1] - offsets[start], device=device)
        hidden = model(tok, off)
        scores = model.item_logits(hidden[model.last_positions(off)]).float().cpu()
        seen = [_seen_items(tokens[offsets[u]:offsets[u + 1]], layout.item_offset) for u in range(start, end)]
        ranks.append(target_ranks(scores, seen, targets[start:end]))
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def popularity_ranks(vocab: ItemVocab, history: UserSequences, targets: np.ndarray) -> np.ndarray:
    """Target ranks under item popularity (count in the histories), same exclusions as the model."""
    flat = item_index(vocab, history.frame["item_id"].explode())
    counts = np.bincount(flat[flat >= 0], minlength=len(vocab)).astype(np.float64)
    # Break popularity ties by item index so the baseline is deterministic.
    pop = torch.as_tensor(counts - np.arange(len(vocab)) * 1e-9)
    lengths = history.frame["item_id"].list.len().to_numpy()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seen = [flat[bounds[u]:bounds[u + 1]] for u in range(len(lengths))]
    seen = [s[s >= 0] for s in seen]
    return target_ranks(pop.expand(len(targets), -1), seen, targets)


def _seen_items(user_tokens: np.ndarray, item_offset: int) -> np.ndarray:
    return user_tokens[user_tokens >= item_offset] - item_offset


def evaluate(model: MTGR, vocab: ItemVocab, seqs: UserSequences) -> dict:
    """Leave-last-event-out metrics of ``model`` and of popularity on ``seqs``."""
    history, last = seqs.split_last()
    targets = item_index(vocab, last)
    return {"model": rank_metrics(model_ranks(model, vocab, history, targets)),
            "popularity": rank_metrics(popularity_ranks(vocab, history, targets)),
            "users": len(targets)}


@dataclass
class EvaluateConfig:
    checkpoint: str = "data/samples/checkpoint"
    data_path: str = "data/samples/events"
    columns: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"


@hydra.main(version_base="1.3", config_path=None, config_name="evaluate")
def main(cfg: EvaluateConfig) -> None:
    ckpt = load_checkpoint(cfg.checkpoint, cfg.device)
    ckpt.model.embed.build_table()
    seqs = read_user_sequences(cfg.data_path, ckpt.config, dict(cfg.columns))
    result = evaluate(ckpt.model, ckpt.items, seqs)
    log.info("evaluated %s on %d users", ckpt.identity, result["users"])
    print(json.dumps(result, sort_keys=True))


ConfigStore.instance().store(name="evaluate", node=EvaluateConfig)

if __name__ == "__main__":
    main()
