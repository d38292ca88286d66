"""The executor: it knows stages, never language models, and never imports ``stages``.

- ``config``: the typed pipeline config (YAML plus ``--set``), errors naming file and key.
- ``stage``: what a stage is (config, inputs, run function), its registry, ``StageContext``
  (what a stage gets: its output, ledger, upstream outputs with digest, run id and config).
- ``ledger``: units of work committed atomically, the resumable record of a stage's progress.
- ``status``: a stage output's status file and the lease its runner renews.
- ``plan``: the stage graph, what is done, stale or pending (no Ray, no MLflow: fast).
- ``executor``: runs the plan, reusing, resuming or redoing stages in Ray actors.
- ``progress`` and ``console``: stages' progress reports and the driver's live display.
- ``logs``: console logging in every process, each stage's kept log.
- ``tasks``: many small jobs as Ray tasks, bounded, with progress and node placement.
- ``raydata``: keeping Ray Data usable on a cluster whose nodes come and go.
- ``storage``: one API over local paths and ``gs://``.
- ``loopback``: free ports on 127.0.0.1 for the servers a run starts.
- ``secrets``: credentials redacted from URLs and messages.
- ``lineage``: MLflow runs, inputs, metrics and registered models.
- ``cli`` and ``submit``: the ``meshline`` command and Ray Jobs submission.
"""
