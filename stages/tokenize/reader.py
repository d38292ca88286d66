"""Random access to the packed rows of a tokenize output, memory-mapped, without copies.

``ShardDataset`` memory-maps every shard of a split (Arrow IPC files, uncompressed), and
row ``i`` of the split is a read-only numpy view into the mapping: nothing is read from disk
until the row is touched, and the trainer's data loader can index any global row. It reads
with numpy and pyarrow (no Ray), from local files (copy a ``gs://`` output down first).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from stages.tokenize.manifest import read_manifest


class ShardDataset:
    """The rows of some Arrow IPC shards, in order, as one indexable sequence."""

    def __init__(self, paths: Sequence[str]):
        if not paths:
            raise ValueError("ShardDataset needs at least one shard")
        self.paths = list(paths)
        self._blocks: list[np.ndarray] = []
        self._starts: list[int] = []
        self.row_len = 0
        self.dtype: np.dtype | None = None
        rows = 0
        for path in self.paths:
            for block in _shard_blocks(path):
                if self.dtype is None:
                    self.row_len, self.dtype = block.shape[1], block.dtype
                elif block.shape[1] != self.row_len or block.dtype != self.dtype:
                    raise ValueError(
                        f"{path}: rows of {block.shape[1]} {block.dtype}, "
                        f"expected {self.row_len} {self.dtype}"
                    )
                if len(block):
                    self._starts.append(rows)
                    self._blocks.append(block)
                    rows += len(block)
        self._len = rows

    @classmethod
    def from_output(cls, output: str, split: str = "train", component: str | None = None):
        """The shards of ``split`` (of one ``component`` when the output was packed per
        component for a mixture) listed by the manifest of the tokenize output ``output``;
        their row counts are checked against it."""
        manifest = read_manifest(output)
        if split not in manifest["splits"]:
            raise KeyError(f"{output}: no split {split!r} (has {sorted(manifest['splits'])})")
        entry = manifest["splits"][split]
        if manifest.get("mixture"):
            if component not in entry["components"]:
                raise KeyError(
                    f"{output}: packed per component; pick one of {sorted(entry['components'])}"
                )
            entry = entry["components"][component]
        elif component is not None:
            raise KeyError(f"{output}: not packed per component (no mixture)")
        dataset = cls([os.path.join(output, shard["path"]) for shard in entry["shards"]])
        if len(dataset) != entry["rows"]:
            raise ValueError(f"{output}: {split} has {len(dataset)} rows, manifest says otherwise")
        return dataset

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        """Row ``index`` (negative counts from the end) as a read-only view of the file."""
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"row {index} of {self._len}")
        block = bisect.bisect_right(self._starts, index) - 1
        return self._blocks[block][index - self._starts[block]]

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``indices`` gathered into one new ``[len(indices), row_len]`` array."""
        return (
            np.stack([self[int(i)] for i in indices])
            if len(indices)
            else np.zeros((0, self.row_len), self.dtype)
        )


def _shard_blocks(path: str) -> list[np.ndarray]:
    """Each record batch of an Arrow IPC shard as a ``[rows, row_len]`` view of the map."""
    reader = pa.ipc.open_file(pa.memory_map(path, "r"))
    field = reader.schema.field(0)
    if not pa.types.is_fixed_size_list(field.type):
        raise ValueError(f"{path}: column {field.name} is {field.type}, not a fixed-size list")
    row_len = field.type.list_size
    dtype = np.dtype(str(field.type.value_type))
    blocks = []
    for i in range(reader.num_record_batches):
        values = reader.get_batch(i).column(0).flatten()
        if values.null_count:
            raise ValueError(f"{path}: record batch {i} has null tokens")
        # np.frombuffer rather than Array.to_numpy: the latter imports pandas (0.4 s of a
        # training host's start) to view a buffer that is already a plain integer array.
        view = np.frombuffer(
            values.buffers()[1], dtype, count=len(values), offset=values.offset * dtype.itemsize
        )
        blocks.append(view.reshape(-1, row_len))
    if not blocks:
        blocks.append(np.zeros((0, row_len), dtype))
    return blocks
