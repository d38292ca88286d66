"""Eval scores reach the registered model version whichever of convert (which registers the
version) and evaluate (which measures the scores) finishes first: the two run side by side."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline import lineage

SCORES = {"lambada.acc": 0.25, "choice.acc_norm": 0.5}
EXPECTED = {"meshline.score.lambada.acc": "0.25", "meshline.score.choice.acc_norm": "0.5"}


@pytest.fixture
def pipeline_run(tmp_path: Path) -> lineage.PipelineRun:
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = lineage.create_experiment(tracking, "scores", str(tmp_path / "artifacts"))
    return lineage.PipelineRun.start(tracking, experiment, "test", "meshline run")


def _train(run: lineage.PipelineRun, tmp_path: Path) -> str:
    with run.stage_run("train", "f0", str(tmp_path / "train"), {}, []) as train:
        return train.run_id


def _register(run: lineage.PipelineRun, tmp_path: Path, trained_by: str) -> str:
    with run.stage_run("convert", "f1", str(tmp_path / "convert"), {}, []) as convert:
        return convert.register_model(None, (tmp_path / "model").as_uri(), trained_by, {})


def _evaluate(
    run: lineage.PipelineRun, tmp_path: Path, trained_by: str, scores: dict[str, float]
) -> None:
    with run.stage_run("evaluate", "f2", str(tmp_path / "evaluate"), {}, []) as evaluate:
        evaluate.publish_scores(trained_by, scores)


@pytest.mark.parametrize("evaluated_first", [False, True])
def test_registered_version_carries_the_scores_of_its_training_run(
    pipeline_run: lineage.PipelineRun, tmp_path: Path, evaluated_first: bool
):
    trained_by = _train(pipeline_run, tmp_path)
    other = _train(pipeline_run, tmp_path)
    _evaluate(pipeline_run, tmp_path, other, {"lambada.acc": 0.75})
    if evaluated_first:
        _evaluate(pipeline_run, tmp_path, trained_by, SCORES)
        version = _register(pipeline_run, tmp_path, trained_by)
    else:
        version = _register(pipeline_run, tmp_path, trained_by)
        _evaluate(pipeline_run, tmp_path, trained_by, SCORES)
    client = MlflowClient(pipeline_run.tracking_uri)
    tags = client.get_model_version("scores", version).tags
    assert {k: v for k, v in tags.items() if k.startswith(lineage.SCORE_TAG)} == EXPECTED
    # A model no evaluation measured gets no scores.
    unscored = _register(pipeline_run, tmp_path, _train(pipeline_run, tmp_path))
    unscored_tags = client.get_model_version("scores", unscored).tags
    assert not [k for k in unscored_tags if k.startswith(lineage.SCORE_TAG)]
