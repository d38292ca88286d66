"""A deterministic, resumable data loader over the tokenize stage's packed rows.

Each epoch is a permutation of all rows of the split drawn from ``(seed, epoch)``, cut into
global batches (the last partial batch is dropped). A global batch is laid out as
``[micro_batches, micro_batch]`` and each host takes its columns of every micro-batch, so
the global array the hosts build together is the same for any host count. The position is
``(epoch, step)`` of the next batch to hand out: saved in every checkpoint, it restarts the
sequence exactly. A background thread gathers rows ahead so the step never waits on disk.

With a mixture (the tokenize stage packed each component into its own stream), the epoch
is a pass over the components' rows taken as often as their ``epochs`` say, as The Pile's
table does: ``round(sum(rows * epochs))`` draws split between the components by the
manifest's weights (largest remainder), each component's draws being its rows repeated
``floor`` times plus a seeded subset for the fraction, and the whole list permuted by
``(seed, epoch)``. Every batch therefore draws components in proportion to their weights,
and the position stays ``(epoch, step)``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stages.tokenize import ShardDataset, read_manifest


@dataclass(frozen=True)
class Position:
    """Where the loader stands: the next batch is ``step`` of ``epoch``."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}


@dataclass(frozen=True)
class Mixture:
    """Component streams laid end to end in one dataset, and the draws each gets an epoch."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    """First row of each component in the dataset."""
    rows: tuple[int, ...]
    draws: tuple[int, ...]
    """Rows drawn from each component per epoch."""

    @classmethod
    def apportion(
        cls, names: list[str], rows: list[int], epochs: list[float], weights: list[float]
    ) -> Mixture:
        """``round(sum(rows * epochs))`` draws split by ``weights`` (largest remainder);
        components without rows get none."""
        usable = np.array([w if r else 0.0 for w, r in zip(weights, rows, strict=True)])
        if usable.sum() <= 0:
            raise ValueError(f"mixture components {names} have no rows with a positive weight")
        total = round(sum(r * e for r, e in zip(rows, epochs, strict=True)))
        exact = usable / usable.sum() * total
        draws = np.floor(exact).astype(np.int64)
        short = total - int(draws.sum())
        draws[np.argsort(-(exact - draws), kind="stable")[:short]] += 1
        offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int).tolist()
        return cls(tuple(names), tuple(offsets), tuple(rows), tuple(int(d) for d in draws))

    def __len__(self) -> int:
        return sum(self.draws)

    def component(self, indices: np.ndarray) -> np.ndarray:
        """Which component (index into ``names``) each dataset row belongs to."""
        return np.searchsorted(np.asarray(self.offsets), indices, side="right") - 1

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """Dataset rows of epoch ``epoch``'s draws, shuffled."""
        rng = np.random.default_rng([seed, epoch])
        parts = []
        for offset, rows, draws in zip(self.offsets, self.rows, self.draws, strict=True):
            if draws:
                full, extra = divmod(draws, rows)
                chosen = np.concatenate(
                    [np.tile(np.arange(rows), full), rng.permutation(rows)[:extra]]
                )
                parts.append(offset + chosen)
        return rng.permutation(np.concatenate(parts))


def load_split(tokenize_dir: str, split: str) -> tuple[ShardDataset, Mixture | None]:
    """The rows of ``split`` of a tokenize output and, when it was packed per component,
    the mixture over them (components in name order, weighted as the manifest says)."""
    manifest = read_manifest(tokenize_dir)
    mixture = manifest.get("mixture")
    if not mixture:
        return ShardDataset.from_output(tokenize_dir, split), None
    if split not in manifest["splits"]:
        raise KeyError(f"{tokenize_dir}: no split {split!r} (has {sorted(manifest['splits'])})")
    components = manifest["splits"][split]["components"]
    names = sorted(mixture)
    missing = [n for n in names if n not in components]
    if missing:
        raise KeyError(f"{tokenize_dir}: {split} lacks mixture components {missing}")
    paths = [
        os.path.join(tokenize_dir, shard["path"])
        for n in names
        for shard in components[n]["shards"]
    ]
    dataset = ShardDataset(paths)
    rows = [int(components[n]["rows"]) for n in names]
    if len(dataset) != sum(rows):
        raise ValueError(
            f"{tokenize_dir}: {split} has {len(dataset)} rows, manifest says {sum(rows)}"
        )
    epochs = [float(mixture[n]["epochs"]) for n in names]
    weights = [float(mixture[n]["weight"]) for n in names]
    return dataset, Mixture.apportion(names, rows, epochs, weights)


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
        mixture: Mixture | None = None,
    ):
        if global_batch % micro_batches:
            raise ValueError(f"global batch {global_batch} is not a multiple of {micro_batches}")
        micro_batch = global_batch // micro_batches
        if micro_batch % host_count:
            raise ValueError(f"micro-batch {micro_batch} does not split over {host_count} hosts")
        epoch_rows = len(mixture) if mixture else len(dataset)
        if epoch_rows < global_batch:
            raise ValueError(f"{epoch_rows} rows cannot fill a global batch of {global_batch}")
        self.dataset = dataset
        self.mixture = mixture
        self.global_batch = global_batch
        self.micro_batches = micro_batches
        self.seed = seed
        self.steps_per_epoch = epoch_rows // global_batch
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
            # One epoch's permutation is kept: drawing it is O(rows), a step is O(batch).
            self._order = (position.epoch, self._epoch_order(position.epoch))
            order = self._order[1]
        start = position.step * self.global_batch
        return order[start : start + self.global_batch].reshape(self.micro_batches, -1)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self.mixture:
            return self.mixture.epoch_order(self.seed, epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

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


def validation_batches(
    dataset: ShardDataset, batch: int, count: int, mixture: Mixture | None = None
) -> list[np.ndarray]:
    """The first ``count`` batches of ``batch`` rows (fewer if the split is short): the
    rows in order, or with a mixture the first draws of its seed-0 epoch, so that validation
    weighs the components as training does. The same set at every evaluation."""
    order = mixture.epoch_order(0, 0) if mixture else np.arange(len(dataset))
    count = min(count, len(order) // batch)
    if count == 0:
        raise ValueError(f"validation split has {len(order)} rows, fewer than a batch {batch}")
    return [dataset.take(order[i * batch : (i + 1) * batch]) for i in range(count)]
