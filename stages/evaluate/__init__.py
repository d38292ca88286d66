"""The evaluate stage: zero-shot tasks scored as lm-evaluation-harness scores them, in JAX.

- ``config``: ``EvaluateConfig`` and its task, bits-per-byte, demo and samples specs.
- ``stage``: the registered stage (demo task files, held-out text, the run itself).
- ``models``: the models scored and sampled: the trained checkpoint and the initial model
  (read through ``stages.train.output``), or any train/convert output or Hugging Face export.
- ``scoring``: one model's tasks, each a ledger unit, the model loaded only if needed.
- ``report``: ``results.json`` in lm-eval's layout, flat scores, improvements, the table.
- ``harness``, ``lm``, ``tasks``, ``metrics``: the harness's request semantics (token ids
  only), the ``JaxLM`` that scores requests with our model, the tasks and their metrics.
- ``generation`` and ``columns``: greedy and nucleus continuations, and their side-by-side
  rendering; ``sample`` the ``meshline sample`` command built on them.
- ``lm_eval_model``: the adapter that registers our model with lm-eval itself.
- ``demo_tasks``: the demo's offline task files made from held-out text; ``published``:
  GPT-J-6B's and GPT-3 Curie's published numbers.

Importing this package registers the stage and stays light: JAX loads when the stage runs.
"""

from stages.evaluate import stage  # noqa: F401
