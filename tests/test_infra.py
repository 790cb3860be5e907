"""infra/: the Ray cluster launcher config, the KubeRay manifests and the MLflow start script.

No cloud and no Kubernetes here: the files are parsed and cross-checked against the repository.
Every job, config and repository file they name exists; every `--set` of a RayJob entrypoint is a
real config key with the intended value (checked by the job's own `--print-config`); the launcher
config passes Ray's own schema (what `ray up` checks before it contacts AWS); the manifests refer
to each other consistently (cluster name, Secrets, Service, volumes) and pass the Kubernetes schema
(kubernetes-validate, offline); MLflow on Kubernetes needs a login from a Secret and a NetworkPolicy
admits only the cluster's pods; the MLflow script is valid bash, binds 127.0.0.1 by default, and the
sidecar's own command line starts a real server that refuses clients without the login.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines.core.local_ray import free_port

REPO = Path(__file__).resolve().parents[1]
RAY_DIR = REPO / "infra" / "ray"
KUBERAY_DIR = RAY_DIR / "kuberay"
LAUNCHER = RAY_DIR / "cluster.yaml"
MLFLOW_DIR = REPO / "infra" / "mlflow"
MLFLOW_SCRIPT = MLFLOW_DIR / "start_server.sh"
IMAGE_REPO = "/app"  # where the image has the repository (raycluster.yaml; the RayJobs' working_dir)

# One RayJob per pipeline stage that runs on the GPU cluster, and the job each must run.
RAYJOBS = {
    "rayjob-download.yaml": "jobs/download_data.py",
    "rayjob-precompute.yaml": "jobs/precompute_latents.py",
    "rayjob-train.yaml": "jobs/train_unet.py",
    "rayjob-eval.yaml": "jobs/sample_eval.py",
}
# Jobs that have a config file in configs/ (jobs/sample_eval.py has none: its defaults plus --set).
CONFIG_FILE_JOBS = {"jobs/download_data.py", "jobs/precompute_latents.py", "jobs/train_unet.py"}
# Paths the manifests' jobs read and write must be the same on every pod.
SHARED_PREFIXES = ("/shared/", "s3://")
# Config keys (and sample_eval's shorthand flags) that hold a location, whatever their value looks like.
PATH_KEYS = {"url_list", "input_dir", "output_dir", "features_dir", "storage_path", "vae.source", "text.weights",
             "model.init_from", "model", "prompts", "out", "metrics.clip_weights", "metrics.fid_reference",
             "metrics.fid_weights"}


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def kuberay_docs(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY_DIR.glob("*.yaml")) for d in load_docs(p) if d.get("kind") == kind]


def the_raycluster() -> dict:
    clusters = kuberay_docs("RayCluster")
    assert len(clusters) == 1, f"expected one RayCluster under {rel(KUBERAY_DIR)}, found {len(clusters)}"
    return clusters[0][1]


def the_rayjob(filename: str) -> dict:
    docs = [d for d in load_docs(KUBERAY_DIR / filename) if d.get("kind") == "RayJob"]
    assert len(docs) == 1, f"{filename}: expected exactly one RayJob, found {len(docs)}"
    return docs[0]


def mlflow_service(cluster: dict) -> dict:
    """The Service that selects the RayCluster's head pod and exposes MLflow's port."""
    services = [d for _, d in kuberay_docs("Service")
                if d["spec"].get("selector", {}).get("ray.io/cluster") == cluster["metadata"]["name"]]
    assert len(services) == 1, "expected one Service in front of the head pod's MLflow sidecar"
    return services[0]


def dotted(values: dict, key: str):
    for part in key.split("."):
        values = values[part]
    return values


class Entrypoint:
    """`python jobs/X.py --flag value ... --set k=v ...` taken apart."""

    def __init__(self, text: str) -> None:
        self.tokens = shlex.split(text)
        assert len(self.tokens) >= 2 and self.tokens[0] == "python", \
            f"entrypoint must start with `python jobs/<job>.py`: {text!r}"
        self.job = self.tokens[1]
        self.args = self.tokens[2:]
        self.options: list[tuple[str, str]] = []
        rest = list(self.args)
        while rest:
            flag = rest.pop(0)
            assert flag.startswith("--") and rest, f"expected `--flag value` pairs, got {flag!r} in {text!r}"
            self.options.append((flag, rest.pop(0)))

    def values(self, flag: str) -> list[str]:
        return [value for f, value in self.options if f == flag]

    @property
    def sets(self) -> dict[str, str]:
        return dict(value.split("=", 1) for value in self.values("--set"))


def job_module_has_main(path: Path) -> bool:
    """A top-level main() and an `if __name__ == "__main__":` block (checked without importing)."""
    tree = ast.parse(path.read_text())
    has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    has_guard = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
    return has_main and has_guard


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------ all YAML files

ALL_YAML = sorted([*RAY_DIR.rglob("*.yaml"), *RAY_DIR.rglob("*.yml")])


def test_the_expected_files_exist():
    expected = [LAUNCHER, KUBERAY_DIR / "raycluster.yaml", *(KUBERAY_DIR / f for f in RAYJOBS),
                KUBERAY_DIR / "mlflow-secret.yaml", KUBERAY_DIR / "networkpolicy.yaml",
                MLFLOW_SCRIPT, MLFLOW_DIR / "README.md"]
    missing = [rel(p) for p in expected if not p.is_file()]
    assert not missing, f"missing: {missing}"


@pytest.mark.parametrize("path", ALL_YAML, ids=rel)
def test_every_yaml_under_infra_ray_parses(path):
    docs = load_docs(path)  # safe_load_all: the KubeRay files hold several documents
    assert docs, f"{rel(path)} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{rel(path)}: every document must be a mapping"


def test_repository_paths_named_in_infra_files_exist():
    """Paths such as jobs/X.py, configs/Y.yaml, infra/Z.sh anywhere in infra/ (comments included)."""
    pattern = re.compile(r"(?<![\w.-])((?:jobs|configs|infra|pipelines|model|bench)/[\w./-]*"
                         r"\.(?:py|yaml|yml|sh|json|md))")
    files = [*ALL_YAML, MLFLOW_SCRIPT, MLFLOW_DIR / "README.md"]
    named = {(rel(f), m) for f in files for m in pattern.findall(f.read_text())}
    assert {m for _, m in named} >= {"jobs/train_unet.py", "infra/mlflow/start_server.sh"}, "pattern finds nothing"
    missing = sorted((f, m) for f, m in named if not (REPO / m).exists())
    assert not missing, f"(file, path it names that is not in the repository): {missing}"


# ------------------------------------------------------------------------------------ KubeRay

def test_kuberay_resources_are_ray_io_v1():
    ray_kinds = {"RayCluster", "RayJob", "RayService", "RayCronJob"}
    docs = [(p, d) for p in sorted(KUBERAY_DIR.glob("*.yaml")) for d in load_docs(p)]
    assert {d["kind"] for _, d in docs} >= {"RayCluster", "RayJob"}
    for path, doc in docs:
        assert doc.get("kind") and doc.get("apiVersion") and doc.get("metadata", {}).get("name"), \
            f"{rel(path)}: every document needs apiVersion, kind and metadata.name"
        if doc["kind"] in ray_kinds:
            assert doc["apiVersion"] == "ray.io/v1", f"{rel(path)}: {doc['kind']} must be ray.io/v1"
    assert sorted(p.name for p in KUBERAY_DIR.glob("rayjob-*.yaml")) == sorted(RAYJOBS)


def pod_specs(cluster: dict) -> dict[str, dict]:
    specs = {"head": cluster["spec"]["headGroupSpec"]["template"]["spec"]}
    for group in cluster["spec"]["workerGroupSpecs"]:
        specs[group["groupName"]] = group["template"]["spec"]
    return specs


def test_raycluster_head_and_autoscaling_worker_groups():
    cluster = the_raycluster()
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token", "Ray 2.60 clients expect token authentication"
    assert str(spec["rayVersion"]) == "2.60.0"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:  # the CRD declares rayStartParams as map[string]string: 0 must be "0"
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"rayStartParams must be strings: {params}"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no Ray tasks on the head"

    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)), f"duplicate worker group names: {names}"
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] > group["minReplicas"], f"{group['groupName']} cannot autoscale"
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) > 0:
            gpu_groups.append(group)
    assert gpu_groups, "no GPU worker group (nvidia.com/gpu limit)"
    assert any(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 8
               for g in gpu_groups), "the sd2-base configs train on 8 GPUs: one group should have 8 per pod"


def test_raycluster_pods_mount_declared_volumes_and_claims():
    cluster = the_raycluster()
    claims = {d["metadata"]["name"]: d for _, d in kuberay_docs("PersistentVolumeClaim")}
    images = set()
    for name, pod in pod_specs(cluster).items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            images.add(container["image"])
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{container['name']} mounts undeclared {mount['name']}"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: unknown claim {volume}"
        shared = [m for c in pod["containers"][:1] for m in c.get("volumeMounts", []) if m["mountPath"] == "/shared"]
        assert shared, f"{name}: the Ray container must mount the shared volume at /shared"
        claim = volumes[shared[0]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"], "/shared must be ReadWriteMany"
    assert len(images) == 1, f"one image for every container: {images}"


def mlflow_sidecar(cluster: dict) -> dict:
    """The head container that serves the MLflow Service's target port."""
    port = mlflow_service(cluster)["spec"]["ports"][0]["targetPort"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    sidecars = [c for c in head["containers"] if any(p["containerPort"] == port for p in c.get("ports", []))]
    assert len(sidecars) == 1, "one head container must serve the Service's target port"
    return sidecars[0]


def flag_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def test_mlflow_sidecar_behind_a_clusterip_service():
    cluster = the_raycluster()
    service = mlflow_service(cluster)
    assert service["spec"]["type"] == "ClusterIP", "MLflow stays inside the Kubernetes cluster"
    assert service["spec"]["selector"]["ray.io/node-type"] == "head"
    port = service["spec"]["ports"][0]
    sidecar = mlflow_sidecar(cluster)
    script = sidecar["command"][0]
    assert script.endswith("infra/mlflow/start_server.sh") and (REPO / "infra/mlflow/start_server.sh").is_file()
    args = sidecar["args"]
    assert flag_value(args, "--port") == str(port["targetPort"])
    assert flag_value(args, "--workers") == "1"
    allowed = flag_value(args, "--allowed-hosts").split(",")
    assert service["metadata"]["name"] in allowed and f"{service['metadata']['name']}:*" in allowed, \
        "MLflow rejects Host headers it does not know: admit the Service name"


# ---- MLflow login (a Secret) and the NetworkPolicy in front of the cluster's pods

# What MLflow's basic-auth app reads (the admin account it creates, the key that signs its UI forms) and
# what its clients send.
SERVER_SECRET_ENV = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
CLIENT_SECRET_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Env names whose value is a credential: only ever a secretKeyRef in a manifest.
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|ACCESS_KEY|_KEY$")
PLACEHOLDER = "REPLACE-"
K8S_VERSION = "1.33.0"  # the schema kubernetes-validate checks against (EKS / GKE / AKS all offer 1.33)


def secret_refs(container: dict) -> dict[str, dict]:
    """env name -> its secretKeyRef ({name, key}) for the container's env entries that read a Secret."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def resolve_env(container: dict, secrets_by_name: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's env as the kubelet would set it, with these Secrets' values."""
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets_by_name[ref["name"]][ref["key"]]
    return env


def the_mlflow_secret(cluster: dict) -> dict:
    """The Secret the sidecar reads its admin account from (its own manifest, placeholder values)."""
    names = {ref["name"] for ref in secret_refs(mlflow_sidecar(cluster)).values()}
    assert len(names) == 1, f"the sidecar should read one Secret, reads {names or 'none'}"
    found = [(p, d) for p, d in kuberay_docs("Secret") if d["metadata"]["name"] in names]
    assert len(found) == 1, f"no manifest for the Secret {names} under {rel(KUBERAY_DIR)}"
    path, secret = found[0]
    assert all(d["kind"] == "Secret" for d in load_docs(path)), f"{rel(path)}: the Secret goes in a file of its own"
    return secret


def all_containers() -> list[tuple[str, dict]]:
    """(where, container) for every container of every KubeRay manifest: pod templates and RayJob submitters."""
    found = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend((f"{where}/{c['name']}", c) for c in value)
                else:
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for path, doc in [(p, d) for p in sorted(KUBERAY_DIR.glob("*.yaml")) for d in load_docs(p)]:
        walk(doc, f"{path.name}:{doc['metadata']['name']}")
    return found


def test_mlflow_sidecar_requires_a_login_from_the_secret():
    cluster = the_raycluster()
    sidecar = mlflow_sidecar(cluster)
    assert "--auth" in sidecar["args"], "the sidecar must run MLflow's basic-auth app (start_server.sh --auth)"
    # What the sidecar's arguments make of the script: the mlflow command line it execs.
    command = mlflow_command(*sidecar["args"])
    assert option(command, "--app-name") == "basic-auth"
    refs = secret_refs(sidecar)
    assert set(SERVER_SECRET_ENV) <= set(refs), f"the sidecar must read {SERVER_SECRET_ENV} from the Secret"
    secret = the_mlflow_secret(cluster)
    assert secret["apiVersion"] == "v1" and secret.get("type", "Opaque") == "Opaque"
    for name in SERVER_SECRET_ENV:
        assert refs[name]["key"] in secret["stringData"], f"{name}: the Secret has no key {refs[name]['key']}"
    # Users and their permissions survive a restart of the head pod: on the MLflow disk, next to the runs.
    auth_db = flag_value(sidecar["args"], "--auth-db")
    db_mount = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}["mlflow-db"]
    assert auth_db.startswith(db_mount + "/"), f"--auth-db {auth_db} must be on the mlflow-db volume ({db_mount})"


def test_every_container_that_logs_to_mlflow_logs_in_with_the_secret():
    """Jobs log from the Ray containers (drivers on the head, training's rank 0 on a GPU worker), with the
    account the sidecar creates: the same Secret keys."""
    cluster = the_raycluster()
    sidecar_refs = secret_refs(mlflow_sidecar(cluster))
    expected = {"MLFLOW_TRACKING_USERNAME": sidecar_refs["MLFLOW_AUTH_ADMIN_USERNAME"],
                "MLFLOW_TRACKING_PASSWORD": sidecar_refs["MLFLOW_AUTH_ADMIN_PASSWORD"]}
    loggers = [(where, c) for where, c in all_containers()
               if any(e["name"] == "MLFLOW_TRACKING_URI" for e in c.get("env", []))]
    assert len(loggers) >= len(pod_specs(cluster)), f"every Ray container sets MLFLOW_TRACKING_URI: {loggers}"
    for where, container in loggers:
        refs = secret_refs(container)
        for name, ref in expected.items():
            assert refs.get(name) == ref, f"{where}: {name} must come from secretKeyRef {ref}, has {refs.get(name)}"
    # The RayJobs point their jobs at MLflow in the runtime env; the credentials come from the containers.
    for filename in RAYJOBS:
        env_vars = yaml.safe_load(the_rayjob(filename)["spec"]["runtimeEnvYAML"]).get("env_vars", {})
        assert "MLFLOW_TRACKING_URI" in env_vars
        leaked = [k for k in env_vars if k in CLIENT_SECRET_ENV or SECRET_NAME.search(k)]
        assert not leaked, f"{filename}: credentials in runtimeEnvYAML (plain text in the RayJob object): {leaked}"


def test_no_credential_is_written_in_a_manifest():
    for where, container in all_containers():
        for entry in container.get("env", []):
            if SECRET_NAME.search(entry["name"]):
                assert "value" not in entry, f"{where}: {entry['name']} is written in the manifest, use a Secret"
        for token in [*container.get("command", []), *container.get("args", [])]:
            assert not re.search(r"password|secret", str(token), re.I), f"{where}: credential on the command line"
    for path, secret in kuberay_docs("Secret"):
        assert "data" not in secret, f"{rel(path)}: ship placeholders in stringData, not encoded values"
        for key, value in secret["stringData"].items():
            assert str(value).startswith(PLACEHOLDER), f"{rel(path)}: {key} must be a {PLACEHOLDER}... placeholder"


def admitted_peers(policy: dict, port: int, port_name: str) -> list[list[dict]]:
    """The `from` lists of the policy's ingress rules that open this port ([] in the list: from anywhere)."""
    peers = []
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports is None or any(p.get("port") in (port, port_name) for p in ports):
            peers.append(rule.get("from") or [])
    return peers


def the_networkpolicy(cluster: dict) -> dict:
    policies = kuberay_docs("NetworkPolicy")
    assert len(policies) == 1, f"expected one NetworkPolicy under {rel(KUBERAY_DIR)}, found {len(policies)}"
    path, policy = policies[0]
    assert all(d["kind"] == "NetworkPolicy" for d in load_docs(path)), f"{rel(path)}: a file of its own"
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    return policy


def test_networkpolicy_admits_mlflow_and_ray_only_from_the_clusters_pods():
    cluster = the_raycluster()
    name = cluster["metadata"]["name"]
    policy = the_networkpolicy(cluster)
    cluster_pods = {"podSelector": {"matchLabels": {"ray.io/cluster": name}}}
    # It selects every pod of the cluster (the head, where MLflow and GCS run, included) and only those.
    assert policy["spec"]["podSelector"] == cluster_pods["podSelector"]
    assert set(policy["spec"]["podSelector"]["matchLabels"].items()) <= \
        set(mlflow_service(cluster)["spec"]["selector"].items()), "the policy must select the MLflow pod"
    assert "Ingress" in policy["spec"]["policyTypes"]

    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["containerPort"]: p["name"] for c in head for p in c.get("ports", [])}
    mlflow_port = mlflow_service(cluster)["spec"]["ports"][0]["targetPort"]
    dashboard = 8265
    assert {mlflow_port, 6379, dashboard} <= set(ports), ports
    for port, port_name in ports.items():
        peers = admitted_peers(policy, port, port_name)
        assert peers, f"port {port} ({port_name}) is closed to everyone, the cluster's own pods included"
        assert all(peers), f"port {port} ({port_name}) is open to every address (an ingress rule without `from`)"
        if port == dashboard:
            # The KubeRay operator and the RayJob submitters: pods of this Kubernetes cluster, in any namespace
            # and without the cluster's label. Ray's token guards every request.
            assert all(set(peer) <= {"podSelector", "namespaceSelector"} for p in peers for peer in p), \
                f"the dashboard is for pods only, no ipBlock: {peers}"
        else:
            assert all(p == [cluster_pods] for p in peers), \
                f"port {port} ({port_name}) must admit only the pods labelled ray.io/cluster={name}: {peers}"


def kubernetes_objects() -> list[tuple[str, dict]]:
    """Every object kubernetes-validate has a schema for: the core kinds, and the pod templates inside the
    KubeRay kinds (whose own CRD schemas it does not ship) as PodTemplates."""
    objects = []
    for path, doc in [(p, d) for p in sorted(KUBERAY_DIR.glob("*.yaml")) for d in load_docs(p)]:
        where = f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] != "ray.io/v1":
            objects.append((where, doc))
            continue
        spec = doc["spec"]
        templates = {"head": spec.get("headGroupSpec", {}).get("template"),
                     "submitter": spec.get("submitterPodTemplate"),
                     **{g["groupName"]: g["template"] for g in spec.get("workerGroupSpecs", [])}}
        for part, template in templates.items():
            if template is not None:
                objects.append((f"{where}/{part}", {"apiVersion": "v1", "kind": "PodTemplate",
                                                    "metadata": {"name": part}, "template": template}))
    return objects


def test_kuberay_manifests_pass_the_kubernetes_schema():
    """kubernetes-validate's bundled schemas (offline), strict: an unknown or misspelt field fails."""
    import kubernetes_validate

    objects = kubernetes_objects()
    assert {o["kind"] for _, o in objects} >= {"NetworkPolicy", "Secret", "Service", "PodTemplate"}
    for where, obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{where}: {err.message} at {'/'.join(map(str, err.path))}")


@pytest.mark.parametrize("filename", sorted(RAYJOBS))
def test_rayjob_runs_its_job_on_the_cluster_with_shared_storage_and_mlflow(filename):
    job = the_rayjob(filename)
    cluster = the_raycluster()
    spec = job["spec"]
    name = cluster["metadata"]["name"]
    assert spec["clusterSelector"] == {"ray.io/cluster": name}

    entry = Entrypoint(spec["entrypoint"])
    assert entry.job == RAYJOBS[filename], f"{filename} must run {RAYJOBS[filename]}, not {entry.job}"
    assert re.fullmatch(r"jobs/\w+\.py", entry.job)
    assert (REPO / entry.job).is_file(), f"{filename}: {entry.job} does not exist"
    assert job_module_has_main(REPO / entry.job), f"{entry.job} has no main() / __main__ guard"
    for config in entry.values("--config"):
        assert (REPO / config).is_file(), f"{filename}: config {config} does not exist"
    if entry.job in CONFIG_FILE_JOBS:
        assert len(entry.values("--config")) == 1, f"{filename}: name the config file explicitly"

    # Everything the job reads or writes must be the same on every pod: absolute shared paths or URIs.
    for flag, value in entry.options:
        if flag == "--config":
            continue
        key, location = value.split("=", 1) if flag == "--set" else (flag[2:], value)
        if key in PATH_KEYS or "/" in location:
            assert location.startswith(SHARED_PREFIXES), \
                f"{filename}: {flag} {value}: use /shared/... or s3://... (a relative path lands in a temp copy)"

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    service = mlflow_service(cluster)
    uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == uri
    assert runtime_env["working_dir"] == IMAGE_REPO, "the repository's path in the image (see raycluster.yaml)"

    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    head_image = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert submitter["image"] == head_image, "the submitter uploads /app from the same image"
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "auth_token"}, \
        "KubeRay's authOptions Secret is named after the RayCluster, key auth_token"


@pytest.mark.parametrize("filename", sorted(RAYJOBS))
def test_rayjob_arguments_are_real_config_keys(filename):
    """The job itself resolves the entrypoint's arguments (an unknown key or a bad type exits 2), and
    each --set (and sample_eval's --model/--prompts/--out shorthands) lands in the resolved config."""
    entry = Entrypoint(the_rayjob(filename)["spec"]["entrypoint"])
    assert (REPO / entry.job).is_file(), f"{entry.job} does not exist (yet): {filename} runs it"
    run = subprocess.run([sys.executable, entry.job, *entry.args, "--print-config"], cwd=REPO,
                         env=clean_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{filename}: {entry.job} rejected its arguments:\n{run.stderr[-2000:]}"
    resolved = yaml.safe_load(run.stdout)
    for key, raw in entry.sets.items():
        assert dotted(resolved, key) == yaml.safe_load(raw), f"{filename}: --set {key}={raw} did not take"
    for flag, value in entry.options:
        if flag not in ("--config", "--set"):
            assert resolved[flag[2:]] == value, f"{filename}: {flag} {value} did not take"


# ------------------------------------------------------------------------------------ `ray up` config

@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_config_passes_rays_own_schema(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(launcher)  # fills Ray's AWS defaults, as `ray up` does
    validate_config(prepared)  # raises on unknown keys, wrong types, a missing head type
    # Ray's AWS defaults carry setup commands (a nightly wheel install): none may leak in.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "initialization_commands"):
        assert key in launcher, f"{key} must be explicit, or Ray's AWS default applies"


def test_launcher_has_a_cpu_head_and_an_autoscaling_gpu_worker_type(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, \
        "the head is CPU-only and takes no Ray tasks"
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu, "no GPU worker type"
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] < node_type["max_workers"], f"{name} cannot autoscale"
    assert any(t["resources"]["GPU"] == 8 for t in gpu.values()), "8 x 80 GB nodes for the sd2-base configs"
    assert launcher["max_workers"] >= max(t["max_workers"] for t in workers.values())


def test_launcher_installs_the_repository_with_the_pinned_versions(launcher):
    mounts = launcher["file_mounts"]
    repo_remote = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert len(repo_remote) == 1, "file_mounts must send the repository ('.', run `ray up` from its root)"
    assert ".gitignore" in launcher["rsync_filter"], "keep .venv and data/ out of the upload"
    installs = [c for c in launcher["setup_commands"] if "pip install" in c]
    assert any(f"cd {repo_remote[0]}" in c and "-c constraints.txt -e ." in c for c in installs), installs
    assert (REPO / "constraints.txt").is_file()
    assert any(local.endswith(".ray/auth_token") for local in mounts.values()), "every node needs the token"


def test_launcher_start_commands(launcher):
    head = " ; ".join(launcher["head_start_ray_commands"])
    workers = " ; ".join(launcher["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard (job server) stays on loopback: SSH tunnel"
    assert "--num-cpus=0" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "MLFLOW_TRACKING_URI=" in head and "MLFLOW_TRACKING_URI=" in workers
    assert "infra/mlflow/start_server.sh" in head and "--workers 1" in head
    repo_remote = next(r for r, local in launcher["file_mounts"].items() if local == ".")
    script = re.search(r"(\S+)/infra/mlflow/start_server\.sh", head).group(1)
    assert script.replace("~", "/home/ray") == repo_remote, "the script path must be inside the repo mount"


def test_launcher_commands_are_valid_bash(launcher):
    keys = ("initialization_commands", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for command in launcher[key]:
            run = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert run.returncode == 0, f"{key}: {command!r}: {run.stderr}"


# ------------------------------------------------------------------------------------ MLflow script

def mlflow_command(*args: str, **env: str) -> list[str]:
    run = subprocess.run(["bash", str(MLFLOW_SCRIPT), *args, "--print-command"], cwd=REPO,
                         env=clean_env(**env), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return shlex.split(run.stdout)


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_mlflow_script_is_strict_valid_bash():
    text = MLFLOW_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(MLFLOW_SCRIPT, os.X_OK), "start_server.sh must be executable"
    run = subprocess.run(["bash", "-n", str(MLFLOW_SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_mlflow_script_binds_loopback_with_one_worker_by_default():
    command = mlflow_command()
    assert command[:2] == ["mlflow", "server"]
    assert option(command, "--host") == "127.0.0.1"
    assert option(command, "--workers") == "1"
    assert option(command, "--backend-store-uri") == f"sqlite:///{REPO / 'mlflow.db'}"
    assert "--serve-artifacts" in command and option(command, "--artifacts-destination") == str(REPO / "mlartifacts")
    assert "--allowed-hosts" not in command, "MLflow's own default (localhost, private IPs) applies"


def test_mlflow_script_options():
    command = mlflow_command("--backend", "postgres", "--db", "postgresql://mlflow@db:5432/mlflow",
                             "--artifacts", "s3://bucket/mlflow", "--host", "10.0.0.5", "--port", "5001")
    assert option(command, "--backend-store-uri") == "postgresql://mlflow@db:5432/mlflow"
    assert option(command, "--artifacts-destination") == "s3://bucket/mlflow"
    assert (option(command, "--host"), option(command, "--port")) == ("10.0.0.5", "5001")
    assert option(mlflow_command(MLFLOW_HOST="10.0.0.6"), "--host") == "10.0.0.6"
    allowed = option(mlflow_command("--allowed-hosts", "svc,svc:*"), "--allowed-hosts").split(",")
    assert allowed[:2] == ["svc", "svc:*"] and "127.0.0.1:*" in allowed and "localhost:*" in allowed
    for bad in (["--backend", "postgres"], ["--backend", "mysql"], ["--workers", "0"], ["--nope"],
                ["--backend", "sqlite", "--db", "postgresql://x/y"]):
        run = subprocess.run(["bash", str(MLFLOW_SCRIPT), *bad, "--print-command"], cwd=REPO,
                             env=clean_env(), capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, f"{bad} should be refused: {run.stdout}{run.stderr}"


def test_mlflow_script_auth_options():
    command = mlflow_command("--auth", "--db", "/data/mlflow.db")
    assert option(command, "--app-name") == "basic-auth"
    assert "--app-name" not in mlflow_command(), "no login unless --auth"
    # The user store: next to the SQLite tracking file unless --auth-db says where.
    assert option(command, "--backend-store-uri") == "sqlite:////data/mlflow.db"
    for bad in (["--auth", "--auth-default-permission", "ALL"],
                ["--auth", "--backend", "postgres", "--db", "postgresql://mlflow@db:5432/mlflow"],
                ["--auth-default-permission", "READ"]):
        run = subprocess.run(["bash", str(MLFLOW_SCRIPT), *bad, "--print-command"], cwd=REPO,
                             env=clean_env(), capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, f"{bad} should be refused: {run.stdout}{run.stderr}"


def test_mlflow_script_refuses_to_start_a_login_server_without_real_credentials(tmp_path):
    """Checked before mlflow starts (MLFLOW_BIN=false would exit 1): a missing variable, or the Secret
    manifest's placeholder left in place."""
    good = {"MLFLOW_AUTH_ADMIN_USERNAME": "latentforge", "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-password-1",
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "0123456789abcdef"}
    cases = [{k: v for k, v in good.items() if k != missing} for missing in good]
    cases += [{**good, "MLFLOW_AUTH_ADMIN_PASSWORD": PLACEHOLDER + "mlflow-admin-password"},
              {**good, "MLFLOW_FLASK_SERVER_SECRET_KEY": PLACEHOLDER + "flask-secret-key"}]
    for env in cases:
        run = subprocess.run(["bash", str(MLFLOW_SCRIPT), "--auth"], cwd=tmp_path, timeout=60,
                             env=clean_env(MLFLOW_BIN="false", **env), capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1, f"{sorted(env)}: {run.stdout}{run.stderr}"


def sidecar_command_here(sidecar: dict, root: Path, port: int) -> list[str]:
    """The sidecar's command and arguments as they run in the pod, on this machine: the image's /app is this
    repository, the pod's volumes are folders under root, and the server binds 127.0.0.1:port."""
    mounts = [m["mountPath"] for m in sidecar["volumeMounts"]]
    command = [str(REPO / Path(sidecar["command"][0]).relative_to(IMAGE_REPO)), *sidecar["command"][1:]]
    args = list(sidecar["args"])
    for i, token in enumerate(args):
        if any(token == m or token.startswith(m + "/") for m in mounts):
            args[i] = str(root / token.lstrip("/"))
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    return ["bash", *command, *args]


@contextlib.contextmanager
def running_server(command: list[str], env: dict[str, str], cwd: Path, base: str):
    """The server, in its own process group (uvicorn's workers too), until /health answers; stopped after."""
    log = (cwd / "server.log").open("w")
    server = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.time() + 150
        while True:
            assert server.poll() is None, (cwd / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                    if reply.status == 200:  # /health needs no login: the readiness probe
                        break
            except OSError:
                pass
            assert time.time() < deadline, "no /health answer:\n" + (cwd / "server.log").read_text()[-3000:]
            time.sleep(1)
        yield server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


def http_status(url: str, user: str | None = None, password: str | None = None, body: dict | None = None) -> int:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_mlflow_sidecar_command_serves_only_logged_in_clients(tmp_path, monkeypatch):
    """The sidecar's own command line from raycluster.yaml (~20-30 s), with a test Secret: no login, a wrong
    password, and an account nobody granted anything get nothing; a Ray worker's credentials (the same
    secretKeyRefs) create runs, log params, metrics and artifacts, directly and through the pipelines'
    Tracker; artifacts land in --artifacts; the socket is 127.0.0.1 only."""
    import psutil
    from mlflow import MlflowClient

    from pipelines.core.config import ConfigError
    from pipelines.core.tracking import MLflowSettings, Tracker

    cluster = the_raycluster()
    sidecar = mlflow_sidecar(cluster)
    secret = the_mlflow_secret(cluster)
    test_secret = {key: f"test-{key}-{secrets.token_hex(8)}" for key in secret["stringData"]}
    secrets_by_name = {secret["metadata"]["name"]: test_secret}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_env = clean_env(MLFLOW_BIN=str(Path(sys.executable).with_name("mlflow")),
                           **resolve_env(sidecar, secrets_by_name))
    worker = pod_specs(cluster)["gpu-8x80gb"]["containers"][0]
    login = {k: v for k, v in resolve_env(worker, secrets_by_name).items() if k in CLIENT_SECRET_ENV}
    user, password = login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"]
    search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"

    with running_server(sidecar_command_here(sidecar, tmp_path, port), server_env, tmp_path, base) as server:
        assert http_status(search) == 401, "no login must be refused"
        assert http_status(search, user, password + "x") == 401, "a wrong password must be refused"
        assert http_status(search, user, password) == 200

        for name, value in login.items():  # MLflow's client reads them at every request
            monkeypatch.setenv(name, value)
        client = MlflowClient(base)
        experiment = client.create_experiment("infra-auth")
        run = client.create_run(experiment)
        client.log_param(run.info.run_id, "lr", "0.1")
        assert client.get_run(run.info.run_id).data.params == {"lr": "0.1"}

        # default_permission NO_PERMISSIONS: an account the admin creates sees nothing until granted.
        assert http_status(f"{base}/api/2.0/mlflow/users/create", user, password,
                           {"username": "viewer", "password": "viewer-password-1"}) == 200
        assert http_status(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={experiment}",
                           "viewer", "viewer-password-1") == 403

        # The pipelines' Tracker, as the jobs use it, with nothing but the environment's credentials.
        # A patient timeout: this checks the login, not how fast a loaded test machine answers.
        settings = MLflowSettings(tracking_uri=base, experiment="infra-tracker", system_metrics=False,
                                  http_timeout_s=120)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.http_retries))  # restored after
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.http_timeout_s))
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password + "x")  # a wrong Secret: the job stops at once
        with pytest.raises(ConfigError, match="refused the login .HTTP 401.: set MLFLOW_TRACKING_USERNAME"):
            Tracker.open(settings, run_name="auth-probe")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        tracker = Tracker.open(settings, run_name="auth-probe")
        tracker.log_params({"batch_size": 64})
        tracker.log_metrics({"loss": 0.5}, step=1)
        (tmp_path / "note.txt").write_text("hello")
        tracker.log_artifact(tmp_path / "note.txt")
        tracker.finish()
        assert tracker.run_id is not None and tracker.failures == 0, (tmp_path / "server.log").read_text()[-3000:]
        logged = client.get_run(tracker.run_id)
        assert logged.data.params == {"batch_size": "64"} and logged.data.metrics == {"loss": 0.5}
        assert logged.info.status == "FINISHED"
        artifacts = tmp_path / flag_value(sidecar["args"], "--artifacts").lstrip("/")
        stored = list(artifacts.rglob("note.txt"))
        assert len(stored) == 1 and stored[0].read_text() == "hello"

        group = [p for p in psutil.process_iter() if _in_group(p, server.pid)]
        addresses = {c.laddr.ip for p in group for c in _listening(p) if c.laddr.port == port}
        assert addresses == {"127.0.0.1"}, addresses


def _in_group(process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid
    except (OSError, ProcessLookupError):
        return False


def _listening(process) -> list:
    import psutil

    try:
        return [c for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    except (psutil.Error, OSError):
        return []
