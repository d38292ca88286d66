"""A fake autoscaling Ray cluster on 127.0.0.1 that touches only its own processes.

``ray.cluster_utils.AutoscalingCluster`` runs ``ray stop --force`` on start and shutdown, which
kills every Ray process on the machine, and reads a base config the wheel does not ship. This
class builds the config itself, starts the head with ``ray start --head --block`` in its own
process group (with Ray's fake multi-node provider as the autoscaler's node provider), and on
stop ends that group plus the fake worker nodes the autoscaler spawned, found by this
cluster's GCS address on their command lines.

Run as ``python -m tests.autoscaling ADDRESS WORK MODE`` it is the driver the autoscaling
tests start on such a cluster. It runs one piece of work twice, first with a fixed pool
of one actor, then with an autoscaling actor pool (min 1, max 2), and prints one JSON line per
run with the pool's actors (from the GCS actor table: id, node, pid, start and end in ms):

- ``tokenize``: the tokenize stage on a generated input; each line also has the ledger
  digest and the stage's metrics.
- ``dedup-signing``: dedup's parse and exact phases once on a generated download, then, on
  a copy of their output per run, only its signature phase (``sign_all``); each line also
  has the sha256 of every signature file and the pids of the workers that signed."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.stage import StageContext

HEAD_NODE_TYPE = "ray.head.default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_ports() -> list[str]:
    """``ray start`` flags giving a node free ports for the services that otherwise take fixed
    defaults. Two Ray instances on one machine (a test's and a driver's left from an earlier
    test) collide on the dashboard agent's 52365: the second head then never gets a job agent
    (seen in CI: "No available agent to submit job" for two minutes)."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def ensure_auth_token(env: dict) -> None:
    """Generate this machine's Ray token (``~/.ray/auth_token``) if it has none, as Ray tells a
    developer to: a ``ray start`` with ``RAY_AUTH_MODE=token`` refuses to run without one. The
    token is printed, so the output is discarded."""
    subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
        env=env,
        stdout=subprocess.DEVNULL,
        check=True,
    )


def cluster_config(worker_types: dict, idle_timeout_minutes: float, gcs_address: str) -> dict:
    """What ``AutoscalingCluster`` would build from Ray's fake_multi_node example.yaml, with
    the provider pointed at this cluster's GCS instead of the default port 6379."""
    node_types = {name: dict(spec, node_config={}) for name, spec in worker_types.items()}
    node_types[HEAD_NODE_TYPE] = {"resources": {}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "fake_multinode",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {},
        "available_node_types": node_types,
        "head_node_type": HEAD_NODE_TYPE,
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": 1.0,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster:
    """A head with no CPUs and an autoscaler that adds fake worker nodes (local raylets)."""

    def __init__(self, worker_types: dict, idle_timeout_minutes: float = 0.1) -> None:
        from ray._private.services import get_node_ip_address

        # Ray resolves 127.0.0.1 to this machine's address; the fake worker nodes use it too.
        self.ip = get_node_ip_address()
        self.port = free_port()
        self.address = f"{self.ip}:{self.port}"
        self.worker_types = worker_types
        self.idle_timeout_minutes = idle_timeout_minutes
        self._dir = tempfile.mkdtemp(prefix="fake-autoscaling-")
        self._head: subprocess.Popen | None = None
        self._current = None
        # Clients of this cluster (the node poller, drivers) run with this environment:
        # token authentication on, as ``ray start`` turns it on with a token on the machine.
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env["RAY_AUTH_MODE"] = "token"

    def _current_cluster_file(self) -> str:
        """``ray start --head`` records its address here for ``address="auto"``; the file is
        put back as it was on stop."""
        from ray._common.utils import get_ray_address_file

        return get_ray_address_file(None)

    def start(self, timeout: float = 60.0) -> None:
        ensure_auth_token(self.env)
        config = cluster_config(self.worker_types, self.idle_timeout_minutes, self.address)
        config_path = os.path.join(self._dir, "cluster.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        env = dict(self.env, AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1")
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--autoscaling-config={config_path}",
            f"--port={self.port}",
            f"--dashboard-port={free_port()}",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
            f"--ray-client-server-port={free_port()}",
            *own_ports(),
            "--num-cpus=0",
            "--disable-usage-stats",
            "--block",
        ]
        try:
            with open(self._current_cluster_file()) as f:
                self._current = f.read()
        except OSError:
            self._current = None
        with open(os.path.join(self._dir, "head.log"), "wb") as log:
            self._head = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._head.poll() is not None:
                raise RuntimeError(f"ray start exited {self._head.returncode}: {self.log()}")
            if self.alive_nodes(timeout=5) is not None:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the fake cluster's head did not come up: {self.log()}")

    def log(self) -> str:
        with open(os.path.join(self._dir, "head.log"), errors="replace") as f:
            return f.read()[-4000:]

    def alive_nodes(self, timeout: float = 10) -> list[dict] | None:
        return gcs_alive_nodes(self.address, self.env, timeout)

    def _own_pids(self) -> list[int]:
        """Processes whose command line names this cluster's GCS address (fake worker
        raylets and their workers), besides the head's process group."""
        return processes_naming(self.address)

    def stop(self, timeout: float = 10.0) -> None:
        if self._head is None:
            return
        pids = self._own_pids()
        if self._head.poll() is None:
            os.killpg(self._head.pid, signal.SIGTERM)
            try:
                self._head.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self._head.pid, signal.SIGKILL)
                self._head.wait()
        end_processes(sorted(set(pids) | set(self._own_pids())), timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._head.pid, signal.SIGKILL)
        self._head = None
        if self._current is not None:
            with open(self._current_cluster_file(), "w") as f:
                f.write(self._current)
        shutil.rmtree(self._dir, ignore_errors=True)


def gcs_alive_nodes(address: str, env: dict, timeout: float = 10) -> list[dict] | None:
    """The alive nodes (id, CPUs) of the cluster whose GCS is at ``address``, or None if it
    does not answer. Asked from a subprocess: this process may have its own Ray session."""
    script = (
        "import json, ray\n"
        "from ray._raylet import GcsClient\n"
        f"client = GcsClient(address={address!r})\n"
        "nodes = client.get_all_node_info(timeout=5)\n"
        "alive = [\n"
        "    {'node_id': n.node_id.hex(), 'cpus': n.resources_total.get('CPU', 0)}\n"
        "    for n in nodes.values() if n.state == 0\n"
        "]\n"
        "print(json.dumps(alive))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def processes_naming(needle: str) -> list[int]:
    """Processes (other than this one) whose command line contains ``needle``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry))
    return pids


def end_processes(pids: list[int], timeout: float) -> None:
    """SIGTERM, then SIGKILL what is left after ``timeout`` seconds."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _exists(p)]
        time.sleep(0.2)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


# What the pools' actors are called in the GCS actor table (Ray Data's map workers).
ENCODER_ACTORS = "MapWorker(MapBatches(Encoder))"
SIGNER_ACTORS = "MapWorker(MapBatches(Signer))"
# The fixed pool runs first so that the worker node it brings up is known to Ray Data's
# autoscaling coordinator before the autoscaling run starts: the coordinator refreshes its
# view of the nodes only every 20 s, and until then grants a dataset none of a new node's
# CPUs, so a pool that starts on a just-added node cannot grow (seen here: a 20 s
# autoscaling run that began with the node ended on one actor, "1/0 CPU" in Ray Data's log).
POOLS = (("fixed", (1, 1)), ("autoscaling", (1, 2)))

# Dedup's generated download: one document per unit, each heavy to sign (classic MinHash with
# 1024 permutations over ~60k word shingles), so one actor takes long enough over the units
# for the second to start and take some, without much data to read. On a quiet machine one
# actor signs a unit in ~1 s, Ray Data asked for the second actor ~12 s after the first was
# busy, and 16 units were done before it started: 32 leave it ~15 s to start.
SIGNING_UNITS = 32
SIGNING_WORDS = 60_000
SIGNING_CONFIG = {
    "unit_docs": 1,
    "num_perm": 1024,
    "scheme": "permutations",
    "verify": False,
    "partitions": 2,
    "shared_filesystem": True,
}


def _tokenize_input(work: Path) -> tuple[str, dict]:
    """Eight parts of 24 standard-library files repeated 96 times (22 row groups of 8): enough
    encoding that the fixed run outlasts one refresh of Ray Data's coordinator (see POOLS)
    and that the first encoder of the autoscaling run is still busy when the second has
    started: Ray Data asks for it once the first has two tasks queued, and drops it,
    unstarted, when the inputs run out. With 24 repeats, on a machine as loaded as CI's
    (here under two busy CPU loops), an actor took ~7 s to start and the whole encoding
    ~6 s."""
    from tests.tokenize_data import gpt2_ranks_path, stdlib_texts, write_part

    dedup = work / "dedup"
    for part in range(8):
        texts = [t * 96 for t in stdlib_texts(24, 24 * part)]
        rows = [(t, "Github", f"train/{part:02d}.jsonl.zst:{i + 1}") for i, t in enumerate(texts)]
        write_part(str(dedup / f"train/part-{part:05d}.parquet"), rows)
    config = {
        "tokenizer": {"kind": "gpt2", "source": gpt2_ranks_path()},
        "seq_len": 127,
        "splits": ["train"],
    }
    return str(dedup), config


def _pool_actors(class_name: str, exclude: set[str]) -> list[dict]:
    from ray._private.state import actors

    return [
        {
            "id": actor_id,
            "node": info["Address"]["NodeID"],
            "pid": info["Pid"],
            "start_ms": info["StartTime"],
            "end_ms": info["EndTime"],
        }
        for actor_id, info in actors().items()
        if info["ActorClassName"] == class_name and actor_id not in exclude
    ]


def _connect(address: str) -> None:
    import ray

    ray.init(address=address, log_to_driver=False)


def drive_tokenize(address: str, work: Path) -> None:
    from pipeline.ledger import Ledger
    from pipeline.stage import StageContext, Upstream
    from stages.tokenize import TokenizeConfig, run

    dedup, settings = _tokenize_input(work)
    _connect(address)
    seen: set[str] = set()
    for name, pool in POOLS:
        output = str(work / name / "tokenize-fp")
        ctx = StageContext(
            name="tokenize",
            config=TokenizeConfig.model_validate(
                {**settings, "workers_min": pool[0], "workers_max": pool[1]}
            ),
            output=output,
            inputs={"dedup": Upstream("dedup", dedup, "fp", "digest")},
            ledger=Ledger(output),
        )
        run(ctx)
        actors = _pool_actors(ENCODER_ACTORS, seen)
        seen |= {a["id"] for a in actors}
        result = {"run": name, "digest": ctx.ledger.digest(), "metrics": ctx.metrics}
        print("RESULT " + json.dumps({**result, "actors": actors}), flush=True)


def _signing_download(work: Path) -> str:
    """Two train files of ``SIGNING_UNITS / 2`` distinct random documents each."""
    from tests.dedup_corpus import make_download, pile_line, random_text

    rng = random.Random(7)
    per_file = SIGNING_UNITS // 2
    files = {
        f"train/{f:02d}.jsonl.zst": "".join(
            pile_line(random_text(rng, SIGNING_WORDS)) for _ in range(per_file)
        )
        for f in range(2)
    }
    return make_download(work / "download", files)


def _dedup_context(output: Path, download: str, pool: tuple[int, int]) -> StageContext:
    from pipeline.ledger import Ledger
    from pipeline.stage import StageContext, Upstream
    from stages.dedup import DedupConfig

    return StageContext(
        name="dedup",
        config=DedupConfig(**SIGNING_CONFIG, min_workers=pool[0], max_workers=pool[1]),
        output=str(output),
        inputs={"download": Upstream("download", download, "fp", "digest")},
        ledger=Ledger(str(output)),
    )


def drive_dedup_signing(address: str, work: Path) -> None:
    from pipeline.tasks import Placement
    from stages.dedup.stage import (
        input_files,
        parse_all,
        run_exact,
        sign_all,
        train_units,
    )

    download = _signing_download(work)
    _connect(address)
    parsed = work / "parsed" / "dedup-fp"
    ctx = _dedup_context(parsed, download, (1, 1))
    placement = Placement.for_output(ctx.output, ctx.config.shared_filesystem)
    units = parse_all(ctx, input_files(download), placement)
    run_exact(ctx, units, placement)
    train = train_units(units)
    seen: set[str] = set()
    for name, pool in POOLS:
        output = work / name / "dedup-fp"
        shutil.copytree(parsed, output)
        ctx = _dedup_context(output, download, pool)
        workers = sign_all(ctx, train, placement)
        actors = _pool_actors(SIGNER_ACTORS, seen)
        seen |= {a["id"] for a in actors}
        signatures = {
            f["path"]: f["sha256"]
            for r in ctx.ledger.records()
            if r["name"].startswith("sig/")
            for f in r["files"]
        }
        result = {"run": name, "signatures": signatures, "workers": sorted(workers)}
        print("RESULT " + json.dumps({**result, "actors": actors}), flush=True)


DRIVERS = {"tokenize": drive_tokenize, "dedup-signing": drive_dedup_signing}


if __name__ == "__main__":
    DRIVERS[sys.argv[3]](sys.argv[1], Path(sys.argv[2]))
