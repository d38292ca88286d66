"""``meshline submit``: the same ``meshline run`` as a Ray job on a cluster.

The job ships meshline's own packages (``py_modules``) and a working directory holding
only the config file, so nothing else from the submitting machine travels; the
cluster's Python must already have meshline's dependencies (cluster/ installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shlex
import shutil
import tempfile
import time
from urllib.parse import urlsplit

from pipeline import storage
from pipeline.config import ConfigError, PipelineConfig
from pipeline.secrets import redact_url

CONFIG_NAME = "pipeline.yaml"
AGENT_WAIT_SECONDS = 120.0
NO_AGENT = "No available agent to submit job"


def job_entrypoint(config: PipelineConfig, args: argparse.Namespace) -> str:
    """The ``meshline run`` command line the job executes, with the resolved root."""
    argv = ["python", "-m", "pipeline.cli", "run", CONFIG_NAME]
    for override in [*args.overrides, f"root={config.root}"]:
        argv += ["--set", override]
    for stage in args.stages:
        argv += ["--stage", stage]
    if args.force:
        argv.append("--force")
    return shlex.join(argv)


def package_dirs(config: PipelineConfig) -> list[str]:
    """Source directories of meshline and of every top-level package naming stages."""
    top_level = dict.fromkeys(["pipeline", *(m.split(".")[0] for m in config.stage_modules)])
    return [os.path.dirname(importlib.import_module(name).__file__) for name in top_level]


LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def check_shared_storage(config: PipelineConfig, address: str) -> None:
    """Refuse a remote cluster with outputs or MLflow on this machine's disk: its stage
    actors run elsewhere and would write to their own disks, out of sight of each other."""
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host.startswith(LOOPBACK):
        return
    problems = []
    if not storage.is_gcs(config.root):
        problems.append(f"root={config.root} is a local path; use gs://BUCKET/PREFIX")
    tracking = config.tracking_uri or ""
    if not tracking.startswith(("http://", "https://")):
        where = tracking or "the default sqlite store under root"
        problems.append(f"tracking_uri is {where}; use an MLflow server, http(s)://HOST:PORT")
    if problems:
        raise ConfigError(
            f"{address} is a remote cluster: its nodes cannot share this machine's files.\n  "
            + "\n  ".join(problems)
        )


def submit(config: PipelineConfig, args: argparse.Namespace) -> int:
    check_shared_storage(config, args.address)
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray.job_submission import JobStatus, JobSubmissionClient

    # The Jobs client sends no token unless token mode is on in this process; turn it on
    # when this machine has the cluster's token (RAY_AUTH_MODE, if set, still decides).
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        client = JobSubmissionClient(args.address)
    except ConnectionError as error:
        where = redact_url(args.address)
        raise ConfigError(f"cannot reach a Ray dashboard at {where}: {error}") from None
    with tempfile.TemporaryDirectory(prefix="meshline-job-") as workdir:
        shutil.copy(args.config, os.path.join(workdir, CONFIG_NAME))
        job_id = _submit_when_agent_ready(
            client,
            entrypoint=job_entrypoint(config, args),
            runtime_env={"working_dir": workdir, "py_modules": package_dirs(config)},
            metadata={"meshline.pipeline": config.name},
        )
    print(f"submitted {job_id} to {redact_url(args.address)}", flush=True)
    if not args.wait:
        return 0
    asyncio.run(_stream_logs(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _submit_when_agent_ready(client, **job: object) -> str:
    """``client.submit_job(**job)``, retried while the head answers that no job agent is
    available yet (for a while after ``ray start``, longer on a loaded head). Any other error
    is raised; an agent still missing after ``AGENT_WAIT_SECONDS`` is a ConfigError saying
    where to look."""
    deadline, delay = time.monotonic() + AGENT_WAIT_SECONDS, 0.5
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if NO_AGENT not in str(error):
                raise
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"the head at {redact_url(client.get_address())} has had no job agent for "
                    f"{AGENT_WAIT_SECONDS:.0f} s. Its dashboard agent did not start: see "
                    "dashboard_agent.log in the head's Ray session logs. A common cause is its "
                    "port (ray start --dashboard-agent-listen-port, 52365 by default) taken by "
                    "another Ray instance on that machine."
                ) from None
        print(f"the cluster's job agent is not up yet; retrying in {delay:.1f} s", flush=True)
        time.sleep(delay)
        delay = min(2 * delay, 8.0)


async def _stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
