"""Checkpoint directories: ``config.json`` + ``model.safetensors`` + ``items.parquet``.

A checkpoint loads with no network access. Its identity is the ``model_version`` string from config.json and a
content hash over the three files; both go into every output the batch job writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import FORMAT_VERSION, MODEL_TYPE, MTGRConfig
from .items import ItemVocab
from .mtgr import MTGR
from .tokens import TokenLayout

CONFIG_FILE, WEIGHTS_FILE, ITEMS_FILE = "config.json", "model.safetensors", "items.parquet"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the problem."""


@dataclass
class Checkpoint:
    model: MTGR
    config: MTGRConfig
    items: ItemVocab
    path: str
    content_hash: str

    @property
    def model_version(self) -> str:
        return self.config.model_version

    @property
    def identity(self) -> str:
        """``<model_version>@<first 12 hex of the content hash>``, written into every output row."""
        return f"{self.config.model_version}@{self.content_hash[:12]}"

    @property
    def layout(self) -> TokenLayout:
        return self.model.embed.layout


def content_hash(path: str) -> str:
    """SHA-256 over the checkpoint's files (name and bytes, in a fixed order)."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE, ITEMS_FILE):
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str, model: MTGR, items: ItemVocab) -> str:
    """Write ``model`` and its item vocabulary to directory ``path``; returns the content hash."""
    cfg = model.config
    if len(items) != cfg.num_items:
        raise ValueError(f"item vocabulary has {len(items)} items, config says {cfg.num_items}")
    os.makedirs(path, exist_ok=True)
    cfg.save(os.path.join(path, CONFIG_FILE))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    items.save(os.path.join(path, ITEMS_FILE))
    return content_hash(path)


def read_config(path: str) -> MTGRConfig:
    """The MTGRConfig of a checkpoint directory, with format checks."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE, ITEMS_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"checkpoint {path!r} is missing {name}")
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path!r}: {CONFIG_FILE} is not valid JSON ({e})") from e
    if raw.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"checkpoint {path!r}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r}: format_version {raw.get('format_version')!r} is not "
                              f"supported (this code reads format_version {FORMAT_VERSION})")
    try:
        return MTGRConfig.from_json_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r}: bad config.json: {e}") from e


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory for inference (eval mode).

    The model is built without random initialisation (its tensors are the file's), and its embedding table is
    not built: an engine builds it on the device and in the dtype it runs in (``model.embed.build_table()``).
    On an H100 host the load took 14-17 s of every job's start for DLRMv3-like's 1M items, most of it that
    initialisation and a CPU table that the engines built again anyway (6.3 s without them)."""
    path = os.path.abspath(path)
    cfg = read_config(path)
    with torch.device("meta"):  # shapes and dtypes only; the weights are assigned from the file below
        model = MTGR(cfg)
    try:
        tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot read {WEIGHTS_FILE}: {e}") from e
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r}: {WEIGHTS_FILE} does not match config.json "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"checkpoint {path!r}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"config.json implies {tuple(expected[name].shape)}")
    model.load_state_dict({k: t.to(expected[k].dtype) for k, t in tensors.items()}, assign=True)
    unset = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:  # a tensor that is neither in the file nor made on the CPU by the model's constructor
        raise RuntimeError(f"MTGR tensors {unset[:5]} were not loaded")
    try:
        items = ItemVocab.load(os.path.join(path, ITEMS_FILE), model.embed.layout.item_offset)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise CheckpointError(f"checkpoint {path!r}: cannot read {ITEMS_FILE}: {e}") from e
    if len(items) != cfg.num_items:
        raise CheckpointError(f"checkpoint {path!r}: {ITEMS_FILE} has {len(items)} items, "
                              f"config.json says num_items={cfg.num_items}")
    model.to(device).eval()
    return Checkpoint(model, cfg, items, path, content_hash(path))
