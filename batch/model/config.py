"""MTGR hyper-parameters and the HF-style ``config.json`` of a checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

FORMAT_VERSION = 1
MODEL_TYPE = "mtgr"
ARCHITECTURE = "MTGRForItemScoring"


@dataclass
class ProfileFeature:
    """A per-user categorical feature that becomes one prefix token (MTGR's U tokens)."""

    name: str = "age_group"
    cardinality: int = 8  # values 0..cardinality-1; anything else maps to the feature's "unknown" slot


@dataclass
class MTGRConfig:
    """Every hyper-parameter of an MTGR model, including the feature bucket boundaries.

    ``max_seq_len`` counts tokens (positions): the profile prefix plus two tokens per event.
    ``num_items`` and ``num_categories`` come from the training data's item vocabulary.
    """

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    max_seq_len: int = 1024
    num_items: int = 1000
    num_categories: int = 0  # item attribute looked up inside the model; 0 = none
    feature_dim: int = 16  # width of each side-feature embedding before fusion
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 128  # distances beyond share one bias (kernels then skip the per-score gather)
    dropout: float = 0.0
    action_flags: list[str] = field(default_factory=lambda: ["is_liked", "is_favorited", "is_shared"])
    watch_percentage_boundaries: list[float] = field(
        default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    watch_duration_boundaries: list[float] = field(  # seconds
        default_factory=lambda: [5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0])
    time_gap_boundaries: list[float] = field(  # seconds, roughly log-spaced from 10 s to 30 days
        default_factory=lambda: [10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 10800.0, 43200.0, 86400.0,
                                 259200.0, 604800.0, 2592000.0])
    profile_features: list[ProfileFeature] = field(default_factory=list)
    model_version: str = "untrained"

    def __post_init__(self) -> None:
        self.profile_features = [p if isinstance(p, ProfileFeature) else ProfileFeature(**p)
                                 for p in self.profile_features]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent hyper-parameter."""
        checks = [
            (self.d_model > 0, "d_model must be > 0"),
            (self.num_layers > 0, "num_layers must be > 0"),
            (self.num_heads > 0 and self.d_model % self.num_heads == 0,
             f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"),
            (self.max_seq_len >= len(self.profile_features) + 2,
             "max_seq_len must leave room for the profile prefix and one event"),
            (self.num_items > 0, "num_items must be > 0"),
            (self.num_categories >= 0, "num_categories must be >= 0"),
            (self.rel_pos_buckets >= 2, "rel_pos_buckets must be >= 2"),
            (self.rel_pos_max_distance >= self.rel_pos_buckets, "rel_pos_max_distance must be >= rel_pos_buckets"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (len(self.action_flags) <= 8, "at most 8 action_flags"),
        ]
        for name in ("watch_percentage_boundaries", "watch_duration_boundaries", "time_gap_boundaries"):
            b = getattr(self, name)
            checks.append((all(x < y for x, y in zip(b, b[1:])), f"{name} must be strictly increasing"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid MTGR config: {message}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def num_profile_tokens(self) -> int:
        return len(self.profile_features)

    # -- HF-style config.json ---------------------------------------------------------------
    def to_json_dict(self) -> dict:
        """The checkpoint's config.json: our fields plus the HF aliases vLLM reads."""
        from .tokens import TokenLayout

        d = dataclasses.asdict(self)
        d.update(
            model_type=MODEL_TYPE,
            architectures=[ARCHITECTURE],
            format_version=FORMAT_VERSION,
            vocab_size=TokenLayout(self).vocab_size,
            hidden_size=self.d_model,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_seq_len,
            torch_dtype="float32",
        )
        return d

    @classmethod
    def from_json_dict(cls, d: dict) -> "MTGRConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

