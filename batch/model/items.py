"""The item vocabulary of a checkpoint: raw item id <-> item token."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .tokens import OOV_ITEM


class ItemVocab:
    """Items seen in training, in token order: item ``i`` has token ``item_offset + i``.

    Raw ids keep their type (int64 or string); ``category`` is the item attribute the model looks up.
    """

    def __init__(self, item_ids: pa.Array, categories: np.ndarray, item_offset: int):
        if len(item_ids) != len(categories):
            raise ValueError("item_ids and categories differ in length")
        if item_ids.null_count:
            raise ValueError("item vocabulary contains null ids")
        if len(pc.unique(item_ids)) != len(item_ids):
            raise ValueError("item vocabulary contains duplicate ids")
        self.item_ids = item_ids
        self.categories = np.asarray(categories, dtype=np.int64)
        self.item_offset = item_offset

    def __len__(self) -> int:
        return len(self.item_ids)

    def lookup(self, raw_ids: pa.Array | np.ndarray | list) -> np.ndarray:
        """Tokens of ``raw_ids``; unknown or null ids map to ``OOV_ITEM``."""
        raw = raw_ids if isinstance(raw_ids, (pa.Array, pa.ChunkedArray)) else pa.array(raw_ids)
        if raw.type != self.item_ids.type:
            raw = raw.cast(self.item_ids.type)
        index = pc.fill_null(pc.index_in(raw, value_set=self.item_ids), -1).to_numpy().astype(np.int64)
        return np.where(index >= 0, index + self.item_offset, OOV_ITEM)

    def raw_ids(self, item_index: np.ndarray) -> pa.Array:
        """Raw ids of item indices (token - item_offset)."""
        return self.item_ids.take(pa.array(np.asarray(item_index).ravel()))

    def save(self, path: str) -> None:
        table = pa.table({"item_id": self.item_ids, "category": pa.array(self.categories, pa.int32())})
        pq.write_table(table, path, compression="zstd")

    @classmethod
    def load(cls, path: str, item_offset: int) -> "ItemVocab":
        table = pq.read_table(path)
        missing = {"item_id", "category"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        return cls(table.column("item_id").combine_chunks(),
                   table.column("category").to_numpy(), item_offset)
