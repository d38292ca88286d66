"""lm-evaluation-harness request semantics, as token ids: nothing here runs the model.

- ``encode_pair``: a (context, continuation) pair as the harness's HF backend encodes it:
  trailing context spaces move to the continuation, the whole string is encoded and split at
  ``len(encode(context))``, and an empty context becomes the prefix token (EOS), or, when the
  continuation already starts with it, the continuation's first token.
- ``model_input``: the tokens the model reads for a request (context + continuation cut from
  the left to ``max_length + 1`` tokens, last one dropped) and how many trailing positions
  score the continuation.
- ``rolling_windows``: the disjoint windows ``loglikelihood_rolling`` scores a document by
  (``lm_eval.utils.get_rolling_token_windows`` with ``context_len=1`` and
  ``make_disjoint_window``): the first window has the prefix token as context, every token
  is predicted exactly once.
- ``Scored`` / ``split_prefix``: a request cut into the input before its scored positions
  (shared by every choice of a multiple-choice question, so it is run through the model
  once) and the input at them.
- ``bucket``: the padded length of a sequence, from a short fixed list, so jit compiles a
  few shapes only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Encode = Callable[[str], list[int]]

# Powers of two, with 1.5x steps between them from 16 on: padding wastes at most a third.
_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def encode_pair(
    encode: Encode, prefix_token: int, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Context and continuation ids of one loglikelihood request, as the harness makes them."""
    if not context:
        ids = encode(continuation)
        if ids and ids[0] == prefix_token:
            return ids[:1], ids[1:]
        return [prefix_token], ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids) :]


def model_input(context: Sequence[int], continuation: Sequence[int], max_length: int) -> list[int]:
    """What the model reads: the pair cut from the left to ``max_length + 1``, last dropped."""
    if not continuation:
        raise ValueError("a loglikelihood request needs a non-empty continuation")
    if len(continuation) > max_length:
        raise ValueError(
            f"continuation of {len(continuation)} tokens exceeds max_length {max_length}"
        )
    return [*context, *continuation][-(max_length + 1) :][:-1]


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows covering ``tokens``, each token predicted once."""
    windows: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return windows
    first = min(max_length, len(tokens))
    windows.append(([prefix_token], list(tokens[:first])))
    predicted = first
    while predicted < len(tokens):
        end = min(len(tokens), predicted + max_length)
        # The input is always max_length long: a short last window gets a longer context.
        windows.append(
            (list(tokens[end - max_length - 1 : predicted]), list(tokens[predicted:end]))
        )
        predicted = end
    return windows


@dataclass(frozen=True)
class Scored:
    """A request as the model sees it: it reads ``prefix + inputs``, and the logits at the
    ``inputs`` positions predict ``targets`` (as many as ``inputs``)."""

    prefix: tuple[int, ...]
    """Input before the scored positions; choices of one question share it."""
    inputs: tuple[int, ...]
    """The last context token, then the continuation tokens but the last."""
    targets: tuple[int, ...]
    """The continuation tokens."""


def split_prefix(context: Sequence[int], continuation: Sequence[int], max_length: int) -> Scored:
    """The request split where its scored positions start, after harness truncation."""
    tokens = model_input(context, continuation, max_length)
    cut = len(tokens) - len(continuation)
    return Scored(tuple(tokens[:cut]), tuple(tokens[cut:]), tuple(continuation))


def bucket(length: int) -> int:
    """The padded length of a sequence of ``length`` tokens (or of a count of rows)."""
    for size in _BUCKETS:
        if size >= length:
            return size
    return -(-length // _BUCKETS[-1]) * _BUCKETS[-1]
