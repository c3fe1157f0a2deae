"""The transformers config of ``model_type: mtgr``, read from a checkpoint's own config.json."""

from __future__ import annotations

from transformers import PretrainedConfig

from batch.model import MTGRConfig
from batch.model.config import MODEL_TYPE


class MTGRHFConfig(PretrainedConfig):
    """config.json as vLLM sees it: the HF aliases (vocab_size, hidden_size, ...) plus every MTGRConfig field."""

    model_type = MODEL_TYPE

    def mtgr_config(self) -> MTGRConfig:
        """The model package's config (the one definition of every hyper-parameter)."""
        return MTGRConfig.from_json_dict(self.to_dict())
