"""The cluster configs under cluster/ are what Ray and Kubernetes would accept, and agree.

The GCP launcher config goes through Ray's own ``prepare_config`` (which for the gcp
provider only merges ``ray/autoscaler/gcp/defaults.yaml``: no credentials, no network) and
``validate_config`` (Ray's JSON schema plus its cross-field checks); its TPU node types are
checked against Ray's TPU tables (``ray.util.tpu``). The KubeRay manifests are parsed and
checked field by field: no KubeRay CRD or Kubernetes API server is at hand offline. The
budget script's arithmetic and the README's copy of its table are checked too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray._private.accelerators import TPUAcceleratorManager, tpu
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.util import tpu as ray_tpu

from benchmarks import gptj_budget
from stages.train.model_config import param_count, preset

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
GCP_YAML = CLUSTER / "gcp-tpu.yaml"
KUBERAY = CLUSTER / "kuberay"

# Hosts per slice: chips / 4 chips per host (the names count TensorCores, 2 per chip).
EXPECTED_TPU_HOSTS = {"v4-32": 4, "v4-128": 16, "v3-256": 32, "v5p-128": 16}
RUNTIME_BY_GENERATION = {"v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base"}
RUNTIME_BY_GENERATION["v5p"] = "v2-alpha-tpuv5"
# GKE's cloud.google.com/gke-tpu-accelerator values and the Ray TPU generation they are.
GKE_TPU_GENERATIONS = {
    "tpu-v4-podslice": "v4",
    "tpu-v5p-slice": "v5p",
    "tpu-v5-lite-podslice": "v5litepod",
    "tpu-v6e-slice": "v6e",
}
RAY_PIN = re.compile(r"ray\[[a-z,]+\]==([0-9.]+)")
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")
SECRET_LIKE_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|_KEY$|_URI$", re.IGNORECASE)


# --- cluster/gcp-tpu.yaml --------------------------------------------------------------


@pytest.fixture(scope="module")
def gcp_raw() -> dict[str, Any]:
    return yaml.safe_load(GCP_YAML.read_text())


@pytest.fixture(scope="module")
def gcp(gcp_raw: dict[str, Any]) -> dict[str, Any]:
    """The config as `ray up` would use it: defaults merged, setup commands merged."""
    config = prepare_config(gcp_raw)
    validate_config(config)
    return config


def setup_commands_of(config: dict[str, Any], node_type: str) -> list[str]:
    """The setup commands Ray's updater runs on a node of this type (a node type's own
    worker_setup_commands replace setup_commands + worker_setup_commands)."""
    if node_type == config["head_node_type"]:
        return config["head_setup_commands"]
    own = config["available_node_types"][node_type].get("worker_setup_commands")
    return own if own is not None else config["worker_setup_commands"]


def tpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: spec
        for name, spec in config["available_node_types"].items()
        if "acceleratorType" in spec["node_config"]
    }


def test_gcp_config_passes_rays_validation(gcp: dict[str, Any]) -> None:
    assert gcp["provider"]["type"] == "gcp"
    assert gcp["head_node_type"] == "head"
    assert set(gcp["available_node_types"]) == {
        "head",
        "cpu_preprocess",
        "tpu_v4_32",
        "tpu_v4_128",
        "tpu_v3_256",
        "tpu_v5p_128",
    }


def test_gcp_head_and_preprocessing_pool(gcp: dict[str, Any]) -> None:
    types = gcp["available_node_types"]
    head = types["head"]
    assert (head["min_workers"], head["max_workers"]) == (0, 0)
    assert head["resources"] == {"CPU": 0}, "no Ray Data task or training work on the head"
    assert "machineType" in head["node_config"]

    pool = types["cpu_preprocess"]
    assert pool["min_workers"] == 0 and pool["max_workers"] >= 8, "autoscaling from zero"
    assert pool["resources"]["CPU"] > 0 and "TPU" not in pool["resources"]
    assert "machineType" in pool["node_config"]
    assert gcp["max_workers"] >= sum(t["max_workers"] for t in types.values())
    assert gcp["idle_timeout_minutes"] > 0


def test_gcp_tpu_node_types_advertise_rays_tpu_resources(gcp: dict[str, Any]) -> None:
    types = tpu_types(gcp)
    slices = {spec["node_config"]["acceleratorType"]: spec for spec in types.values()}
    assert set(slices) == set(EXPECTED_TPU_HOSTS)
    for accelerator, spec in slices.items():
        node = spec["node_config"]
        generation = accelerator.split("-")[0]
        assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(accelerator)
        assert "machineType" not in node, "a machineType makes Ray's GCP provider see a VM"
        assert node["runtimeVersion"] == RUNTIME_BY_GENERATION[generation]
        chips = int(accelerator.split("-")[1]) // tpu.get_tpu_cores_per_chip(accelerator)
        per_host = tpu.get_num_tpu_visible_chips_per_host(accelerator)
        assert chips // per_host == EXPECTED_TPU_HOSTS[accelerator] > 1, "multi-host slices"
        # Every host: its chips; worker 0: the slice-head resource the GCP provider fills in
        # (and strips from the other hosts), which the train stage asks for.
        assert spec["resources"]["TPU"] == per_host
        assert spec["resources"][f"TPU-{accelerator}-head"] == 1
        assert spec["resources"]["CPU"] >= 1, "ray.util.tpu asks for CPU 1 per host"
        assert (spec["min_workers"], spec["max_workers"]) == (0, 1)


def test_gcp_every_node_installs_meshline_with_one_ray(gcp: dict[str, Any]) -> None:
    wheel_mount = next(r for r, local in gcp["file_mounts"].items() if local == "./dist")
    pins = set()
    for node_type in gcp["available_node_types"]:
        commands = setup_commands_of(gcp, node_type)
        installs = [c for c in commands if "pip install" in c and "meshline" in c]
        assert installs, f"{node_type} does not install meshline"
        assert any(f"{wheel_mount}/meshline-" in c or "meshline @ " in c for c in installs)
        pins.update(RAY_PIN.findall(" ".join(installs)))
        if node_type in tpu_types(gcp):
            assert any('"jax[tpu]"' in c for c in commands), f"{node_type} lacks libtpu"
    assert len(pins) == 1, f"every node must run the same Ray, got {pins}"
    assert any("google-api-python-client" in c for c in gcp["head_setup_commands"])


def test_gcp_token_auth_and_loopback_dashboard(gcp: dict[str, Any]) -> None:
    head_start = " ".join(gcp["head_start_ray_commands"])
    worker_start = " ".join(gcp["worker_start_ray_commands"])
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start
    assert gcp["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--dashboard-host=127.0.0.1" in head_start
    text = GCP_YAML.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text and "RAY_AUTH_TOKEN=" not in text
    commands = [c for key, value in gcp.items() if key.endswith("_commands") for c in value]
    assert not any("0.0.0.0" in c for c in commands)


def test_gcp_ray_pin_matches_kuberay_and_image(gcp: dict[str, Any]) -> None:
    (pin,) = set(RAY_PIN.findall(" ".join(setup_commands_of(gcp, "head"))))
    cluster = one(kuberay_docs(), "RayCluster")
    assert cluster["spec"]["rayVersion"] == pin
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{pin}-py311" in dockerfile
    assert f'"ray[data,default,train]=={pin}"' in dockerfile
    assert pin.split(".")[:2] == ray.__version__.split(".")[:2], "tests run another Ray"


# --- cluster/kuberay/ ------------------------------------------------------------------

EXPECTED_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("ray.io/v1", "RayCluster"),
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
}


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERAY.glob("*.yaml") if p.name != "kustomization.yaml")


def kuberay_docs() -> list[dict[str, Any]]:
    docs = []
    for path in manifest_files():
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner, pod spec) of every pod template in the manifests."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]
        elif doc["kind"] == "RayCluster":
            spec = doc["spec"]
            yield "head", spec["headGroupSpec"]["template"]["spec"]
            for group in spec["workerGroupSpecs"]:
                yield group["groupName"], group["template"]["spec"]


def strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def test_kuberay_manifests_parse_with_known_kinds() -> None:
    docs = kuberay_docs()
    assert {(d["apiVersion"], d["kind"]) for d in docs} == EXPECTED_KINDS
    for doc in docs:
        assert doc["metadata"]["name"], doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "meshline", doc["metadata"]
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]


def test_kuberay_pod_templates_and_services_are_complete() -> None:
    docs = kuberay_docs()
    for owner, spec in pod_specs(docs):
        assert spec["containers"], owner
        for container in spec["containers"]:
            assert container["name"] and container["image"], owner
            limits = container["resources"]["limits"]
            assert limits == container["resources"]["requests"] or owner.startswith("mlflow")
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["type"] == "ClusterIP", "nothing exposed outside the cluster"
        (target,) = [
            w
            for w in workloads
            if service["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        containers = target["spec"]["template"]["spec"]["containers"]
        port_names = {p["name"] for c in containers for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)
    account = one(docs, "ServiceAccount", "meshline")
    assert "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]
    for owner, spec in pod_specs(docs):
        if owner != "mlflow-postgres":
            assert spec["serviceAccountName"] == "meshline", owner


def test_kuberay_raycluster_groups() -> None:
    cluster = one(kuberay_docs(), "RayCluster", "meshline")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-preprocess", "tpu-v4-128"}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["name"] == "ray-worker"

    cpu = groups["cpu-preprocess"]
    assert cpu["minReplicas"] == 0 and cpu["maxReplicas"] >= 8
    assert cpu.get("numOfHosts", 1) == 1
    cpu_limits = cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "google.com/tpu" not in cpu_limits and "nodeSelector" not in cpu["template"]["spec"]


def test_kuberay_tpu_group_matches_its_topology() -> None:
    cluster = one(kuberay_docs(), "RayCluster", "meshline")
    (group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if "numOfHosts" in g]
    pod = group["template"]["spec"]
    generation = GKE_TPU_GENERATIONS[pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"]]
    topology = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    chips = math.prod(int(d) for d in topology.split("x"))
    resources = pod["containers"][0]["resources"]
    per_host = int(resources["limits"]["google.com/tpu"])
    assert int(resources["requests"]["google.com/tpu"]) == per_host
    assert per_host == ray_tpu.get_chips_per_host(topology, generation)
    hosts, per_worker = ray_tpu.get_tpu_worker_resources(topology, generation)
    assert group["numOfHosts"] == chips // per_host == hosts > 1
    assert per_worker["TPU"] == per_host
    slice_type = ray_tpu.infer_tpu_pod_type_from_topology(topology, generation)
    assert group["groupName"] == f"tpu-{slice_type}" == "tpu-v4-128"
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, "whole slices, on demand"
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_kuberay_mlflow_server_postgres_and_gcs() -> None:
    docs = kuberay_docs()
    server = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    argv = server["command"] + server["args"]
    assert argv[:2] == ["mlflow", "server"]
    assert "--host=0.0.0.0" in argv
    assert any(a.startswith("--artifacts-destination=gs://") for a in argv)
    assert not any("postgresql" in a or "--backend-store-uri" in a for a in argv)
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["key"] == "uri"
    assert "mlflow:*" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert one(docs, "Service", "mlflow")["spec"]["ports"][0]["port"] == 5000

    postgres = one(docs, "StatefulSet", "mlflow-postgres")
    container = postgres["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("postgres:")
    pg_env = {e["name"]: e for e in container["env"]}
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD"):
        assert pg_env[name]["valueFrom"]["secretKeyRef"]["name"] == "meshline-mlflow-db"
    assert postgres["spec"]["volumeClaimTemplates"], "the database outlives its pod"
    policy = one(docs, "NetworkPolicy", "mlflow-postgres")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "mlflow"
    }


def test_no_inline_secrets_and_only_pod_local_wildcard_binds(gcp_raw: dict[str, Any]) -> None:
    docs = kuberay_docs()
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created out of band"
    for owner, spec in pod_specs(docs):
        for container in spec["containers"]:
            for var in container.get("env", []):
                if SECRET_LIKE_ENV.search(var["name"]):
                    assert "value" not in var, (owner, var["name"])
                    assert "secretKeyRef" in var["valueFrom"], (owner, var["name"])
    every_string = [*strings(docs), *strings(gcp_raw)]
    assert not [s for s in every_string if URL_WITH_PASSWORD.search(s)]
    wildcard = [s for s in strings(docs) if "0.0.0.0" in s]
    # Inside a pod, behind ClusterIP Services: the head's dashboard and the MLflow server.
    assert sorted(wildcard) == ["--host=0.0.0.0", "0.0.0.0"]
    assert (
        one(docs, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"]
        == "0.0.0.0"
    )


# --- benchmarks/gptj_budget.py and cluster/README.md -------------------------------------


def test_budget_arithmetic() -> None:
    model = preset("gptj-6b")
    recipe = gptj_budget.Recipe()
    assert param_count(model) == 6_050_882_784
    assert recipe.tokens_trained == 383_500 * 512 * 2048 == 402_128_896_000
    assert recipe.tokens_config == 350_000 * 512 * 2048
    dense, attention = gptj_budget.flops_per_token(model, recipe.seq_len)
    assert dense == 6 * 6_050_882_784 and attention == 12 * 28 * 2048 * 4096
    trained = gptj_budget.budget(model, recipe, recipe.tokens_trained)
    assert trained.dense_flops == pytest.approx(1.46e22, rel=2e-3)  # GPT-J's "~1.5e22"
    slices = {s.name: s for s in gptj_budget.SLICES}
    assert {n: s.chips for n, s in slices.items()} == {"v3-256": 128, "v4-128": 64, "v5p-128": 64}
    v4 = slices["v4-128"]
    assert trained.seconds(v4, 0.4) == pytest.approx(trained.flops / (64 * 275e12 * 0.4))
    # GPT-J's own numbers reproduce: 151k tokens/s is ~40% MFU by 6N against 13.4 PFLOP/s.
    reported = gptj_budget.MEASURED_TOKENS_PER_S * dense / gptj_budget.REPORTED_PEAK_V3_256
    assert 0.39 < reported < 0.42


def test_readme_quotes_the_budget_table() -> None:
    text = gptj_budget.report(preset("gptj-6b"), gptj_budget.Recipe(), gptj_budget.SLICES, 0.40)
    readme = (CLUSTER / "README.md").read_text()
    for line in text.splitlines():
        assert line in readme, f"cluster/README.md is out of date with the script: {line}"
    assert "cluster/README.md" in (ROOT / "README.md").read_text()
