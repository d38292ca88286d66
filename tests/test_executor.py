"""The executor on a real local Ray cluster and a real MLflow store, with toy stages:
planning, fingerprints, skip/reuse, --force, STALE, failure and resume, leases, restarts."""

from __future__ import annotations

import json
import os

import mlflow
import pytest

from pipeline import executor, lineage, plan
from pipeline.config import ConfigError, load_config, validate
from pipeline.ledger import Ledger
from pipeline.status import (
    RUNNING,
    SUCCESS,
    Lease,
    StageBusy,
    Status,
    read_status,
    write_status,
)

TOY = {"name": "toy", "stage_modules": ["tests.toystages"]}


def toy_config(root, numbers=None, total=None, **top):
    data = {**TOY, "root": str(root), **top}
    data["stages"] = {"numbers": numbers or {}, "total": total or {}}
    return validate(data)


def run(config, stages=(), force=False):
    return executor.run_pipeline(config, list(stages), force, "test")


def states(config):
    return {r.stage: r.state for r in plan.report(config)}


def test_the_compilation_cache_is_under_the_root_unless_placed_or_turned_off(tmp_path):
    assert toy_config(tmp_path).resolved_compilation_cache() == str(tmp_path / "compilation-cache")
    elsewhere = toy_config(tmp_path, compilation_cache="/var/cache/jax")
    assert elsewhere.resolved_compilation_cache() == "/var/cache/jax"
    assert toy_config(tmp_path, compilation_cache=None).resolved_compilation_cache() is None
    on_gcs = toy_config(tmp_path, compilation_cache="gs://bucket/cache")
    assert on_gcs.resolved_compilation_cache() == "gs://bucket/cache"


def test_config_errors_name_the_key_path(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: toy\nstage_modules: [tests.toystages]\nstages:\n  numbers: {units: 2}\n")
    assert load_config(str(path), ["stages.numbers.units=4"]).stages["numbers"].units == 4
    with pytest.raises(ConfigError, match=r"p.yaml: stages.numbers.unitz: Extra inputs"):
        load_config(str(path), ["stages.numbers.unitz=4"])
    with pytest.raises(ConfigError, match=r"stages.numbers.units: Input should be a valid integer"):
        load_config(str(path), ["stages.numbers.units=many"])
    with pytest.raises(ConfigError, match=r"p.yaml: lease_seconds: Input should be greater"):
        load_config(str(path), ["lease_seconds=0"])
    with pytest.raises(ConfigError, match=r"stages.bogus: unknown stage"):
        load_config(str(path), ["stages.bogus.x=1"])
    with pytest.raises(ConfigError, match=r"stages.total: needs stage 'numbers'"):
        validate({**TOY, "stages": {"total": {}}})
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(str(path), ["units"])
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"p.yaml: not valid YAML"):
        load_config(str(path))


def test_fingerprints_follow_config_and_upstream(tmp_path):
    base = plan.plan(toy_config(tmp_path))
    scaled = plan.plan(toy_config(tmp_path, total={"scale": 3}))
    more = plan.plan(toy_config(tmp_path, numbers={"units": 4}))
    volatile = plan.plan(toy_config(tmp_path, numbers={"offset": 7}))
    assert base["numbers"].fingerprint == scaled["numbers"].fingerprint
    assert base["total"].fingerprint != scaled["total"].fingerprint
    assert base["numbers"].fingerprint != more["numbers"].fingerprint
    assert base["total"].fingerprint != more["total"].fingerprint
    assert base == volatile
    assert base["total"].output == str(tmp_path / f"total-{base['total'].fingerprint}")
    assert plan.select(base, ["numbers"]) == ["numbers"]
    assert plan.select(base, ["total"]) == ["numbers", "total"]
    with pytest.raises(ConfigError, match="--stage nope: no such stage; this config has numbers"):
        plan.select(base, ["nope"])


def read_total(config):
    out = plan.plan(config)["total"].output
    return int(open(os.path.join(out, "total.txt")).read())


def test_run_reuse_force_and_stale(ray_cluster, tmp_path):
    config = toy_config(tmp_path, total={"scale": 2})
    assert states(config) == {"numbers": "PENDING", "total": "PENDING"}
    first = run(config)
    assert not first["numbers"].reused and not first["total"].reused
    assert read_total(config) == 2 * sum(range(15))
    assert states(config) == {"numbers": "DONE", "total": "DONE"}

    again = run(config)
    assert again["numbers"].reused and again["total"].reused
    assert again["total"].upstream.digest == first["total"].upstream.digest

    forced = run(config, ["numbers"], force=True)
    assert list(forced) == ["numbers"] and not forced["numbers"].reused
    assert forced["numbers"].run_id != first["numbers"].run_id
    assert forced["numbers"].upstream.digest == first["numbers"].upstream.digest
    assert states(config)["total"] == "DONE"

    changed = toy_config(tmp_path, numbers={"offset": 1}, total={"scale": 2})
    run(changed, ["numbers"], force=True)
    report = {r.stage: r for r in plan.report(changed)}
    assert report["total"].state == "STALE" and "numbers" in report["total"].detail
    rerun = run(changed)
    assert rerun["numbers"].reused and not rerun["total"].reused
    assert read_total(changed) == 2 * sum(range(1, 16))
    assert states(changed) == {"numbers": "DONE", "total": "DONE"}


def test_failure_keeps_committed_units_and_resumes(ray_cluster, tmp_path):
    failing = toy_config(tmp_path, numbers={"fail_unit": 1})
    results = run(failing)
    assert isinstance(results["numbers"], BaseException)
    assert "unit part-01 failed on purpose" in str(results["numbers"])
    assert isinstance(results["total"], BaseException)
    assert states(failing) == {"numbers": "FAILED", "total": "PENDING"}
    output = plan.plan(failing)["numbers"].output
    ledger = Ledger(output)
    assert [r["name"] for r in ledger.records()] == ["part-00"]
    committed_at = ledger.record("part-00")["committed_at"]
    assert "failed on purpose" in read_status(output).error

    results = run(toy_config(tmp_path))
    assert results["numbers"].metrics["units_written"] == 2
    assert ledger.record("part-00")["committed_at"] == committed_at
    assert read_total(failing) == sum(range(15))


def run_interrupted_at_unit_2(tmp_path, knob: str, marker: str):
    """Four ``numbers`` units interrupted once before unit 2 by ``knob`` (which leaves
    ``marker``): units 0 and 1 were committed before and kept, 2 and 3 written after, in the
    same run. Returns the config."""
    config = toy_config(tmp_path, numbers={"units": 4, knob: 2})
    results = run(config)
    output = plan.plan(config)["numbers"].output
    assert os.path.exists(os.path.join(output, marker))
    assert results["numbers"].metrics["units_written"] == 2
    assert read_total(config) == sum(range(20))
    return config


def test_a_node_lost_under_a_stage_is_resumed_in_the_same_run(ray_cluster, tmp_path):
    config = run_interrupted_at_unit_2(tmp_path, "lose_node_at_unit", "node-lost-once")
    assert states(config) == {"numbers": "DONE", "total": "DONE"}


def test_killed_actor_is_restarted_and_resumes(ray_cluster, tmp_path):
    config = run_interrupted_at_unit_2(tmp_path, "die_at_unit", "died-once")
    client = mlflow.MlflowClient(config.resolved_tracking_uri())
    runs = client.search_runs(
        [client.get_experiment_by_name("toy").experiment_id],
        "tags.`meshline.stage` = 'numbers'",
    )
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


def test_a_fresh_output_is_leased_once(tmp_path):
    first = Lease(str(tmp_path), "one", 60).acquire()
    with pytest.raises(StageBusy, match="is being produced by pid"):
        Lease(str(tmp_path), "two", 60).acquire()
    first.release(SUCCESS)
    assert read_status(str(tmp_path)).invocation == "one"
    Lease(str(tmp_path), "three", 60).acquire().release(SUCCESS)
    assert read_status(str(tmp_path)).invocation == "three"


def test_leases(ray_cluster, tmp_path):
    config = toy_config(tmp_path)
    output = plan.plan(config)["numbers"].output
    write_status(output, Status(RUNNING, "someone-else", pid=os.getpid()))
    results = run(config, ["numbers"])
    assert isinstance(results["numbers"], BaseException)
    assert "is being produced by pid" in str(results["numbers"])
    assert states(config)["numbers"] == "RUNNING"
    with pytest.raises(StageBusy):
        Lease(output, "me", 60).acquire()

    dead = Status(RUNNING, "crashed", pid=2**22 + 12345)
    write_status(output, dead)
    assert states(config)["numbers"] == "PENDING"
    results = run(config, ["numbers"])
    assert read_status(output).state == SUCCESS

    write_status(output, Status(RUNNING, "remote", host="elsewhere", heartbeat=0.0))
    short = toy_config(tmp_path, lease_seconds=5)
    assert states(short)["numbers"] == "PENDING"
    assert not isinstance(run(short, ["numbers"], force=True)["numbers"], BaseException)


def test_lineage_in_mlflow(ray_cluster, tmp_path):
    config = toy_config(tmp_path, total={"scale": 5})
    first = run(config)
    second = run(config)
    mlflow.set_tracking_uri(config.resolved_tracking_uri())
    experiment = mlflow.get_experiment_by_name("toy")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)

    totals = mlflow.search_runs(
        [experiment.experiment_id], "tags.`meshline.stage` = 'total'", output_format="list"
    )
    produced = next(r for r in totals if r.info.run_id == first["total"].run_id)
    assert produced.data.params["scale"] == "5"
    assert produced.data.metrics["total"] == 5 * sum(range(15))
    assert produced.data.tags[lineage.TAG_FINGERPRINT] == plan.plan(config)["total"].fingerprint
    assert produced.data.tags[lineage.TAG_OUTPUT] == plan.plan(config)["total"].output
    assert produced.data.tags[lineage.TAG_DIGEST] == first["total"].upstream.digest
    [dataset_input] = produced.inputs.dataset_inputs
    upstream = first["numbers"].upstream
    assert dataset_input.dataset.digest == upstream.digest[: lineage.MLFLOW_DIGEST_CHARS]
    assert json.loads(dataset_input.dataset.source)["uri"] == upstream.uri
    assert json.loads(dataset_input.dataset.profile)["digest"] == upstream.digest

    reused = next(r for r in totals if r.info.run_id == second["total"].run_id)
    assert reused.data.tags[lineage.TAG_REUSED] == "true"
    assert reused.data.tags[lineage.TAG_REUSED_FROM] == first["total"].run_id
    parent_of_reused = reused.data.tags["mlflow.parentRunId"]
    assert parent_of_reused in {p.info.run_id for p in parents}


def test_params_redact_credentials():
    flat = lineage.flatten(
        {"sources": ["https://user:hunter2@host/a?sig=abc"], "auth": {"api_key": "k1"}, "n": 3}
    )
    assert "hunter2" not in json.dumps(flat) and "sig=abc" not in json.dumps(flat)
    assert flat["auth.api_key"] == "***" and flat["n"] == "3"
    nested = lineage.redact({"sources": ["https://user:hunter2@host/a"], "auth": {"token": "t"}})
    assert nested == {"sources": ["https://***@host/a"], "auth": {"token": "***"}}


def test_independent_stages_run_at_the_same_time(ray_cluster, tmp_path):
    config = validate(
        {
            **TOY,
            "root": str(tmp_path),
            "stages": {"ping": {"partner": "pong"}, "pong": {"partner": "ping"}},
        }
    )
    results = run(config)
    assert all(isinstance(r, executor.Outcome) for r in results.values()), results
