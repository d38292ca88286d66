"""Many small jobs as Ray tasks: a bounded number in flight, a progress bar, and node pinning.

A stage that fans out over files or partitions (download's files, dedup's units) runs each as a
Ray task through ``run_tasks``. At most ``concurrency`` tasks are in flight, so a stage with
thousands of units neither floods the scheduler nor holds thousands of results at once.

A unit's files go to the stage's output directory. On ``gs://``, or on a filesystem every node
mounts (``shared_filesystem``), any node may write them; on a local disk only the node that
holds the directory can, so ``Placement.for_output`` pins the tasks (and Ray Data operators) to
the stage actor's node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import storage
from pipeline.progress import PhaseBar

NODE_ID_LABEL = "ray.io/node-id"
"""The label Ray gives every node with its id."""


@dataclass(frozen=True)
class Placement:
    """Where file-writing work may run: anywhere, or on the one node whose local disk holds
    the output directory."""

    node_id: str | None = None

    @classmethod
    def for_output(cls, output: str, shared_filesystem: bool = False) -> Placement:
        """Anywhere for a ``gs://`` output or a filesystem all nodes share, else this node."""
        if storage.is_gcs(output) or shared_filesystem:
            return cls()
        return cls(ray.get_runtime_context().get_node_id())

    def task_options(self) -> dict[str, Any]:
        if self.node_id is None:
            return {}
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(self.node_id, soft=False)}

    def data_options(self) -> dict[str, Any]:
        """For Ray Data operators, which take a node label rather than a strategy."""
        return {} if self.node_id is None else {"label_selector": {NODE_ID_LABEL: self.node_id}}


@dataclass(frozen=True)
class TaskOutcome:
    """One finished call: its index in the calls, and its result or the Ray error it raised."""

    index: int
    result: Any = None
    error: RayError | None = None


def run_tasks(
    fn: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    *,
    concurrency: int,
    desc: str,
    unit: str = "unit",
    num_cpus: float = 1,
    placement: Placement = Placement(),
    postfix: Callable[[list[Any]], str] | None = None,
) -> Iterator[TaskOutcome]:
    """Run ``fn(*call)`` for every call as a Ray task, at most ``concurrency`` in flight, and
    yield each outcome as it finishes (in completion order). A failed call is yielded with its
    error and does not stop the others. ``postfix(results)`` may turn the results so far into
    text for the bar (a running byte count)."""
    task = ray.remote(fn).options(num_cpus=num_cpus, **placement.task_options())
    waiting = list(enumerate(calls))
    running: dict[ray.ObjectRef, int] = {}
    finished: list[Any] = []
    # One bar per phase: a stage actor's stderr is a log file, where stacked bars turn into
    # cursor-movement noise.
    with PhaseBar(len(calls), unit, desc) as bar:
        while waiting or running:
            while waiting and len(running) < concurrency:
                index, call = waiting.pop(0)
                running[task.remote(*call)] = index
            done, _ = ray.wait(list(running), num_returns=1)
            index = running.pop(done[0])
            try:
                outcome = TaskOutcome(index, result=ray.get(done[0]))
            except RayError as error:
                outcome = TaskOutcome(index, error=error)
            else:
                finished.append(outcome.result)
                if postfix is not None:
                    bar.set_postfix(postfix(finished))
            bar.update(1)
            yield outcome


def run_all(
    fn: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    unwrap: tuple[type[Exception], ...] = (),
    **options: Any,
) -> list[Any]:
    """``run_tasks`` for calls that must all succeed: results in call order. A failure
    raises once every other call has finished (their work, committed units, is kept for the
    rerun): the first failed call's error, a task's exception of a type in ``unwrap``
    (errors whose message names the bad input) as itself, without Ray's traceback wrapper."""
    results: list[Any] = [None] * len(calls)
    failures: dict[int, RayError] = {}
    for outcome in run_tasks(fn, calls, **options):
        if outcome.error is None:
            results[outcome.index] = outcome.result
        else:
            failures[outcome.index] = outcome.error
    if failures:
        error = failures[min(failures)]
        cause = error.cause if isinstance(error, RayTaskError) else None
        if isinstance(cause, unwrap):
            raise type(cause)(str(cause)) from None
        raise error
    return results
