"""The ``meshline`` command: run, status, dag, submit, ui (the contract in DESIGN.md).

Stage packages add their own tools (``meshline sample``, ``meshline convert``) through the
``meshline.commands`` entry point group, so this module never imports ``stages``: each entry
point is a function that adds a subparser and sets ``handler`` to a function of the parsed
arguments returning the exit code. Such commands take no pipeline config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import time
import webbrowser
from dataclasses import asdict
from importlib.metadata import entry_points

from pipeline import plan, storage
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.logs import console_logging, last_line
from pipeline.secrets import redact_url

log = logging.getLogger("meshline")
COMMAND_GROUP = "meshline.commands"
DRIVER_FORMAT = "%(asctime)s %(message)s"
"""The driver's own log lines: a time, then what happened."""
TABLE_FILE = "table.txt"
"""A stage output's summary table, which ``meshline run`` prints at its end."""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="pipeline YAML, e.g. configs/demo.yaml")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by its dotted path (repeatable)",
    )


def _add_selection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage",
        dest="stages",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this stage and the unfinished stages it needs (repeatable)",
    )
    parser.add_argument(
        "--force", action="store_true", help="discard the selected stages' outputs and redo them"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray Data's progress bars and plans too"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline, or selected stages")
    _add_config_args(run)
    _add_selection_args(run)
    status = commands.add_parser("status", help="state of every stage")
    _add_config_args(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    dag = commands.add_parser("dag", help="the stage graph as text")
    _add_config_args(dag)
    submit = commands.add_parser("submit", help="run on a Ray cluster through the Jobs API")
    _add_config_args(submit)
    _add_selection_args(submit)
    submit.add_argument("--address", required=True, help="Ray dashboard, http://HEAD:8265")
    submit.add_argument("--wait", action="store_true", help="stream logs until the job ends")
    ui = commands.add_parser("ui", help="the MLflow UI on the pipeline's tracking store")
    _add_config_args(ui)
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    for command in entry_points(group=COMMAND_GROUP):
        command.load()(commands)
    return parser


def cmd_run(config: PipelineConfig, args: argparse.Namespace) -> int:
    # Ray and MLflow load only for the commands that use them (status and dag answer fast);
    # MLflow sets its logger's level when it loads, so the console is configured again.
    from pipeline import executor

    console_logging(DRIVER_FORMAT)

    started = time.time()
    results = executor.run_pipeline(
        config, args.stages, args.force, " ".join(sys.argv), verbose=args.verbose, debug=args.debug
    )
    print(f"\nmeshline run {config.name}: {time.time() - started:.1f}s")
    failed = 0
    for name, result in results.items():
        if isinstance(result, executor.Outcome):
            verb = "reused" if result.reused else "done"
            print(f"  {name:<10} {verb:<8} {result.seconds:7.1f}s  {result.upstream.uri}")
        else:
            failed += 1
            print(f"  {name:<10} FAILED    {last_line(result)}")
    for name, result in results.items():
        if isinstance(result, executor.Outcome):
            _print_table(name, result.upstream.uri)
    return 1 if failed else 0


def _print_table(stage: str, output: str) -> None:
    """A stage's ``table.txt`` (evaluate's scores beside the published ones), if it has one:
    the run's last word, after every stage's own lines."""
    path = storage.join(output, TABLE_FILE)
    if storage.exists(path):
        print(f"\n{stage} ({path}):\n{storage.read_text(path).rstrip()}")


def cmd_status(config: PipelineConfig, args: argparse.Namespace) -> int:
    reports = plan.report(config)
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=1))
        return 0
    for r in reports:
        run = r.mlflow_run_id or "-"
        print(f"{r.stage:<10} {r.state:<8} {r.fingerprint}  run {run}  {r.output}")
        if r.detail:
            print(f"{'':<10} {r.detail}")
    return 0


def cmd_dag(config: PipelineConfig, args: argparse.Namespace) -> int:
    planned = plan.plan(config)
    for name, stage in planned.items():
        needs = f"  <- {', '.join(stage.inputs)}" if stage.inputs else ""
        print(f"{name}{needs}")
        print(f"    {stage.output}")
    return 0


def cmd_submit(config: PipelineConfig, args: argparse.Namespace) -> int:
    from pipeline.submit import submit

    return submit(config, args)


def cmd_ui(config: PipelineConfig, args: argparse.Namespace) -> int:
    """The pipeline's runs in MLflow's model-training view: on the tracking server when the
    pipeline logs to one, else on an MLflow UI started here on its store."""
    from pipeline import lineage

    uri = config.resolved_tracking_uri()
    served = uri.startswith(("http://", "https://"))
    store_exists = served or os.path.exists(uri.removeprefix("sqlite:///"))
    experiment = lineage.experiment_id(uri, config.name) if store_exists else None
    base = redact_url(uri) if served else f"http://{args.host}:{args.port}"
    page = lineage.runs_page(base, experiment)
    print(f"MLflow UI for {config.name}: {page}", flush=True)
    if served:
        return 0
    mlflow = shutil.which("mlflow") or "mlflow"
    argv = [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform == "darwin":
        _open_when_listening(page, args.host, args.port)
    os.execv(mlflow, argv)
    return 0


def _open_when_listening(page: str, host: str, port: int, limit: float = 60.0) -> None:
    """Open ``page`` in the desktop's browser from a child process, once the server this
    process is about to become listens."""
    if os.fork():
        return
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            time.sleep(0.5)
            continue
        webbrowser.open(page)
        break
    os._exit(0)


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "dag": cmd_dag,
    "submit": cmd_submit,
    "ui": cmd_ui,
}


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success, 1 when a stage or the command failed, 2 for a usage or
    config error; errors are one line (a line per config field) unless ``--debug``."""
    args = build_parser().parse_args(argv)
    console_logging(DRIVER_FORMAT)
    try:
        handler = getattr(args, "handler", None)
        if handler is not None:
            return handler(args)
        config = load_config(args.config, args.overrides)
        if not storage.is_gcs(config.root):
            config = config.model_copy(update={"root": config.stage_root()})
        return COMMANDS[args.command](config, args)
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        credentials = type(error).__module__.startswith("google.auth")
        usage = isinstance(error, ConfigError) or credentials
        text = str(error) if usage else f"{type(error).__name__}: {last_line(error)}"
        if credentials:
            text = (
                f"GCS credentials: {last_line(error)} (point GOOGLE_APPLICATION_CREDENTIALS at a "
                "key file, or run `gcloud auth application-default login`)"
            )
        print(f"meshline: {redact_url(text)}", file=sys.stderr)
        if not usage:
            print("meshline: --debug shows the traceback", file=sys.stderr)
        return 2 if usage else 1


if __name__ == "__main__":
    sys.exit(main())
