"""The cluster configurations in clusters/ pass the checks of the tools that read them and keep their
security decisions.

Offline: no AWS credentials, no Kubernetes, no network (a fixture makes any connection attempt fail).

* clusters/gpu.yaml goes through `prepare_config` + `validate_config` from the installed Ray: what
  `ray up` runs before its first AWS call (`ray.autoscaler._private.commands._bootstrap_config`).
  `validate_config` checks the JSON schema `ray/autoscaler/ray-schema.json` (no unknown keys, types)
  and Ray's cross-field rules. Only the AWS steps (instance-type lookup, IAM/subnet/security-group
  bootstrap) are left out.
* clusters/kuberay.yaml goes through `_derive_autoscaling_config_from_ray_cr`, the function with
  which KubeRay's in-tree autoscaler reads a RayCluster; it validates its result with the same schema.
  The fields the KubeRay operator itself requires are checked by `raycluster_problems` below.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
GPU_YAML = REPO / "clusters" / "gpu.yaml"
KUBERAY_YAML = REPO / "clusters" / "kuberay.yaml"

RAY_VERSION = "2.60.0"
RAY_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
GPU_RESOURCE = "nvidia.com/gpu"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (an AWS or Kubernetes API call) fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def gpu_config() -> dict[str, Any]:
    return yaml.safe_load(GPU_YAML.read_text())


@pytest.fixture
def ray_cluster() -> dict[str, Any]:
    return yaml.safe_load(KUBERAY_YAML.read_text())


def validate_cluster_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """`ray up`'s offline validation: defaults filled in, then schema and cross-field checks."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def strings_in(node: Any) -> Iterator[str]:
    """Every string value anywhere in a parsed YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)


def shell_commands(config: dict[str, Any]) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return [command for key in keys for command in config.get(key, [])]


def option_value(tokens: list[str], option: str) -> str | None:
    """The value of `--option value` or `--option=value` in a tokenised command line."""
    for index, token in enumerate(tokens):
        if token == option and index + 1 < len(tokens):
            return tokens[index + 1]
        if token.startswith(option + "="):
            return token.split("=", 1)[1]
    return None


def mlflow_server_tokens(command: str) -> list[str]:
    """The arguments of the `mlflow server` call in `command`."""
    tokens = shlex.split(command)
    start = next(i for i in range(len(tokens) - 1) if tokens[i : i + 2] == ["mlflow", "server"])
    return tokens[start:]


def uncommented_lines(path: Path) -> list[str]:
    return [line.split("#", 1)[0] for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


# --- clusters/gpu.yaml: Ray's own validator --------------------------------------------------------


def test_gpu_yaml_passes_ray_cluster_launcher_validation(gpu_config: dict[str, Any]) -> None:
    prepared = validate_cluster_launcher_config(gpu_config)
    assert prepared["cluster_name"] == "prado-dist"
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        pytest.param(
            lambda c: c.update(max_worker=c.pop("max_workers")),
            jsonschema.ValidationError,
            id="misspelt-top-level-key",
        ),
        pytest.param(lambda c: c.update(max_workers="four"), jsonschema.ValidationError, id="wrong-type"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0),
            jsonschema.ValidationError,
            id="misspelt-node-type-key",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),
            jsonschema.ValidationError,
            id="missing-node-config",
        ),
        pytest.param(lambda c: c.update(head_node_type="cpu_head"), ValueError, id="unknown-head-type"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=c["max_workers"] + 1),
            ValueError,
            id="min-workers-above-cluster-max",
        ),
    ],
)
def test_ray_validator_rejects_a_broken_copy(
    gpu_config: dict[str, Any], breakage: Any, expected: type[Exception]
) -> None:
    broken = copy.deepcopy(gpu_config)
    breakage(broken)
    with pytest.raises(expected):
        validate_cluster_launcher_config(broken)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_shell_command_parses(gpu_config: dict[str, Any]) -> None:
    for command in shell_commands(gpu_config):
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


# --- clusters/gpu.yaml: security and reproducibility decisions -------------------------------------


def test_dashboard_and_job_api_listen_on_head_loopback_only(gpu_config: dict[str, Any]) -> None:
    head_starts = [c for c in gpu_config["head_start_ray_commands"] if "ray start --head" in c]
    assert len(head_starts) == 1
    assert option_value(shlex.split(head_starts[0]), "--dashboard-host") == "127.0.0.1"
    assert not any("0.0.0.0" in text for text in strings_in(gpu_config))


def test_mlflow_runs_on_head_loopback_with_artifacts_in_storage(gpu_config: dict[str, Any]) -> None:
    mlflow_commands = [c for c in shell_commands(gpu_config) if "mlflow server" in c]
    assert mlflow_commands and all(c in gpu_config["head_start_ray_commands"] for c in mlflow_commands)
    assert len(mlflow_commands) == 1
    tokens = mlflow_server_tokens(mlflow_commands[0])
    assert option_value(tokens, "--host") == "127.0.0.1"
    assert option_value(tokens, "--port") == "5000"
    assert option_value(tokens, "--backend-store-uri") == "sqlite:///$HOME/mlflow/mlflow.db"
    assert option_value(tokens, "--default-artifact-root") == "$PRADO_STORAGE/mlflow"
    assert "nohup" in shlex.split(mlflow_commands[0])


def test_security_group_admits_only_ssh_from_outside(gpu_config: dict[str, Any]) -> None:
    security_group = gpu_config["provider"]["security_group"]
    assert security_group["GroupName"]
    for rule in security_group["IpPermissions"]:
        assert (rule["IpProtocol"].lower(), rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
    # Ray only creates and fills its group for node types without their own SecurityGroupIds.
    for node_type in gpu_config["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]
        assert "NetworkInterfaces" not in node_type["node_config"]


def test_security_group_effective_ingress_is_ssh_plus_cluster_members(gpu_config: dict[str, Any]) -> None:
    """The rules Ray's AWS bootstrap writes into the new group: its defaults plus IpPermissions."""
    pytest.importorskip("boto3", reason="Ray's AWS provider module imports boto3 (needed by `ray up`)")
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    own_group = "sg-prado-dist"
    extra_rules = gpu_config["provider"]["security_group"]["IpPermissions"]
    for rule in _create_default_inbound_rules({own_group}, extra_rules):
        from_outside = rule.get("IpRanges") or rule.get("Ipv6Ranges") or rule.get("PrefixListIds")
        if from_outside:
            assert (rule["IpProtocol"].lower(), rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
        else:
            assert {pair["GroupId"] for pair in rule["UserIdGroupPairs"]} == {own_group}, rule


def test_gpu_workers_scale_from_zero_and_head_takes_no_work(gpu_config: dict[str, Any]) -> None:
    node_types = gpu_config["available_node_types"]
    head = node_types[gpu_config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head.get("max_workers", 0) == 0
    workers = {name: spec for name, spec in node_types.items() if name != gpu_config["head_node_type"]}
    assert workers, "no worker node type"
    for name, spec in workers.items():
        assert spec["min_workers"] == 0, name
        assert 1 <= spec["max_workers"] <= gpu_config["max_workers"], name
        # Checkpoints go from the GPU nodes straight to S3: they need an instance profile.
        assert "IamInstanceProfile" in spec["node_config"], name


def test_ray_and_python_versions_are_pinned(gpu_config: dict[str, Any]) -> None:
    assert gpu_config["docker"]["image"] == RAY_IMAGE
    assert not {"head_image", "worker_image"} & set(gpu_config["docker"]), "one image for every node"
    ray_requirement = re.search(r'"(ray\[[^"]*)"', (REPO / "pyproject.toml").read_text())
    assert ray_requirement, "no ray requirement in pyproject.toml"
    assert RAY_VERSION in Requirement(ray_requirement[1]).specifier, "pyproject.toml no longer allows this Ray"
    setup = gpu_config["setup_commands"]
    installs = [shlex.split(c) for c in setup if c.startswith("pip install")]
    assert len(installs) == 1
    install = installs[0]
    assert option_value(install, "-e") == "~/prado_dist"
    pinned_ray = [Requirement(t) for t in install if t.startswith("ray[")]
    assert [str(r.specifier) for r in pinned_ray] == [f"=={RAY_VERSION}"]
    assert any(f"ray.__version__ == '{RAY_VERSION}'" in c and "(3, 11)" in c for c in setup)


def test_repository_is_synced_to_every_node(gpu_config: dict[str, Any]) -> None:
    assert gpu_config["file_mounts"]["~/prado_dist"] == "."
    assert ".gitignore" in gpu_config["rsync_filter"]


def test_storage_uri_is_defined_once(gpu_config: dict[str, Any]) -> None:
    uris = [text for text in strings_in(gpu_config) if "s3://" in text]
    assert uris == [next(o for o in gpu_config["docker"]["run_options"] if "PRADO_STORAGE=" in o)]
    assert re.fullmatch(r"--env PRADO_STORAGE=s3://[^\s/]+/\S*", uris[0])
    assert sum("s3://" in line for line in uncommented_lines(GPU_YAML)) == 1
    # A leftover example bucket stops `ray up` at the first setup command.
    assert "YOUR-BUCKET" in gpu_config["setup_commands"][0] and "exit 1" in gpu_config["setup_commands"][0]


def ray_start_commands(config: dict[str, Any]) -> list[str]:
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [command for command in starts if "ray start" in command]


def test_every_ray_start_uses_token_authentication(gpu_config: dict[str, Any]) -> None:
    starts = ray_start_commands(gpu_config)
    assert len(starts) == 2  # head and workers
    for command in starts:
        words = shlex.split(command.split(";")[-1])  # after `ulimit -n ...;`
        assert words[:3] == ["RAY_AUTH_MODE=token", "ray", "start"], command
    # Drivers and every other Ray process in the container authenticate too.
    assert "--env RAY_AUTH_MODE=token" in gpu_config["docker"]["run_options"]
    assert not any("RAY_AUTH_MODE=disabled" in text for text in strings_in(gpu_config))


def test_auth_token_is_handed_to_every_node_and_never_written_in_the_config(gpu_config: dict[str, Any]) -> None:
    # Created with `ray get-auth-token --generate` where `ray up` runs; file_mounts go to every node.
    assert gpu_config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in GPU_YAML.read_text()
    assert not any("RAY_AUTH_TOKEN=" in text for text in strings_in(gpu_config))
    # A node without the token stops at setup with what to do, not at `ray start`.
    checks = [c for c in gpu_config["setup_commands"] if "~/.ray/auth_token" in c]
    assert len(checks) == 1 and "exit 1" in checks[0] and "get-auth-token --generate" in checks[0]
    assert gpu_config["setup_commands"].index(checks[0]) < 3  # before the long pip install


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_setup_refuses_a_node_without_the_token(gpu_config: dict[str, Any], tmp_path: Path) -> None:
    check = next(c for c in gpu_config["setup_commands"] if "~/.ray/auth_token" in c)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", check], env={"HOME": str(tmp_path)}, capture_output=True, text=True)

    missing = run()
    assert missing.returncode == 1 and "ray get-auth-token --generate" in missing.stderr
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    assert run().returncode == 0


# --- clusters/kuberay.yaml -------------------------------------------------------------------------


def raycluster_problems(cluster: dict[str, Any]) -> list[str]:
    """What the KubeRay operator (ray.io/v1 CRD) would reject or misread in a RayCluster."""
    problems = []
    if cluster.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion is {cluster.get('apiVersion')!r}, not 'ray.io/v1'")
    if cluster.get("kind") != "RayCluster":
        problems.append(f"kind is {cluster.get('kind')!r}, not 'RayCluster'")
    if not cluster.get("metadata", {}).get("name"):
        problems.append("metadata.name is missing")
    spec = cluster.get("spec", {})
    groups = [("headGroupSpec", spec.get("headGroupSpec"))]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    if groups[0][1] is None:
        return [*problems, "spec.headGroupSpec is missing"]
    if len(groups) == 1:
        problems.append("spec.workerGroupSpecs is empty")
    for where, group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict):
            problems.append(f"{where}.rayStartParams is missing")
        elif not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{where}.rayStartParams values must all be strings (map[string]string)")
        containers = group.get("template", {}).get("spec", {}).get("containers") or []
        if not containers:
            problems.append(f"{where}.template.spec.containers is empty")
        for index, container in enumerate(containers):
            if not container.get("name") or not container.get("image"):
                problems.append(f"{where} container {index} needs a name and an image")
        if len({c.get("name") for c in containers}) != len(containers):
            problems.append(f"{where} has duplicate container names")
        if where == "headGroupSpec":
            continue
        if not group.get("groupName"):
            problems.append(f"{where}.groupName is missing")
        counts = [group.get(key) for key in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(n, int) for n in counts) or not 0 <= counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{where}: need 0 <= minReplicas <= replicas <= maxReplicas, got {counts}")
        elif counts[2] < 1:
            problems.append(f"{where}.maxReplicas must be at least 1")
        limits = (containers[0].get("resources", {}).get("limits") or {}) if containers else {}
        if int(limits.get(GPU_RESOURCE, 0)) < 1:
            problems.append(f"{where}: the Ray container has no {GPU_RESOURCE} limit")
    return problems


def all_containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_kuberay_yaml_is_a_well_formed_raycluster(ray_cluster: dict[str, Any]) -> None:
    assert raycluster_problems(ray_cluster) == []


def gpu_group(cluster: dict[str, Any]) -> dict[str, Any]:
    return cluster["spec"]["workerGroupSpecs"][0]


def gpu_limits(cluster: dict[str, Any]) -> dict[str, Any]:
    return gpu_group(cluster)["template"]["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.update(apiVersion="ray.io/v1alpha1"), id="old-api-version"),
        pytest.param(lambda c: gpu_group(c).update(maxReplicas=0, replicas=0), id="max-replicas-0"),
        pytest.param(lambda c: gpu_group(c).update(minReplicas=5), id="min-above-max"),
        pytest.param(lambda c: gpu_group(c).pop("groupName"), id="no-group-name"),
        pytest.param(lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), id="int"),
        pytest.param(lambda c: gpu_limits(c).pop(GPU_RESOURCE), id="no-gpu-limit"),
    ],
)
def test_raycluster_check_rejects_a_broken_copy(ray_cluster: dict[str, Any], breakage: Any) -> None:
    broken = copy.deepcopy(ray_cluster)
    breakage(broken)
    assert raycluster_problems(broken)


def test_kuberay_autoscaler_reads_the_raycluster(ray_cluster: dict[str, Any]) -> None:
    cluster = copy.deepcopy(ray_cluster)
    cluster["metadata"].setdefault("namespace", "default")  # set by the API server in a live cluster
    autoscaling = _derive_autoscaling_config_from_ray_cr(cluster)  # runs validate_config itself
    node_types = autoscaling["available_node_types"]
    head = node_types.pop("headgroup")
    assert head["resources"]["CPU"] == 0
    assert node_types, "no worker group"
    for name, node_type in node_types.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
        assert node_type["resources"].get("GPU", 0) >= 1, name


def test_kuberay_autoscaler_reader_rejects_a_broken_copy(ray_cluster: dict[str, Any]) -> None:
    broken = copy.deepcopy(ray_cluster)
    broken["metadata"]["namespace"] = "default"
    resources = gpu_group(broken)["template"]["spec"]["containers"][0]["resources"]
    for quantities in resources.values():
        quantities.pop("cpu")
    with pytest.raises(ValueError, match="CPU"):
        _derive_autoscaling_config_from_ray_cr(broken)


def test_kuberay_keeps_dashboard_and_mlflow_inside_the_head_pod(ray_cluster: dict[str, Any]) -> None:
    head = ray_cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    mlflow = [c for c in head["template"]["spec"]["containers"] if "mlflow server" in " ".join(c.get("args", []))]
    assert len(mlflow) == 1
    tokens = mlflow_server_tokens(" ".join(mlflow[0]["args"]))
    assert option_value(tokens, "--host") == "127.0.0.1"
    assert option_value(tokens, "--default-artifact-root") == "$PRADO_STORAGE/mlflow"
    assert not any("0.0.0.0" in text for text in strings_in(ray_cluster))


def test_kuberay_matches_the_vm_cluster(ray_cluster: dict[str, Any], gpu_config: dict[str, Any]) -> None:
    assert ray_cluster["spec"]["rayVersion"] == RAY_VERSION
    assert ray_cluster["spec"]["enableInTreeAutoscaling"] is True
    containers = all_containers(ray_cluster)
    assert {c["image"] for c in containers} == {gpu_config["docker"]["image"]}
    storage = {e["value"] for c in containers for e in c.get("env", []) if e["name"] == "PRADO_STORAGE"}
    assert len(storage) == 1 and next(iter(storage)).startswith("s3://")
    assert all(any(e["name"] == "PRADO_STORAGE" for e in c.get("env", [])) for c in containers)
    # Written once (a YAML anchor shares it between the containers).
    assert sum("s3://" in line for line in uncommented_lines(KUBERAY_YAML)) == 1
    for group in [ray_cluster["spec"]["headGroupSpec"], *ray_cluster["spec"]["workerGroupSpecs"]]:
        install = " ".join(group["template"]["spec"]["containers"][0]["command"])
        assert "$PRADO_DIST_REQUIREMENT" in install and f"ray[default,tune,train]=={RAY_VERSION}" in install


def test_kuberay_enables_token_authentication(ray_cluster: dict[str, Any]) -> None:
    # KubeRay >= 1.5.1 generates the token Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in every Ray
    # container; the header says which operator version that needs.
    assert ray_cluster["spec"]["authOptions"] == {"mode": "token"}
    assert "v1.5.1+" in KUBERAY_YAML.read_text().split("apiVersion:")[0]
    assert not any("RAY_AUTH_MODE" in text or "RAY_AUTH_TOKEN" in text for text in strings_in(ray_cluster))
