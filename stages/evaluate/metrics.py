"""Task metrics and their standard errors, computed as lm-evaluation-harness computes them.

- multiple choice: ``acc`` is the argmax of the summed log-likelihoods (first on ties, as
  ``np.argmax``), ``acc_norm`` the argmax of log-likelihood / character length of the choice;
  stderr of a mean is the sample standard deviation / sqrt(n).
- loglikelihood (LAMBADA): ``perplexity`` = exp(-mean ll) with the harness's bootstrap
  stderr, reproduced draw for draw (``random.Random(i).choices`` for chunk i of 1000
  resamples, replayed with numpy from the same Mersenne Twister state); ``acc`` = greedy.
- rolling loglikelihood: ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` from
  corpus-level sums of log-likelihoods, words and bytes; the harness gives them no stderr.

Keys are the harness's: ``"{metric},none"`` and ``"{metric}_stderr,none"``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_ITERS = 100_000
_BOOTSTRAP_CHUNK = 1000


def key(metric: str) -> str:
    """The harness's result key of a metric under the default (no) filter."""
    return f"{metric},none"


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation / sqrt(n): the harness's stderr of a mean."""
    array = np.asarray(values, np.float64)
    return float(np.std(array, ddof=1) / math.sqrt(len(array)))


def with_mean_stderr(metric: str, values: Sequence[float]) -> dict[str, float]:
    """The mean of per-document values and, for two or more, its stderr."""
    result = {key(metric): float(np.mean(values))}
    if len(values) > 1:
        result[key(f"{metric}_stderr")] = mean_stderr(values)
    return result


def _perplexity(lls: np.ndarray) -> np.ndarray:
    """exp(-mean) of each row."""
    return np.exp(-lls.mean(axis=-1))


def bootstrap_perplexity_stderr(lls: Sequence[float], iters: int = BOOTSTRAP_ITERS) -> float:
    """The harness's bootstrap stderr of ``perplexity``, with the same resamples."""
    values = np.asarray(lls, np.float64)
    n = len(values)
    chunk = min(_BOOTSTRAP_CHUNK, iters)
    replicates = []
    for seed in range(iters // chunk):
        state = random.Random(seed).getstate()[1]
        twister = np.random.RandomState()
        twister.set_state(("MT19937", np.asarray(state[:624], np.uint32), state[624]))
        # random.choices draws floor(random() * n) per element, one double per draw.
        picks = np.floor(twister.random_sample((chunk, n)) * float(n)).astype(np.int64)
        replicates.append(_perplexity(values[picks]))
    return float(np.std(np.concatenate(replicates), ddof=1))


def multiple_choice(
    lls: Sequence[Sequence[float]],
    lengths: Sequence[Sequence[float]],
    golds: Sequence[int],
    metrics: Sequence[str],
) -> dict[str, float]:
    """``acc`` / ``acc_norm`` (as listed in ``metrics``) with stderr, per-document inputs:
    choice log-likelihoods, choice character lengths, gold index."""
    acc = [float(np.argmax(ll) == gold) for ll, gold in zip(lls, golds, strict=True)]
    norm = [
        float(np.argmax(np.asarray(ll) / np.asarray(length)) == gold)
        for ll, length, gold in zip(lls, lengths, golds, strict=True)
    ]
    result = with_mean_stderr("acc", acc)
    if "acc_norm" in metrics:
        result.update(with_mean_stderr("acc_norm", norm))
    return result


def loglikelihood(
    lls: Sequence[float], greedy: Sequence[bool], bootstrap_iters: int = BOOTSTRAP_ITERS
) -> dict[str, float]:
    """LAMBADA's ``perplexity`` and ``acc`` with their stderrs."""
    result = {key("perplexity"): float(_perplexity(np.asarray(lls, np.float64)))}
    if len(lls) > 1 and bootstrap_iters > 0:
        result[key("perplexity_stderr")] = bootstrap_perplexity_stderr(lls, bootstrap_iters)
    result.update(with_mean_stderr("acc", [float(g) for g in greedy]))
    return result


def count_words(text: str) -> int:
    """Words as the harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def rolling(lls: Sequence[float], texts: Sequence[str]) -> dict[str, float]:
    """Corpus-level word/byte perplexity and bits per byte of whole documents."""
    total = float(np.sum(np.asarray(lls, np.float64)))
    words = sum(count_words(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        key("word_perplexity"): math.exp(-total / words),
        key("byte_perplexity"): math.exp(-total / n_bytes),
        key("bits_per_byte"): -total / n_bytes / math.log(2),
    }
