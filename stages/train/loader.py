"""A deterministic, resumable data loader over the tokenize stage's packed rows.

Each epoch is a permutation of all rows of the split drawn from ``(seed, epoch)``, cut into
global batches (the last partial batch is dropped). A global batch is laid out as
``[micro_batches, micro_batch]`` and each host takes its columns of every micro-batch, so
the global array the hosts build together is the same for any host count. The position is
``(epoch, step)`` of the next batch to hand out: saved in every checkpoint, it restarts the
sequence exactly. A background thread gathers rows ahead so the step never waits on disk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stages.tokenize import ShardDataset


@dataclass(frozen=True)
class Position:
    """Where the loader stands: the next batch is ``step`` of ``epoch``."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}


class Loader:
    """Batches ``[micro_batches, micro_batch / host_count, row_len]`` for host ``host_index``."""

    def __init__(
        self,
        dataset: ShardDataset,
        global_batch: int,
        micro_batches: int,
        seed: int,
        host_index: int = 0,
        host_count: int = 1,
        start: Position = Position(),
        prefetch: int = 2,
    ):
        if global_batch % micro_batches:
            raise ValueError(f"global batch {global_batch} is not a multiple of {micro_batches}")
        micro_batch = global_batch // micro_batches
        if micro_batch % host_count:
            raise ValueError(f"micro-batch {micro_batch} does not split over {host_count} hosts")
        if len(dataset) < global_batch:
            raise ValueError(f"{len(dataset)} rows cannot fill a global batch of {global_batch}")
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batches = micro_batches
        self.seed = seed
        self.steps_per_epoch = len(dataset) // global_batch
        per_host = micro_batch // host_count
        self._columns = slice(host_index * per_host, (host_index + 1) * per_host)
        self._position = start
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        self._queue: queue.Queue[tuple[Position, np.ndarray]] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True)
        self._thread.start()

    @property
    def position(self) -> Position:
        """The position of the next batch ``next()`` returns (what a checkpoint saves)."""
        return self._position

    def global_indices(self, position: Position) -> np.ndarray:
        """Row indices of the global batch at ``position``, as ``[micro_batches, micro]``."""
        epoch, order = self._order
        if epoch != position.epoch:
            rng = np.random.default_rng([self.seed, position.epoch])
            # One epoch's permutation is kept: drawing it is O(rows), a step is O(batch).
            self._order = (position.epoch, rng.permutation(len(self.dataset)))
            order = self._order[1]
        start = position.step * self.global_batch
        return order[start : start + self.global_batch].reshape(self.micro_batches, -1)

    def _advance(self, position: Position) -> Position:
        if position.step + 1 < self.steps_per_epoch:
            return Position(position.epoch, position.step + 1)
        return Position(position.epoch + 1, 0)

    def _produce(self, position: Position) -> None:
        while not self._stop.is_set():
            mine = self.global_indices(position)[:, self._columns]
            rows = self.dataset.take(mine.ravel()).reshape(*mine.shape, -1)
            while not self._stop.is_set():
                try:
                    self._queue.put((position, rows), timeout=0.1)
                    break
                except queue.Full:
                    continue
            position = self._advance(position)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        position, rows = self._queue.get()
        if position != self._position:
            raise AssertionError(f"loader produced {position}, expected {self._position}")
        self._position = self._advance(position)
        return rows

    def close(self) -> None:
        """Stop the prefetch thread."""
        self._stop.set()
        self._thread.join()


def validation_batches(dataset: ShardDataset, batch: int, count: int) -> list[np.ndarray]:
    """The first ``count`` batches of ``batch`` consecutive rows (fewer if the split is
    short): the same validation set at every evaluation."""
    count = min(count, len(dataset) // batch)
    if count == 0:
        raise ValueError(f"validation split has {len(dataset)} rows, fewer than a batch {batch}")
    return [dataset.take(np.arange(i * batch, (i + 1) * batch)) for i in range(count)]
