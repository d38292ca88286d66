"""``JaxLM``: scores lm-eval-style requests with our Flax model (no PyTorch).

Each request becomes ``harness.Scored``: a prefix the model reads first and the inputs whose
logits score the continuation. Requests sharing a prefix (the choices of one question) form
a group; a batch runs each group's prefix once into a KV cache (final hidden states only, no
logits), copies the cache to the group's rows and decodes every row's inputs against it.
The vocabulary projection (lm_head, the dominant cost of a small model) then runs only on
the hidden states of the scored positions, gathered out of the padded rows by flat indices
computed on the host, and log-probs and greedy misses are summed back to their rows. So a
context is encoded once however many choices it has, padding is projected only up to the
scored count's bucket, and identical requests are scored once.

Batches hold groups sorted by padded length; prefix, inputs, group, row and scored-position
counts are padded to a few bucket sizes, so jit compiles a handful of shapes per task. Rows
per batch are bounded by ``batch_size`` and by a token budget, so long rolling windows do not
run out of memory. A batch whose shape recurs too rarely to pay for its own compile runs
padded to a larger shape already compiled for the task (``shapes.run_shapes``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pipeline import storage
from pipeline.progress import PhaseBar
from stages.convert.hf_dir import CONFIG, import_hf
from stages.evaluate.harness import Scored, bucket, encode_pair, rolling_windows, split_prefix
from stages.evaluate.shapes import Shape, run_shapes
from stages.tokenize.tokenizer import DESCRIPTOR, HF_TOKENIZER, RANKS, Tokenizer, TokenizerError
from stages.train.model import KVCache, Transformer
from stages.train.model_config import ModelConfig
from stages.train.optim import logsumexp
from stages.train.output import load_params
from stages.train.params import Params

Array = jax.Array
# Rows x padded tokens per batch (per unit of batch_size): bounds the logits and KV cache.
_TOKENS_PER_ROW = 512


@partial(jax.jit, static_argnums=0)
def _score(
    config: ModelConfig,
    params: Params,
    prefix: Array,
    prefix_mask: Array,
    rows: Array,
    inputs: Array,
    input_mask: Array,
    scored: Array,
    targets: Array,
    real: Array,
) -> tuple[Array, Array]:
    """Summed target log-probs [R] and whether every target is the argmax [R].

    prefix [G, P] is left-padded, inputs [R, T] right-padded, row r continues prefix
    ``rows[r]``. scored [N] are flat indices into [R, T] of the positions predicting
    targets [N]; entries where ``real`` is False are padding and count for nothing."""
    model = Transformer(config)
    cache = KVCache.empty(config, prefix.shape[0], prefix.shape[1] + inputs.shape[1])
    _, cache = model.apply(
        {"params": params}, prefix, cache, prefix_mask, project=False, method=Transformer.decode
    )
    cache = KVCache(
        k=cache.k[:, rows], v=cache.v[:, rows], valid=cache.valid[rows], index=cache.index
    )
    hidden, _ = model.apply(
        {"params": params}, inputs, cache, input_mask, project=False, method=Transformer.decode
    )
    hidden = hidden.reshape(-1, hidden.shape[-1])[scored]
    logits = model.apply({"params": params}, hidden[None], method=Transformer.project)[0]
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    logprobs = jnp.where(real, picked - logsumexp(logits), 0.0)
    misses = real & (jnp.argmax(logits, axis=-1) != targets)
    owner, n_rows = scored // inputs.shape[1], inputs.shape[0]
    sums = jax.ops.segment_sum(logprobs, owner, n_rows)
    return sums, jax.ops.segment_sum(misses.astype(jnp.int32), owner, n_rows) == 0


@dataclass
class _Batch:
    """Groups of unique requests sharing a prefix, padded to bucket shapes."""

    prefix: np.ndarray
    prefix_mask: np.ndarray
    rows: np.ndarray
    inputs: np.ndarray
    input_mask: np.ndarray
    scored: np.ndarray
    """Flat indices into ``inputs`` of the scored positions, padded with index 0."""
    targets: np.ndarray
    """The token each scored position predicts."""
    real: np.ndarray
    """Which entries of ``scored`` are real rather than padding."""
    members: list[int]
    """Index into the unique requests of each real row, in row order."""


def _groups(unique: Sequence[Scored]) -> list[tuple[tuple[int, ...], list[int]]]:
    """Requests by shared prefix, longest padded shapes first (memory errors show early)."""
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for index, scored in enumerate(unique):
        by_prefix.setdefault(scored.prefix, []).append(index)
    groups = list(by_prefix.items())
    longest = {p: max(len(unique[i].inputs) for i in members) for p, members in groups}
    groups.sort(key=lambda g: (-bucket(len(g[0])), -bucket(longest[g[0]]), g[0]))
    return groups


def _pack(
    unique: Sequence[Scored],
    groups: list[tuple[tuple[int, ...], list[int]]],
    row_cap: int,
    pad_id: int,
) -> _Batch:
    """One padded batch of the given groups (their members fill at most ``row_cap`` rows)."""
    width_p = bucket(max(len(p) for p, _ in groups))
    width_t = bucket(max(len(unique[i].inputs) for _, m in groups for i in m))
    n_groups = bucket(len(groups))
    prefix = np.full((n_groups, width_p), pad_id, np.int32)
    prefix_mask = np.zeros((n_groups, width_p), bool)
    rows = np.zeros(row_cap, np.int32)
    inputs = np.full((row_cap, width_t), pad_id, np.int32)
    input_mask = np.zeros((row_cap, width_t), bool)
    n_scored = sum(len(unique[i].targets) for _, m in groups for i in m)
    scored = np.zeros(_scored_width(n_scored, row_cap * width_t), np.int32)
    targets = np.zeros(len(scored), np.int32)
    members: list[int] = []
    filled = 0
    for g, (tokens, group) in enumerate(groups):
        if tokens:
            prefix[g, width_p - len(tokens) :] = tokens
            prefix_mask[g, width_p - len(tokens) :] = True
        for index in group:
            r, request = len(members), unique[index]
            rows[r] = g
            inputs[r, : len(request.inputs)] = request.inputs
            input_mask[r, : len(request.inputs)] = True
            end = filled + len(request.targets)
            scored[filled:end] = r * width_t + np.arange(len(request.targets))
            targets[filled:end] = request.targets
            filled = end
            members.append(index)
    real = np.arange(len(scored)) < filled
    return _Batch(prefix, prefix_mask, rows, inputs, input_mask, scored, targets, real, members)


def _scored_width(n_scored: int, capacity: int) -> int:
    """Padded count of scored positions: ``bucket``'s steps, never more than the batch's
    ``capacity`` positions (which a bucket past 2048 can exceed)."""
    return min(bucket(n_scored), capacity)


def _batches(
    unique: Sequence[Scored], batch_size: int, pad_id: int
) -> Iterator[tuple[_Batch, int]]:
    """Padded batches and their real row counts, covering every unique request once."""
    budget = batch_size * _TOKENS_PER_ROW

    def row_cap(width_p: int, width_t: int) -> int:
        return min(batch_size, _floor_pow2(max(1, budget // (width_p + width_t))))

    chosen: list[tuple[tuple[int, ...], list[int]]] = []
    rows = width_p = width_t = 0
    for prefix, members in _groups(unique):
        group_p = bucket(len(prefix))
        group_t = bucket(max(len(unique[i].inputs) for i in members))
        alone = row_cap(group_p, group_t)
        for start in range(0, len(members), alone):
            part = members[start : start + alone]
            new_p, new_t = max(width_p, group_p), max(width_t, group_t)
            if chosen and rows + len(part) > row_cap(new_p, new_t):
                yield _pack(unique, chosen, row_cap(width_p, width_t), pad_id), rows
                chosen, rows, new_p, new_t = [], 0, group_p, group_t
            chosen.append((prefix, part))
            rows += len(part)
            width_p, width_t = new_p, new_t
    if chosen:
        yield _pack(unique, chosen, row_cap(width_p, width_t), pad_id), rows


def _shape(batch: _Batch) -> Shape:
    """(groups, prefix width, rows, input width, scored positions)."""
    return (*batch.prefix.shape, *batch.inputs.shape, len(batch.scored))


def _cost(config: ModelConfig, shape: Shape) -> int:
    """Multiply-adds of a batch: the blocks over every padded token, lm_head over the scored."""
    groups, width_p, rows, width_t, n_scored = shape
    per_token = config.n_layers * (4 * config.d_model**2 + 2 * config.d_model * config.d_ff)
    return (
        per_token * (groups * width_p + rows * width_t)
        + n_scored * config.d_model * config.vocab_size
    )


def _widen(batch: _Batch, shape: Shape, pad_id: int) -> _Batch:
    """``batch`` padded to the larger ``shape``: prefix columns on the left (prefixes are
    left-padded), input columns on the right, rows and scored entries at the end."""
    groups, width_p, rows, width_t, n_scored = shape
    old_g, old_p = batch.prefix.shape
    old_r, old_t = batch.inputs.shape
    prefix = np.full((groups, width_p), pad_id, np.int32)
    prefix_mask = np.zeros((groups, width_p), bool)
    prefix[:old_g, width_p - old_p :] = batch.prefix
    prefix_mask[:old_g, width_p - old_p :] = batch.prefix_mask
    inputs = np.full((rows, width_t), pad_id, np.int32)
    input_mask = np.zeros((rows, width_t), bool)
    inputs[:old_r, :old_t] = batch.inputs
    input_mask[:old_r, :old_t] = batch.input_mask
    scored = np.zeros(n_scored, np.int32)
    scored[: len(batch.scored)] = batch.scored // old_t * width_t + batch.scored % old_t
    return _Batch(
        prefix,
        prefix_mask,
        np.pad(batch.rows, (0, rows - old_r)),
        inputs,
        input_mask,
        scored,
        np.pad(batch.targets, (0, n_scored - len(batch.targets))),
        np.pad(batch.real, (0, n_scored - len(batch.real))),
        batch.members,
    )


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


class JaxLM:
    """Scores lm-eval-style requests with our Flax model (no PyTorch)."""

    def __init__(
        self,
        config: ModelConfig,
        params: Params,
        tokenizer: Tokenizer,
        batch_size: int = 32,
        max_length: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be positive")
        self.config = config
        self.params = jax.device_put(params)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = config.max_len if max_length is None else max_length
        self.prefix_token = tokenizer.eos_id

    @classmethod
    def from_train_output(
        cls, train_uri: str, tokenizer: Tokenizer, step: int | None = None, **kwargs: object
    ) -> JaxLM:
        """The train stage's checkpoint at ``step`` (the latest if None); ``ModelFormatError``
        (``ConvertError``) names the train output and the first tensor whose shape the model
        config does not expect."""
        return cls(*load_params(train_uri, step, label=train_uri), tokenizer, **kwargs)

    @classmethod
    def from_hf_dir(cls, directory: str, **kwargs: object) -> JaxLM:
        """A Hugging Face export (``stages.convert.export_hf``) with its tokenizer files."""
        params, config = import_hf(directory)
        return cls(config, params, hf_dir_tokenizer(directory), **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(summed log-prob of the continuation, whether greedy decoding gives it) per
        (context, continuation), as the harness's ``loglikelihood``."""
        scored = []
        for context, continuation in requests:
            pair = encode_pair(self.encode, self.prefix_token, context, continuation)
            scored.append(split_prefix(*pair, self.max_length))
        return self.score(scored)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text over disjoint windows, as the harness's
        ``loglikelihood_rolling``."""
        owners: list[int] = []
        scored: list[Scored] = []
        for index, text in enumerate(texts):
            for window in rolling_windows(self.encode(text), self.prefix_token, self.max_length):
                scored.append(split_prefix(*window, self.max_length))
                owners.append(index)
        totals = [0.0] * len(texts)
        for owner, (logprob, _) in zip(owners, self.score(scored), strict=True):
            totals[owner] += logprob
        return totals

    def score(self, requests: Sequence[Scored]) -> list[tuple[float, bool]]:
        """(summed target log-prob, all targets greedy) per request; duplicates run once."""
        index_of: dict[Scored, int] = {}
        for scored in requests:
            index_of.setdefault(scored, len(index_of))
        unique = list(index_of)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(unique)
        batches = list(_batches(unique, self.batch_size, self.prefix_token))
        cost = partial(_cost, self.config)
        shapes = run_shapes([_shape(batch) for batch, _ in batches], cost)
        with PhaseBar(len(unique), "requests", "loglikelihood", min_bar=64) as bar:
            for (batch, real), shape in zip(batches, shapes, strict=True):
                if shape != _shape(batch):
                    batch = _widen(batch, shape, self.prefix_token)
                sums, greedy = _score(
                    self.config,
                    self.params,
                    batch.prefix,
                    batch.prefix_mask,
                    batch.rows,
                    batch.inputs,
                    batch.input_mask,
                    batch.scored,
                    batch.targets,
                    batch.real,
                )
                sums, greedy = np.asarray(sums), np.asarray(greedy)
                for row, index in enumerate(batch.members):
                    results[index] = (float(sums[row]), bool(greedy[row]))
                bar.update(real)
        return [results[index_of[scored]] for scored in requests]


def hf_dir_tokenizer(directory: str) -> Tokenizer:
    """The tokenizer of a Hugging Face export (local or ``gs://``): its ``tokenizer.json``,
    read by our engine as described by our descriptor when present, else with EOS from
    ``config.json`` (``export_hf`` copies the tokenize stage's HF files only)."""
    files = {
        name: storage.read_bytes(storage.join(directory, name))
        for name in (DESCRIPTOR, HF_TOKENIZER, RANKS)
        if storage.exists(storage.join(directory, name))
    }
    if HF_TOKENIZER not in files:
        raise TokenizerError(f"{directory}: no {HF_TOKENIZER}")
    if DESCRIPTOR not in files:
        hf_config = json.loads(storage.read_bytes(storage.join(directory, CONFIG)))
        eos_id = hf_config.get("bos_token_id", hf_config.get("eos_token_id"))
        if eos_id is None:
            raise TokenizerError(f"{directory}/{CONFIG}: no bos_token_id or eos_token_id")
        spec = json.loads(files[HF_TOKENIZER])
        ids = [*spec["model"]["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))]
        descriptor = {
            "kind": "hf",
            "engine": "hf",
            "eos_id": int(eos_id),
            "vocab_size": max(ids) + 1,
        }
        files[DESCRIPTOR] = json.dumps(descriptor).encode()
    return Tokenizer.from_files(files, directory)
