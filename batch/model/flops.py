"""Floating-point operations of one MTGR scoring pass, counted from the architecture (multiply-add = 2).

Per layer and token: the U/V/Q/K projection (2 * d * 4d) and the output projection (2 * d * d). Per layer and
sequence of n tokens: Q.K and A.V over the n(n+1)/2 causal pairs (2 * 2 * d each). Per scored user: the item head
at the last position (2 * d * num_items). Norms, SiLU, the bias and the embedding lookup are not counted: they are
memory traffic, not matrix work, which is also how model FLOP utilisation is usually defined.
"""

from __future__ import annotations

import numpy as np

from .config import MTGRConfig


def scoring_flops(cfg: MTGRConfig, lengths: np.ndarray) -> dict[str, float]:
    """FLOPs to score users of ``lengths`` tokens each: ``{"linear", "attention", "head", "total"}``."""
    n = np.asarray(lengths, dtype=np.float64)
    d, layers = cfg.d_model, cfg.num_layers
    linear = layers * n.sum() * 2.0 * (4 * d * d + d * d)
    attention = layers * 4.0 * d * (n * (n + 1) / 2).sum()
    head = 2.0 * d * cfg.num_items * len(n)
    return {"linear": linear, "attention": attention, "head": head, "total": linear + attention + head}
