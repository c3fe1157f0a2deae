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
        table = self._dense_table() if raw.null_count == 0 else None
        if table is not None:  # integer ids in a compact range: one array read per id instead of a hash probe
            lo, token_of = table
            values = raw.to_numpy() if isinstance(raw, pa.Array) else np.concatenate(
                [c.to_numpy() for c in raw.chunks] or [np.zeros(0, np.int64)])
            slot = values.astype(np.int64)  # a copy, shifted in place: id - lo, wrapping below lo to >= 2**63
            slot -= lo
            slot = slot.view(np.uint64)
            np.minimum(slot, np.uint64(len(token_of) - 1), out=slot)  # outside the range -> the last slot, OOV
            return token_of[slot]
        index = pc.fill_null(pc.index_in(raw, value_set=self.item_ids), -1).to_numpy().astype(np.int64)
        return np.where(index >= 0, index + self.item_offset, OOV_ITEM)

    def _dense_table(self) -> tuple[int, np.ndarray] | None:
        """For integer ids spanning a range at most a few times the vocabulary: (lowest id, the token of id
        ``lowest + k`` at ``k`` and ``OOV_ITEM`` in one extra last slot and wherever no item has that id), built
        once; None for string or widely spread ids."""
        if not hasattr(self, "_table"):
            self._table = None
            if pa.types.is_integer(self.item_ids.type) and len(self.item_ids):
                ids = self.item_ids.to_numpy().astype(np.int64)
                lo, hi = int(ids.min()), int(ids.max())
                if hi - lo < max(4 * len(ids), 1 << 16) and hi - lo < (1 << 28):
                    token_of = np.full(hi - lo + 2, OOV_ITEM, dtype=np.int64)
                    token_of[ids - lo] = self.item_offset + np.arange(len(ids), dtype=np.int64)
                    self._table = (lo, token_of)
        return self._table

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
