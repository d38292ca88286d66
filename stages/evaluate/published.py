"""Published zero-shot numbers printed beside ours: GPT-J-6B and GPT-3 Curie.

Both rows come from the zero-shot table of the mesh-transformer-jax README (GPT-J-6B's
release), where every number was produced with lm-evaluation-harness; REFERENCE.md §3 holds
GPT-J's. The README gives one accuracy per task; it is filed under the metric the harness
reports it as: ``acc_norm`` for HellaSwag (length-normalised, as the GPT-3 paper scored it),
``acc`` for the others.
"""

from __future__ import annotations

from collections.abc import Mapping

GPTJ_6B = "GPT-J-6B"
GPT3_CURIE = "GPT-3 Curie"

PUBLISHED: Mapping[str, Mapping[str, Mapping[str, float]]] = {
    GPTJ_6B: {
        "lambada_openai": {"perplexity": 3.99, "acc": 0.697},
        "winogrande": {"acc": 0.653},
        "hellaswag": {"acc_norm": 0.661},
        "piqa": {"acc": 0.765},
    },
    GPT3_CURIE: {
        "lambada_openai": {"perplexity": 4.00, "acc": 0.693},
        "winogrande": {"acc": 0.656},
        "hellaswag": {"acc_norm": 0.685},
        "piqa": {"acc": 0.779},
    },
}
"""Model -> task -> metric (without lm-eval's ``,none`` filter suffix) -> value."""


def published(model: str, task: str, metric: str) -> float | None:
    """The published value, or None where the model's table has none."""
    return PUBLISHED[model].get(task, {}).get(metric)
