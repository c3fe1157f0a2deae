"""The token vocabulary: how a user's profile and events become integer token IDs.

Ranges, in order: special tokens, profile tokens (one range per profile feature), action tokens, item tokens.
A sequence is ``[profile tokens] + [item, action] per event`` in time order. One action token carries all of an
event's side features in mixed radix: action flags, watch-percentage bucket, watch-duration bucket and the
log-bucketised time gap to the user's previous event (bucket 0 of each continuous feature = missing/first event).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import MTGRConfig

PAD = 0
OOV_ITEM = 1
NUM_SPECIAL = 4  # 2 and 3 are reserved

GROUP_PROFILE, GROUP_ITEM, GROUP_ACTION = 0, 1, 2
NUM_GROUPS = 3


@dataclass
class EventArrays:
    """Events of ``B`` users, flat and in per-user time order; user ``u`` owns ``offsets[u]:offsets[u+1]``."""

    item_tokens: np.ndarray  # (N,) int, already mapped through the ItemVocab
    flags: np.ndarray  # (N, F) bool, columns in MTGRConfig.action_flags order
    watch_percentage: np.ndarray  # (N,) float, NaN = missing
    watch_duration: np.ndarray  # (N,) float seconds, NaN = missing
    timestamp: np.ndarray  # (N,) int64 epoch seconds
    offsets: np.ndarray  # (B+1,) int64


class TokenLayout:
    """Vocabulary ranges of one model configuration and the event -> token encoder."""

    def __init__(self, config: MTGRConfig):
        self.config = config
        self.profile_cards = [p.cardinality + 1 for p in config.profile_features]  # +1: unknown slot 0
        self.profile_offset = NUM_SPECIAL
        self.profile_bases = np.cumsum([0] + self.profile_cards[:-1], dtype=np.int64) + self.profile_offset
        self.num_profile_tokens_total = int(sum(self.profile_cards))
        self.flag_radix = 2 ** len(config.action_flags)
        self.pct_radix = len(config.watch_percentage_boundaries) + 2
        self.dur_radix = len(config.watch_duration_boundaries) + 2
        self.gap_radix = len(config.time_gap_boundaries) + 2
        self.num_action_tokens = self.flag_radix * self.pct_radix * self.dur_radix * self.gap_radix
        self.action_offset = self.profile_offset + self.num_profile_tokens_total
        self.item_offset = self.action_offset + self.num_action_tokens
        self.vocab_size = self.item_offset + config.num_items
        self.prefix_len = len(config.profile_features)

    def max_events(self, max_seq_len: int) -> int:
        """How many events fit in ``max_seq_len`` tokens after the profile prefix."""
        return max(0, (max_seq_len - self.prefix_len) // 2)

    def groups(self, tokens: np.ndarray) -> np.ndarray:
        """Group id of each token: profile, item (incl. specials) or action."""
        g = np.full(tokens.shape, GROUP_ITEM, dtype=np.int64)
        g[(tokens >= self.profile_offset) & (tokens < self.action_offset)] = GROUP_PROFILE
        g[(tokens >= self.action_offset) & (tokens < self.item_offset)] = GROUP_ACTION
        return g

    def action_tokens(self, flags: np.ndarray, watch_percentage: np.ndarray, watch_duration: np.ndarray,
                      gap_seconds: np.ndarray) -> np.ndarray:
        """Mixed-radix action token of each event; ``gap_seconds`` NaN marks a user's first event."""
        cfg = self.config
        bits = (flags.astype(np.int64) << np.arange(flags.shape[1], dtype=np.int64)).sum(axis=1) \
            if flags.shape[1] else np.zeros(len(watch_percentage), dtype=np.int64)
        pct = _bucketize(watch_percentage, cfg.watch_percentage_boundaries)
        dur = _bucketize(watch_duration, cfg.watch_duration_boundaries)
        gap = _bucketize(gap_seconds, cfg.time_gap_boundaries)
        code = ((bits * self.pct_radix + pct) * self.dur_radix + dur) * self.gap_radix + gap
        return self.action_offset + code

    def profile_tokens(self, values: np.ndarray) -> np.ndarray:
        """(B, P) raw profile values -> (B, P) tokens; out-of-range or negative -> the feature's unknown slot."""
        cards = np.asarray([p.cardinality for p in self.config.profile_features], dtype=np.int64)
        v = np.asarray(values, dtype=np.int64)
        slot = np.where((v >= 0) & (v < cards), v + 1, 0)
        return self.profile_bases + slot

    def encode(self, events: EventArrays, profile: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token sequences of a batch of users: ``(tokens int64 (T,), offsets int64 (B+1,))``."""
        ev_off = np.asarray(events.offsets, dtype=np.int64)
        num_users = len(ev_off) - 1
        lengths = np.diff(ev_off)
        p = self.prefix_len
        if p and (profile is None or np.shape(profile) != (num_users, p)):
            raise ValueError(f"expected profile values of shape ({num_users}, {p}), got "
                             f"{None if profile is None else np.shape(profile)}")
        if events.flags.shape[1] != len(self.config.action_flags):
            raise ValueError(f"expected {len(self.config.action_flags)} action flag columns "
                             f"{self.config.action_flags}, got {events.flags.shape[1]}")
        ts = np.asarray(events.timestamp, dtype=np.int64)
        gap = np.full(len(ts), np.nan)
        if len(ts) > 1:
            gap[1:] = (ts[1:] - ts[:-1]).astype(np.float64)
        gap[ev_off[:-1][lengths > 0]] = np.nan  # a user's first event has no previous event
        actions = self.action_tokens(events.flags, np.asarray(events.watch_percentage, dtype=np.float64),
                                     np.asarray(events.watch_duration, dtype=np.float64), gap)

        tok_off = np.zeros(num_users + 1, dtype=np.int64)
        tok_off[1:] = np.cumsum(p + 2 * lengths)
        tokens = np.empty(int(tok_off[-1]), dtype=np.int64)
        if p:
            starts = tok_off[:-1, None] + np.arange(p)
            tokens[starts.ravel()] = self.profile_tokens(profile).ravel()
        user = np.repeat(np.arange(num_users), lengths)
        pos = tok_off[user] + p + 2 * (np.arange(len(ts)) - ev_off[user])
        tokens[pos] = events.item_tokens
        tokens[pos + 1] = actions
        return tokens, tok_off


def _bucketize(values: np.ndarray, boundaries: list[float]) -> np.ndarray:
    """0 for NaN (missing), else 1 + the number of boundaries <= value."""
    b = np.searchsorted(np.asarray(boundaries, dtype=np.float64), values, side="right") + 1
    return np.where(np.isnan(values), 0, b).astype(np.int64)
