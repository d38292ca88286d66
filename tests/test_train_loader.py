"""The train loader: a seeded per-epoch permutation, exact resume from a saved position,
hosts that together cover exactly the global batch, and a fixed validation set."""

from __future__ import annotations

import numpy as np
import pytest

from stages.tokenize import ShardDataset
from stages.train.loader import Loader, Position, validation_batches
from tests.train_data import write_tokenized


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ShardDataset:
    out = write_tokenized(str(tmp_path_factory.mktemp("tok")), 16, {"train": 100, "val": 10})
    return ShardDataset.from_output(out, "train")


def take(loader: Loader, n: int) -> list[np.ndarray]:
    batches = [next(loader) for _ in range(n)]
    loader.close()
    return batches


def test_epoch_is_a_seeded_permutation_without_repeats(dataset: ShardDataset) -> None:
    loader = Loader(dataset, global_batch=8, micro_batches=2, seed=5)
    steps = loader.steps_per_epoch
    assert steps == len(dataset) // 8 and steps >= 10
    seen = np.concatenate([loader.global_indices(Position(0, s)).ravel() for s in range(steps)])
    assert len(set(seen.tolist())) == steps * 8
    other_epoch = loader.global_indices(Position(1, 0))
    assert not np.array_equal(other_epoch, loader.global_indices(Position(0, 0)))
    other_seed = Loader(dataset, global_batch=8, micro_batches=2, seed=6)
    assert not np.array_equal(other_seed.global_indices(Position(0, 0)), seen[:8].reshape(2, 4))
    batch = take(loader, 1)[0]
    other_seed.close()
    assert batch.shape == (2, 4, 17) and batch.dtype == np.uint16
    np.testing.assert_array_equal(batch[1, 2], dataset[int(seen[6])])


def test_resume_mid_epoch_and_across_epochs_gives_the_same_batches(dataset: ShardDataset) -> None:
    straight = Loader(dataset, global_batch=8, micro_batches=2, seed=1)
    steps = straight.steps_per_epoch
    total = steps + 4
    expected = take(straight, total)
    first = Loader(dataset, global_batch=8, micro_batches=2, seed=1)
    head = [next(first) for _ in range(steps - 3)]
    saved = first.position
    first.close()
    assert saved == Position(0, steps - 3)
    resumed = Loader(dataset, global_batch=8, micro_batches=2, seed=1, start=saved)
    tail = take(resumed, total - len(head))
    for a, b in zip(expected, head + tail, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.position == Position(1, 4)


def test_two_hosts_cover_exactly_the_global_batch(dataset: ShardDataset) -> None:
    whole = Loader(dataset, global_batch=8, micro_batches=2, seed=3)
    hosts = [
        Loader(dataset, global_batch=8, micro_batches=2, seed=3, host_index=i, host_count=2)
        for i in range(2)
    ]
    expected = take(whole, 3)
    parts = [take(h, 3) for h in hosts]
    for step in range(3):
        assert parts[0][step].shape == (2, 2, 17)
        joined = np.concatenate([parts[0][step], parts[1][step]], axis=1)
        np.testing.assert_array_equal(joined, expected[step])


def test_bad_shapes_and_validation_set(dataset: ShardDataset) -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        Loader(dataset, global_batch=9, micro_batches=2, seed=0)
    with pytest.raises(ValueError, match="does not split over 3 hosts"):
        Loader(dataset, global_batch=8, micro_batches=2, seed=0, host_count=3)
    val = validation_batches(dataset, batch=4, count=3)
    assert len(val) == 3
    np.testing.assert_array_equal(val[1][0], dataset[4])
    assert len(validation_batches(dataset, batch=50, count=10)) == len(dataset) // 50
