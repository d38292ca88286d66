"""Which padded shapes a task compiles: a shape that recurs too rarely to pay for its own
compile runs padded to a larger shape the task already compiled."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

Shape = tuple[int, ...]

COMPILE_IN_RUNS = 1
"""What a shape's compile is taken to cost, in runs of that shape's program. A cold compile
costs more (on CPU, for the 34M model of ``benchmarks/evaluate.py``, ~0.75 s against a
batch's ~0.15 s; on an accelerator far more runs), but a warm compilation cache loads it for
almost nothing, so padding never more than doubles a shape's work. Measured there: 1 keeps
the warm large tasks at ~2x lm-eval's documents/s and the small ``--harness`` set cold
faster than lm-eval's ``hf``; 4 (in runs of the larger shape) lost half the warm speed."""


def run_shapes(shapes: Sequence[Shape], cost: Callable[[Shape], float]) -> list[Shape]:
    """The shape each run uses, given every run's own shape (largest first): its own, or the
    cheapest larger one already chosen when padding all of the task's runs of its shape up to
    that one costs no more than ``COMPILE_IN_RUNS`` runs of its own. So a small task compiles a few
    shapes, and a large one runs each shape it has often at its own size."""
    chosen: dict[Shape, Shape] = {}
    compiled: list[Shape] = []
    for shape, count in Counter(shapes).items():
        larger = [(cost(c), c) for c in compiled if _holds(c, shape)]
        best = min(larger, default=None)
        if best is not None and count * (best[0] - cost(shape)) <= COMPILE_IN_RUNS * cost(shape):
            chosen[shape] = best[1]
        else:
            chosen[shape] = shape
            compiled.append(shape)
    return [chosen[shape] for shape in shapes]


def _holds(larger: Shape, shape: Shape) -> bool:
    return all(a >= b for a, b in zip(larger, shape, strict=True))
