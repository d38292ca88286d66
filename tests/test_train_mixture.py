"""Mixture weighting in the train loader: over a tokenize output packed per component (the
tokenize stage's layout with ``mixture`` set), batches draw components in proportion to the
manifest's weights, an epoch takes each component ``epochs`` times, resume is exact and two
hosts' slices make up the one-host batch; the trainer trains and validates on it."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from stages.tokenize import read_manifest
from stages.tokenize.packing import RowWriter, with_eos
from stages.train.config import TrainConfig
from stages.train.loader import Loader, Mixture, Position, load_split, validation_batches
from stages.train.trainer import Trainer

SEQ = 16
EOS = 255
SPAN = 80
"""Component ``i``'s documents use ids ``[i * SPAN, (i + 1) * SPAN)``: a row names its stream."""
COMPONENTS = {"Alpha": (1.0, 300), "Beta": (2.0, 100), "Gamma Set": (0.5, 200)}
"""name -> (epochs, about how many train rows)."""


def write_stream(out: str, directory: str, index: int, rows: int, rng: np.random.Generator):
    """One component's shard of about ``rows`` rows; returns its manifest entry."""
    docs = []
    for _ in range(rows * (SEQ + 1) // 24 + 2):
        length = rng.integers(8, 41)
        docs.append((index * SPAN + rng.integers(0, SPAN, length)).astype(np.uint16))
    os.makedirs(os.path.join(out, directory), exist_ok=True)
    path = f"{directory}/shard-00000.arrow"
    with open(os.path.join(out, path), "wb") as f:
        writer = RowWriter(f, SEQ + 1, np.dtype(np.uint16))
        writer.add(with_eos(docs, EOS, np.dtype(np.uint16)))
        dropped = len(writer.close())
    tokens = sum(len(d) + 1 for d in docs)
    shard = {"path": path, "rows": writer.rows, "first_row": 0, "source": "test"}
    return {"tokens": tokens, "rows": writer.rows, "tokens_dropped": dropped, "shards": [shard]}


def write_mixture(out: str) -> str:
    """A tokenize output whose train and val splits are packed per component."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, scale in (("train", 1.0), ("val", 0.2)):
        components = {
            name: write_stream(out, f"{split}/c{i}", i, int(rows * scale), rng)
            for i, (name, (_, rows)) in enumerate(COMPONENTS.items())
        }
        splits[split] = {
            "rows": sum(c["rows"] for c in components.values()),
            "components": components,
        }
    effective = {
        n: splits["train"]["components"][n]["tokens"] * e for n, (e, _) in COMPONENTS.items()
    }
    mixture = {
        n: {"epochs": COMPONENTS[n][0], "weight": effective[n] / sum(effective.values())}
        for n in sorted(COMPONENTS)
    }
    manifest = {
        "format": "meshline.tokens.v1",
        "seq_len": SEQ,
        "row_len": SEQ + 1,
        "dtype": "uint16",
        "eos_id": EOS,
        "tokenizer": {"kind": "test", "fingerprint": "test", "vocab_size": 256},
        "splits": splits,
        "mixture": mixture,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return out


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_mixture(str(tmp_path_factory.mktemp("mix")))


def stream_of(rows: np.ndarray) -> np.ndarray:
    """The component index of each row, read from its token ids (EOS is above every span)."""
    return rows.reshape(-1, SEQ + 1).min(axis=1) // SPAN


def take(loader: Loader, n: int) -> list[np.ndarray]:
    batches = [next(loader) for _ in range(n)]
    loader.close()
    return batches


def test_batches_draw_components_in_proportion_to_their_weights(tokenized: str) -> None:
    dataset, mixture = load_split(tokenized, "train")
    assert mixture is not None and mixture.names == tuple(sorted(COMPONENTS))
    weights = read_manifest(tokenized)["mixture"]
    loader = Loader(dataset, global_batch=8, micro_batches=2, seed=7, mixture=mixture)
    # 100 batches cross the first epoch's end: a sample, not a whole pass.
    assert loader.steps_per_epoch < 100 < 2 * loader.steps_per_epoch
    drawn = stream_of(np.concatenate(take(loader, 100)))
    n, total = len(drawn), len(mixture)
    for index, name in enumerate(sorted(COMPONENTS)):
        # The slot-index order here is sorted(names); the token span follows COMPONENTS.
        span = list(COMPONENTS).index(name)
        w = weights[name]["weight"]
        share = float(np.mean(drawn == span))
        # Draws without replacement from a pass vary less than binomial ones; 4 binomial
        # standard deviations, plus the < 1/total the apportioning rounds each share by.
        assert abs(share - w) <= 4 * math.sqrt(w * (1 - w) / n) + 1 / total, (name, share, w)
        assert mixture.draws[index] == pytest.approx(w * total, abs=1)


def test_an_epoch_takes_each_component_its_epochs(tokenized: str) -> None:
    dataset, mixture = load_split(tokenized, "train")
    assert mixture is not None
    order = mixture.epoch_order(seed=3, epoch=0)
    assert (
        len(order)
        == len(mixture)
        == round(
            sum(r * COMPONENTS[n][0] for n, r in zip(mixture.names, mixture.rows, strict=True))
        )
    )
    for index, (offset, rows, draws) in enumerate(
        zip(mixture.offsets, mixture.rows, mixture.draws, strict=True)
    ):
        mine = order[mixture.component(order) == index]
        assert len(mine) == draws and mine.min() >= offset and mine.max() < offset + rows
        seen = np.bincount(mine - offset, minlength=rows)
        # Whole passes over the component's rows, then a subset once more.
        assert set(seen.tolist()) <= {draws // rows, draws // rows + 1}
    np.testing.assert_array_equal(order, mixture.epoch_order(seed=3, epoch=0))
    assert not np.array_equal(order, mixture.epoch_order(seed=3, epoch=1))
    rows = dataset.take(order[:50])
    np.testing.assert_array_equal(stream_of(rows), _spans(mixture, mixture.component(order[:50])))


def _spans(mixture: Mixture, components: np.ndarray) -> np.ndarray:
    """Token span of each component index (components are sorted by name, spans are not)."""
    return np.array([list(COMPONENTS).index(mixture.names[c]) for c in components])


def test_resume_mid_epoch_and_two_hosts_match_the_straight_run(tokenized: str) -> None:
    dataset, mixture = load_split(tokenized, "train")

    def loader(**kwargs: object) -> Loader:
        return Loader(dataset, global_batch=8, micro_batches=2, seed=1, mixture=mixture, **kwargs)

    straight = loader()
    total = straight.steps_per_epoch + 5
    expected = take(straight, total)
    first = loader()
    head = [next(first) for _ in range(total // 2)]
    saved = first.position
    first.close()
    tail = take(loader(start=saved), total - len(head))
    for a, b in zip(expected, head + tail, strict=True):
        np.testing.assert_array_equal(a, b)
    parts = [take(loader(host_index=i, host_count=2), total) for i in range(2)]
    for step in range(total):
        joined = np.concatenate([parts[0][step], parts[1][step]], axis=1)
        np.testing.assert_array_equal(joined, expected[step])
    assert saved == Position(0, total // 2)


def test_validation_is_weighted_and_bad_manifests_are_named(tokenized: str) -> None:
    dataset, mixture = load_split(tokenized, "val")
    assert mixture is not None and len(dataset) == sum(mixture.rows)
    val = np.concatenate(validation_batches(dataset, 4, 10, mixture))
    # Rows in stream order would give only the first component; weighted draws give all.
    assert set(stream_of(val).tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="no rows with a positive weight"):
        Mixture.apportion(["a", "b"], [0, 5], [1.0, 1.0], [1.0, 0.0])
    manifest = read_manifest(tokenized)
    del manifest["splits"]["val"]["components"]["Beta"]
    broken = os.path.join(os.path.dirname(tokenized), "broken")
    os.makedirs(broken, exist_ok=True)
    with open(os.path.join(broken, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(KeyError, match="val lacks mixture components \\['Beta'\\]"):
        load_split(broken, "val")


def test_the_trainer_trains_on_a_mixture(tokenized: str, tmp_path: str) -> None:
    config = TrainConfig(
        model="gptj-tiny",
        model_overrides={"n_layers": 1, "vocab_size": 256},
        global_batch=8,
        micro_batches=2,
        steps=3,
        val_batches=2,
        optimizer={"warmup_steps": 1, "anneal_steps": 10},
        peak_flops_per_device=1e11,
        dtype="float32",
    )
    trainer = Trainer(config, tokenized, str(tmp_path))
    assert trainer.mixture is not None
    result = trainer.train()
    assert result.step == 3 and math.isfinite(result.val_loss)
