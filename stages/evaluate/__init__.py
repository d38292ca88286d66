"""The evaluate stage: zero-shot tasks scored as lm-evaluation-harness scores them, in JAX.

`harness` holds the harness's request semantics (token ids only), `lm` the ``JaxLM`` that
scores requests with our model, `metrics` and `tasks` the tasks and their metrics,
`lm_eval_model` the adapter that registers our model with lm-eval itself, `demo_tasks` the
demo's offline task files made from held-out text, `published` GPT-J-6B's and GPT-3 Curie's
published numbers, `sample` the ``meshline sample`` command, and `stage` the pipeline stage.
Importing this package registers the stage and stays light: JAX loads when the stage runs.
"""

from stages.evaluate import stage  # noqa: F401
