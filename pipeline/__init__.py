"""The executor: it knows stages, never language models, and never imports ``stages``.

- ``config``: the typed pipeline config (YAML plus ``--set``), errors naming file and key.
- ``stage``: what a stage is (config, inputs, run function), its registry, ``StageContext``
  (what a stage gets: its output, ledger, upstream outputs with digest, run id and config).
- ``ledger``: units of work committed atomically, the resumable record of a stage's progress.
- ``status``: a stage output's status file and the lease its runner renews.
- ``executor``: plans the stage graph, reuses, resumes or redoes stages in Ray actors.
- ``tasks``: many small jobs as Ray tasks, bounded, with progress and node placement.
- ``raydata``: keeping Ray Data usable on a cluster whose nodes come and go.
- ``storage``: one API over local paths and ``gs://``.
- ``secrets``: credentials redacted from URLs and messages.
- ``lineage``: MLflow runs, inputs, metrics and registered models.
- ``cli`` and ``submit``: the ``meshline`` command and Ray Jobs submission.
"""
