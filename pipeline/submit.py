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

from pipeline.config import PipelineConfig

CONFIG_NAME = "pipeline.yaml"


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


def submit(config: PipelineConfig, args: argparse.Namespace) -> int:
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray.job_submission import JobStatus, JobSubmissionClient

    # The Jobs client sends no token unless token mode is on in this process; turn it on
    # when this machine has the cluster's token (RAY_AUTH_MODE, if set, still decides).
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    client = JobSubmissionClient(args.address)
    with tempfile.TemporaryDirectory(prefix="meshline-job-") as workdir:
        shutil.copy(args.config, os.path.join(workdir, CONFIG_NAME))
        job_id = client.submit_job(
            entrypoint=job_entrypoint(config, args),
            runtime_env={"working_dir": workdir, "py_modules": package_dirs(config)},
            metadata={"meshline.pipeline": config.name},
        )
    print(f"submitted {job_id} to {args.address}", flush=True)
    if not args.wait:
        return 0
    asyncio.run(_stream_logs(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


async def _stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
