"""The MTGR model package: configuration, token vocabulary, layers and checkpoints (no Polars, no vLLM)."""

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .config import MTGRConfig, ProfileFeature
from .items import ItemVocab
from .mtgr import MTGR
from .tokens import OOV_ITEM, PAD, EventArrays, TokenLayout

__all__ = ["MTGR", "Checkpoint", "CheckpointError", "EventArrays", "ItemVocab", "MTGRConfig", "OOV_ITEM", "PAD",
           "ProfileFeature", "TokenLayout", "load_checkpoint", "save_checkpoint"]
